/* Progress on a terminal: see progress.h. */
#include "agent/progress.h"

#include <errno.h>
#include <glib.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define REDRAW_US 500000
#define MAX_ITEMS 64 /* further items are not drawn (their bytes are lost) */

struct item {
    char *name;
    uint64_t done, total;
};

struct progress {
    char *label;
    int fd; /* -1: draw on stderr; -2: nothing; else report lines to fd */
    struct item items[MAX_ITEMS];
    unsigned n;
    gint64 start_us, drawn_us;
    uint64_t first_done; /* bytes done when first set: the rate is of now */
    uint64_t removed;    /* bytes done of items taken off the line */
    bool started;
};

struct progress *
progress_new(const char *label, bool enabled)
{
    struct progress *p;

    if (!enabled) {
        return NULL;
    }
    p = g_new0(struct progress, 1);
    p->label = g_strdup(label);
    p->fd = -1;
    p->start_us = g_get_monotonic_time();
    return p;
}

struct progress *
progress_new_fd(int fd)
{
    struct progress *p = progress_new("", fd >= 0);

    if (p) {
        p->fd = fd;
    }
    return p;
}

void
progress_set_label(struct progress *p, const char *label)
{
    if (p) {
        g_free(p->label);
        p->label = g_strdup(label);
    }
}

static int
find(struct progress *p, const char *item)
{
    for (unsigned i = 0; i < p->n; i++) {
        if (strcmp(p->items[i].name, item) == 0) {
            return (int)i;
        }
    }
    return -1;
}

void
progress_set(struct progress *p, const char *item, uint64_t done,
             uint64_t total)
{
    int i;

    if (!p) {
        return;
    }
    i = find(p, item);
    if (i < 0) {
        if (p->n == MAX_ITEMS) {
            return;
        }
        i = (int)p->n++;
        p->items[i].name = g_strdup(item);
    }
    if (!p->started) {
        p->started = true;
        p->first_done = done;
        p->start_us = g_get_monotonic_time();
    }
    p->items[i].done = done;
    p->items[i].total = total;
}

void
progress_remove(struct progress *p, const char *item)
{
    int i = p ? find(p, item) : -1;

    if (i < 0) {
        return;
    }
    p->removed += p->items[i].done;
    g_free(p->items[i].name);
    memmove(&p->items[i], &p->items[i + 1],
            (p->n - (unsigned)i - 1) * sizeof(p->items[0]));
    p->n--;
}

const char *
progress_bytes(uint64_t n, char *buf)
{
    if (n >= (uint64_t)10 << 30) {
        snprintf(buf, 16, "%.1f GiB", (double)n / (1 << 30));
    } else {
        snprintf(buf, 16, "%.1f MiB", (double)n / (1 << 20));
    }
    return buf;
}

static void
report(struct progress *p)
{
    GString *s = g_string_new(NULL);

    for (unsigned i = 0; i < p->n; i++) {
        g_string_append_printf(s, "%s %" PRIu64 " %" PRIu64 "\n",
                               p->items[i].name, p->items[i].done,
                               p->items[i].total);
    }
    /* A run that stopped reading must not stop the backup: the pipe is
     * non-blocking, a full one skips a report, a broken one ends them. */
    if (write(p->fd, s->str, s->len) < 0 && errno != EAGAIN) {
        p->fd = -2;
    }
    g_string_free(s, TRUE);
}

static size_t
term_width(void)
{
    struct winsize ws;

    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 20) {
        return ws.ws_col;
    }
    return 80;
}

static void
draw(struct progress *p, bool final)
{
    uint64_t done = p->removed, total = p->removed;
    double secs = (double)(g_get_monotonic_time() - p->start_us) / 1e6;
    GString *line = g_string_new(NULL);
    GString *tail = g_string_new(NULL);
    size_t width = term_width() - 1;
    char a[16], b[16];

    g_string_append_printf(line, "%s:", p->label);
    for (unsigned i = 0; i < p->n; i++) {
        done += p->items[i].done;
        total += p->items[i].total;
        g_string_append_printf(line, " %s %s of %s", p->items[i].name,
                               progress_bytes(p->items[i].done, a),
                               progress_bytes(p->items[i].total, b));
        if (i + 1 < p->n) {
            g_string_append_c(line, ',');
        }
    }
    if (secs > 0.2 && done > p->first_done) {
        double rate = (double)(done - p->first_done) / secs;

        g_string_append_printf(tail, "  %s/s", progress_bytes(rate, a));
        if (!final && total > done) {
            unsigned left = (unsigned)((double)(total - done) / rate);
            g_string_append_printf(tail, "  %u:%02u left", left / 60,
                                   left % 60);
        }
    }
    /* One terminal line, or \r cannot redraw it: the items give way. */
    if (line->len + tail->len > width) {
        size_t keep = width > tail->len + 3 ? width - tail->len - 3 : 0;
        g_string_truncate(line, MIN(keep, line->len));
        g_string_append(line, "...");
    }
    fprintf(stderr, "\r\033[K%s%s%s", line->str, tail->str, final ? "\n" : "");
    fflush(stderr);
    g_string_free(line, TRUE);
    g_string_free(tail, TRUE);
}

void
progress_show(struct progress *p)
{
    gint64 now = g_get_monotonic_time();

    if (!p || now - p->drawn_us < REDRAW_US) {
        return;
    }
    p->drawn_us = now;
    if (p->fd >= 0) {
        report(p);
    } else if (p->fd == -1) {
        draw(p, false);
    }
}

void
progress_end(struct progress *p, bool success)
{
    if (!p) {
        return;
    }
    if (p->fd >= 0) {
        report(p);
    } else if (p->fd == -1 && success && p->n) {
        draw(p, true);
    } else if (p->fd == -1 && p->drawn_us) {
        fputs("\r\033[K", stderr);
    }
    for (unsigned i = 0; i < p->n; i++) {
        g_free(p->items[i].name);
    }
    g_free(p->label);
    g_free(p);
}

bool
progress_parse_line(const char *line, char *item, uint64_t *done,
                    uint64_t *total)
{
    char rest;

    return sscanf(line, "%127s %" SCNu64 " %" SCNu64 " %c", item, done, total,
                  &rest) == 3;
}

/* Progress on a terminal: see progress.h. */
#include "agent/progress.h"

#include <glib.h>
#include <stdio.h>
#include <string.h>

#define REDRAW_US 500000
#define MAX_ITEMS 32 /* more disks share the line's last item */

struct item {
    char *name;
    uint64_t done, total;
};

struct progress {
    char *label;
    struct item items[MAX_ITEMS];
    unsigned n;
    gint64 start_us, drawn_us;
    uint64_t
        first_done; /* bytes done when first set: the rate is of this run */
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
    p->start_us = g_get_monotonic_time();
    return p;
}

void
progress_set(struct progress *p, const char *item, uint64_t done,
             uint64_t total)
{
    unsigned i;

    if (!p) {
        return;
    }
    for (i = 0; i < p->n; i++) {
        if (strcmp(p->items[i].name, item) == 0) {
            break;
        }
    }
    if (i == p->n) {
        if (p->n == MAX_ITEMS) {
            return;
        }
        p->items[p->n++].name = g_strdup(item);
    }
    p->items[i].done = done;
    p->items[i].total = total;
    if (!p->started) {
        p->started = true;
        p->first_done = done;
        p->start_us = g_get_monotonic_time();
    }
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
draw(struct progress *p, bool final)
{
    uint64_t done = 0, total = 0;
    double secs = (double)(g_get_monotonic_time() - p->start_us) / 1e6;
    GString *line = g_string_new(NULL);
    char a[16], b[16];

    g_string_append_printf(line, "\r\033[K%s:", p->label);
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

        g_string_append_printf(line, "  %s/s", progress_bytes(rate, a));
        if (!final && total > done) {
            unsigned left = (unsigned)((double)(total - done) / rate);
            g_string_append_printf(line, "  %u:%02u left", left / 60,
                                   left % 60);
        }
    }
    if (final) {
        g_string_append_c(line, '\n');
    }
    fputs(line->str, stderr);
    fflush(stderr);
    g_string_free(line, TRUE);
}

void
progress_show(struct progress *p)
{
    gint64 now = g_get_monotonic_time();

    if (!p || !p->n || now - p->drawn_us < REDRAW_US) {
        return;
    }
    p->drawn_us = now;
    draw(p, false);
}

void
progress_end(struct progress *p, bool success)
{
    if (!p) {
        return;
    }
    if (success && p->n) {
        draw(p, true);
    } else if (p->drawn_us) {
        fputs("\r\033[K", stderr);
    }
    for (unsigned i = 0; i < p->n; i++) {
        g_free(p->items[i].name);
    }
    g_free(p->label);
    g_free(p);
}

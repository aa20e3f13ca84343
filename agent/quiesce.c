/* Guest freeze and thaw: see quiesce.h. */
#include "agent/quiesce.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "agent/recover.h"
#include "qmp/client.h"

#define MARKER ".freeze-pending"
#define MAX_MARKER 4096

struct quiesce {
    struct ring *ring;
    struct repo_vm *repo;
    enum quiesce_mode mode;
    char *qga_path;
    int timeout_ms;

    struct qmp_client *qga;
    bool usable;      /* prepared: connected, synced, not frozen by others */
    bool freeze_sent; /* a freeze may have taken effect: thaw needed */
    bool thawed;
    int frozen; /* file systems the freeze reported, -1 if none */
    int thaw_count;
    gint64 freeze_reply_us, thaw_request_us;
    sigset_t saved_mask;
    bool signals_held;
    GPtrArray *warnings;
};

struct quiesce *
quiesce_new(struct ring *ring, struct repo_vm *repo, enum quiesce_mode mode,
            const char *qga_path, int timeout_ms)
{
    struct quiesce *q = g_new0(struct quiesce, 1);

    q->ring = ring;
    q->repo = repo;
    q->mode = qga_path ? mode : QUIESCE_OFF;
    q->qga_path = g_strdup(qga_path);
    q->timeout_ms = timeout_ms;
    q->frozen = -1;
    q->thaw_count = -1;
    q->warnings = g_ptr_array_new_with_free_func(g_free);
    return q;
}

void
quiesce_free(struct quiesce *q)
{
    if (!q) {
        return;
    }
    quiesce_thaw(q);
    qmp_client_free(q->qga);
    g_ptr_array_free(q->warnings, true);
    g_free(q->qga_path);
    g_free(q);
}

/* The marker names the agent socket, so a later run can thaw even if it
 * was started without --qga.  Durable before the freeze is sent. */
static bool
marker_write(struct repo_vm *r, const char *qga_path, GError **errp)
{
    int fd =
        openat(r->vm_fd, MARKER ".tmp",
               O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0640);
    size_t len = strlen(qga_path);

    if (fd < 0 || write(fd, qga_path, len) != (ssize_t)len || fsync(fd) < 0 ||
        renameat(r->vm_fd, MARKER ".tmp", r->vm_fd, MARKER) < 0 ||
        fsync(r->vm_fd) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", MARKER, g_strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    close(fd);
    return true;
}

static void
marker_remove(struct repo_vm *r)
{
    if (unlinkat(r->vm_fd, MARKER, 0) == 0) {
        fsync(r->vm_fd);
    }
}

static char *
marker_read(struct repo_vm *r)
{
    char buf[MAX_MARKER];
    int fd = openat(r->vm_fd, MARKER, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    ssize_t n;

    if (fd < 0) {
        return NULL;
    }
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) {
        return g_strdup("");
    }
    buf[n] = 0;
    return g_strdup(buf);
}

static json_t *
qga_call(struct qmp_client *c, const char *cmd, int timeout_ms, GError **errp)
{
    return qmp_client_call(c, cmd, NULL, timeout_ms, errp);
}

/* "frozen", "thawed", or NULL with *errp. */
static char *
freeze_status(struct qmp_client *c, int timeout_ms, GError **errp)
{
    json_t *r = qga_call(c, "guest-fsfreeze-status", timeout_ms, errp);
    char *s = NULL;

    if (r && json_is_string(r)) {
        s = g_strdup(json_string_value(r));
    } else if (r) {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "guest-fsfreeze-status: not a string");
    }
    json_decref(r);
    return s;
}

static struct qmp_client *
qga_open(struct ring *ring, const char *path, int timeout_ms, GError **errp)
{
    struct qmp_client *c =
        qmp_client_connect(ring, path, QMP_PARSER_QGA, timeout_ms, errp);

    if (c && !qga_client_sync(c, timeout_ms, errp)) {
        g_clear_pointer(&c, qmp_client_free);
    }
    return c;
}

bool
quiesce_recover(struct ring *ring, struct repo_vm *repo, int timeout_ms,
                GPtrArray *done, GError **errp)
{
    g_autofree char *path = marker_read(repo);
    g_autofree char *st = NULL;
    g_autoptr(GError) err = NULL;
    struct qmp_client *c;
    json_t *r;

    if (!path) {
        return true;
    }
    c = qga_open(ring, path, timeout_ms, &err);
    if (c) {
        st = freeze_status(c, timeout_ms, &err);
    }
    if (!st) {
        /* We cannot tell whether the guest is frozen: refuse to go on,
         * a backup now could freeze it a second time or miss the thaw. */
        g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                    "an earlier run may have left the guest frozen, and the "
                    "guest agent at %s does not answer: %s",
                    path, err->message);
        qmp_client_free(c);
        return false;
    }
    if (strcmp(st, "frozen") == 0) {
        r = qga_call(c, "guest-fsfreeze-thaw", timeout_ms, &err);
        json_decref(r);
        g_clear_pointer(&st, g_free);
        st = freeze_status(c, timeout_ms, NULL);
        if (g_strcmp0(st, "thawed") != 0) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                        "could not thaw the guest an earlier run left frozen: "
                        "%s",
                        err ? err->message : "still frozen");
            qmp_client_free(c);
            return false;
        }
        g_ptr_array_add(done, g_strdup("thawed the guest file systems an "
                                       "earlier run left frozen"));
    }
    qmp_client_free(c);
    marker_remove(repo);
    return true;
}

/* AUTO: note and go on crash-consistent.  REQUIRE: fail. */
static bool
policy(struct quiesce *q, GError *err, GError **errp)
{
    q->usable = false;
    if (q->mode == QUIESCE_REQUIRE) {
        g_propagate_prefixed_error(errp, err, "guest freeze required: ");
        return false;
    }
    g_ptr_array_add(q->warnings, g_strdup_printf("guest not frozen, backup is "
                                                 "crash-consistent: %s",
                                                 err->message));
    g_error_free(err);
    return true;
}

bool
quiesce_prepare(struct quiesce *q, GError **errp)
{
    GError *err = NULL;
    g_autofree char *st = NULL;

    if (q->mode == QUIESCE_OFF) {
        return true;
    }
    q->qga = qga_open(q->ring, q->qga_path, q->timeout_ms, &err);
    if (!q->qga) {
        return policy(q, err, errp);
    }
    st = freeze_status(q->qga, q->timeout_ms, &err);
    if (!st) {
        return policy(q, err, errp);
    }
    if (strcmp(st, "thawed") != 0) {
        /* Frozen by someone else: theirs to thaw, not ours. */
        g_set_error(&err, QMP_ERROR, QMP_ERROR_FAILED,
                    "the guest is already %s by someone else", st);
        return policy(q, err, errp);
    }
    q->usable = true;
    return true;
}

static void
hold_signals(struct quiesce *q)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, &q->saved_mask);
    q->signals_held = true;
}

static void
release_signals(struct quiesce *q)
{
    if (q->signals_held) {
        q->signals_held = false;
        sigprocmask(SIG_SETMASK, &q->saved_mask, NULL);
    }
}

bool
quiesce_freeze(struct quiesce *q, GError **errp)
{
    GError *err = NULL;
    json_t *r;

    if (!q->usable) {
        return true;
    }
    if (!marker_write(q->repo, q->qga_path, &err)) {
        return policy(q, err, errp);
    }
    /* Until the thaw has answered, an interrupt must wait: dying here
     * would leave the guest frozen. */
    hold_signals(q);
    q->freeze_sent = true;
    r = qga_call(q->qga, "guest-fsfreeze-freeze", q->timeout_ms, &err);
    q->freeze_reply_us = g_get_monotonic_time();
    if (!r || !json_is_integer(r) || json_integer_value(r) < 0) {
        if (!err) {
            g_set_error(&err, QMP_ERROR, QMP_ERROR_PROTOCOL,
                        "guest-fsfreeze-freeze: not a count");
        }
        json_decref(r);
        /* A freeze that timed out may still take effect in the guest. */
        quiesce_thaw(q);
        return policy(q, err, errp);
    }
    q->frozen = (int)MIN(json_integer_value(r), G_MAXINT);
    json_decref(r);
    recover_crash_point("frozen");
    return true;
}

void
quiesce_thaw(struct quiesce *q)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *st = NULL;
    json_t *r;

    if (!q->freeze_sent || q->thawed) {
        return;
    }
    q->thaw_request_us = g_get_monotonic_time();
    r = qga_call(q->qga, "guest-fsfreeze-thaw", q->timeout_ms, &err);
    if (r && json_is_integer(r)) {
        q->thaw_count = (int)MIN(json_integer_value(r), G_MAXINT);
    }
    json_decref(r);
    st = freeze_status(q->qga, q->timeout_ms, err ? NULL : &err);
    if (g_strcmp0(st, "thawed") == 0) {
        q->thawed = true;
        marker_remove(q->repo);
    } else {
        /* The marker stays: the next run thaws the guest first. */
        g_ptr_array_add(q->warnings,
                        g_strdup_printf("guest thaw not confirmed (%s); the "
                                        "next qbak run will thaw it",
                                        err  ? err->message
                                        : st ? st
                                             : "no status"));
    }
    release_signals(q);
}

const char *
quiesce_consistency(const struct quiesce *q)
{
    return q->frozen > 0 && q->thaw_count == q->frozen ? "filesystem" : "crash";
}

json_t *
quiesce_json(const struct quiesce *q)
{
    g_autofree char *joined = NULL;
    json_t *warning;

    g_ptr_array_add(q->warnings, NULL);
    joined = g_strjoinv("; ", (char **)q->warnings->pdata);
    g_ptr_array_remove_index(q->warnings, q->warnings->len - 1);
    warning = q->warnings->len ? json_string(joined) : json_null();

    if (q->mode == QUIESCE_OFF) {
        json_decref(warning);
        return json_null();
    }
    return json_pack(
        "{s:i, s:o?, s:o}", "filesystems", MAX(q->frozen, 0), "window_ms",
        q->frozen >= 0 && q->thaw_request_us
            ? json_real((double)(q->thaw_request_us - q->freeze_reply_us) /
                        1000.0)
            : NULL,
        "warning", warning);
}

GPtrArray *
quiesce_warnings(const struct quiesce *q)
{
    return q->warnings;
}

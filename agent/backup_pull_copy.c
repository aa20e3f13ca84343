/* Pull mode's NBD side: QEMU's export of each disk's point, qbak's
 * connection to it and the copy loop.  See backup_pull.h. */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent/backup_int.h"
#include "agent/backup_pull.h"
#include "agent/backup_pull_int.h"
#include "agent/progress.h"
#include "agent/pull_copy.h"
#include "agent/recover.h"
#include "io/nbd_client.h"

/* Readers of the points, the bitmaps an incremental reads, QEMU's NBD
 * server on the listening socket handed over as fdname, and an export per
 * disk: one round trip. */
static bool
export_points(struct backup *b, const char *fdname, GError **errp)
{
    struct pull *p = b->pull;
    guint n = b->disks->len;
    json_t *actions = json_array();
    struct qmp_batch bt;
    g_autoptr(GError) err = NULL;

    qmp_batch_init(&bt, 2 * n + 2);
    /* Only after the point: a filter with a parent unshares writes on its
     * node, which the device still held before the switch. */
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        qmp_batch_add(&bt, d->name, "blockdev-add",
                      json_pack("{s:s, s:s, s:s}", "driver", "snapshot-access",
                                "node-name", pd->acc, "file", pd->cbw),
                      &pd->acc_added, true);
    }
    /* An incremental reads what the previous generation recorded: a
     * frozen copy of it, taken after the point, holds every write since
     * the previous point (and maybe a few after this one, read from the
     * snapshot all the same).  The previous generation stays as it is. */
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        if (d->full) {
            continue;
        }
        json_array_append_new(actions,
                              json_pack("{s:s, s:{s:s, s:s, s:b, s:b}}", "type",
                                        "block-dirty-bitmap-add", "data",
                                        "node", d->node, "name", pd->exp_bitmap,
                                        "persistent", 0, "disabled", 1));
        json_array_append_new(
            actions,
            json_pack("{s:s, s:{s:s, s:s, s:[s]}}", "type",
                      "block-dirty-bitmap-merge", "data", "node", d->node,
                      "target", pd->exp_bitmap, "bitmaps", d->prev_bitmap));
    }
    if (json_array_size(actions) > 0) {
        qmp_batch_add(&bt, "bitmaps", "transaction",
                      json_pack("{s:o}", "actions", actions), NULL, true);
    } else {
        json_decref(actions);
    }
    /* QEMU has one NBD server: someone else's may be running. */
    qmp_batch_add(&bt,
                  "NBD (pull mode needs QEMU's NBD server; with it in use "
                  "elsewhere, use --mode push)",
                  "nbd-server-start",
                  json_pack("{s:{s:s, s:{s:s}}, s:i}", "addr", "type", "fd",
                            "data", "str", fdname, "max-connections", (int)n),
                  &p->server_started, true);
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        json_t *args = json_pack("{s:s, s:s, s:s, s:s, s:b}", "type", "nbd",
                                 "id", pd->export_id, "node-name", pd->acc,
                                 "name", d->name, "writable", 0);
        if (!d->full) {
            json_object_set_new(args, "bitmaps",
                                json_pack("[{s:s, s:s}]", "node", d->node,
                                          "name", pd->exp_bitmap));
        }
        qmp_batch_add(&bt, d->name, "block-export-add", args, &pd->export_added,
                      true);
    }
    qmp_batch_run(b->qmp, &bt, b->opts->timeout_ms, NULL, &err);
    /* Removed afterwards even if the transaction seemed to fail: without
     * a reply (a timeout) it may have happened all the same. */
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        pd->bitmap_added = !d->full;
    }
    if (err) {
        g_propagate_error(errp, g_steal_pointer(&err));
        return false;
    }
    return true;
}

void
pull_drop_listener(struct pull *p)
{
    if (p->lfd >= 0) {
        close(p->lfd);
        p->lfd = -1;
    }
    if (p->sock_dir) {
        g_autofree char *path = g_build_filename(p->sock_dir, "nbd", NULL);
        unlink(path);
        rmdir(p->sock_dir);
        g_clear_pointer(&p->sock_dir, g_free);
    }
}

bool
pull_make_listener(struct pull *p, guint n, GError **errp)
{
    g_autofree char *path = NULL;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};

    p->sock_dir = g_dir_make_tmp("qbak-XXXXXX", NULL);
    if (!p->sock_dir) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "NBD socket directory: %s", g_strerror(errno));
        return false;
    }
    path = g_build_filename(p->sock_dir, "nbd", NULL);
    g_strlcpy(sa.sun_path, path, sizeof(sa.sun_path));
    p->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (p->lfd < 0 || bind(p->lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        listen(p->lfd, (int)n) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "NBD socket: %s", g_strerror(errno));
        pull_drop_listener(p);
        return false;
    }
    return true;
}

/* QEMU's NBD server listens on a socket qbak made in a private directory
 * (pull_make_listener) and handed over (getfd): qbak connects once per disk,
 * then removes the socket's name; the server takes no more connections
 * than that. */
static bool
start_server(struct backup *b, int *conn_fds, GError **errp)
{
    struct pull *p = b->pull;
    g_autofree char *path = g_build_filename(p->sock_dir, "nbd", NULL);
    g_autofree char *fdname = recover_qemu_prefix(b->repo);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    guint n = b->disks->len, k = 0;
    bool ok = false;

    g_strlcpy(sa.sun_path, path, sizeof(sa.sun_path));
    fdname[strlen(fdname) - 1] = 0;
    json_decref(qmp_client_call_fd(b->qmp, "getfd",
                                   json_pack("{s:s}", "fdname", fdname), p->lfd,
                                   b->opts->timeout_ms, NULL));
    if (!export_points(b, fdname, errp)) {
        goto out;
    }
    for (k = 0; k < n; k++) {
        conn_fds[k] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (conn_fds[k] < 0 ||
            connect(conn_fds[k], (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                        "NBD connect: %s", g_strerror(errno));
            goto out;
        }
    }
    ok = true;
out:
    if (!ok) {
        for (guint i = 0; i < n && i <= k; i++) {
            if (conn_fds[i] >= 0) {
                close(conn_fds[i]);
                conn_fds[i] = -1;
            }
        }
    }
    pull_drop_listener(p);
    return ok;
}

static void
measure_scratch(struct pull *p)
{
    uint64_t sum = 0;

    for (guint k = 0; k < p->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        struct stat st;
        if (pd->scratch_fd >= 0 && fstat(pd->scratch_fd, &st) == 0) {
            sum += (uint64_t)st.st_blocks * 512;
        }
    }
    p->scratch_peak = MAX(p->scratch_peak, sum);
}

static bool
connect_disk(struct backup *b, struct disk *d, struct pull_disk *pd, int fd,
             GError **errp)
{
    g_autofree char *ctx = NULL;
    const char *contexts[2] = {LIBNBD_CONTEXT_BASE_ALLOCATION, NULL};

    /* An incremental asks for the bitmap alone (agent/pull_copy.c). */
    if (!d->full) {
        ctx = g_strdup_printf("qemu:dirty-bitmap:%s", pd->exp_bitmap);
        contexts[0] = ctx;
    }
    pd->client = nbd_client_connect(&b->ring, fd, d->name, contexts,
                                    b->opts->timeout_ms, errp);
    if (!pd->client) {
        g_prefix_error(errp, "%s: ", d->name);
        return false;
    }
    if (nbd_client_size(pd->client) != d->size ||
        !nbd_client_has_context(pd->client, contexts[0])) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: QEMU's export lacks the size or a meta context",
                    d->name);
        return false;
    }
    pd->copy = pull_copy_new(&b->ring, pd->client, d->target, d->size,
                             b->opts->cluster_bits, ctx,
                             (gint64)b->opts->stall_ms * 1000);
    pull_copy_set_speed(pd->copy, b->opts->speed);
    return true;
}

/* The point is still whole: a snapshot broken during the copy (scratch
 * full or failing) fails every read from then on, so one read after all
 * the others proves none of them saw a broken snapshot. */
static bool
check_snapshot(struct backup *b, struct disk *d, struct pull_disk *pd,
               GError **errp)
{
    static char buf[512];

    if (nbd_pread(nbd_client_handle(pd->client), buf, sizeof(buf), 0, 0) < 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: the point in time broke during the copy (scratch "
                    "full or failing?): %s",
                    d->name, nbd_get_error());
        return false;
    }
    return true;
}

/* Sets each disk's progress once every disk's total is known (as push
 * mode's first line has QEMU's totals); false until then. */
static bool
set_progress(struct backup *b, struct progress *prog)
{
    struct pull *p = b->pull;
    uint64_t done, total;

    for (guint k = 0; k < b->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        if (!pull_copy_progress(pd->copy, &done, &total)) {
            return false;
        }
    }
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        pull_copy_progress(pd->copy, &done, &total);
        progress_set(prog, d->name, done, total);
    }
    return true;
}

/* The copy loop: libnbd's reads and io_uring's writes, driven by one
 * ring.  The progress line is set a few times a second at most, from
 * counters: no system call per request. */
static bool
copy_loop(struct backup *b, struct progress *prog, GError **errp)
{
    struct pull *p = b->pull;
    guint n = b->disks->len;
    gint64 last_measure = 0, last_progress = 0;

    for (;;) {
        bool all_done = true;
        gint64 now = g_get_monotonic_time();
        int wait_ms = 250;

        if (backup_interrupted) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INTR,
                        "interrupted by a signal");
            return false;
        }
        for (guint k = 0; k < n; k++) {
            struct disk *d = b->disks->pdata[k];
            struct pull_disk *pd = p->disks->pdata[k];
            pull_copy_step(pd->copy);
            if (pull_copy_error(pd->copy)) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s: %s",
                            d->name, pull_copy_error(pd->copy));
                measure_scratch(p);
                return false;
            }
            all_done &= pull_copy_done(pd->copy);
            if (pull_copy_wait_ms(pd->copy) > 0) {
                wait_ms = MIN(wait_ms, pull_copy_wait_ms(pd->copy));
            }
        }
        if (now - last_measure > 50000) {
            measure_scratch(p);
            last_measure = now;
        }
        if (prog && now - last_progress > 250000 && set_progress(b, prog)) {
            progress_show(prog);
            last_progress = now;
        }
        if (all_done) {
            set_progress(b, prog);
            return true;
        }
        ring_run_once(&b->ring, wait_ms);
    }
}

/* Every thread of qbak (io_uring's workers too) to nice value `to`; the
 * value before, or INT_MIN when unknown or already `to`.  Per thread: Linux's
 * setpriority(PRIO_PROCESS) sets one thread's. */
static int
renice(int to)
{
    GDir *dir = g_dir_open("/proc/self/task", 0, NULL);
    const char *tid;
    int before;

    errno = 0;
    before = getpriority(PRIO_PROCESS, 0);
    if (errno || !dir || before == to) {
        if (dir) {
            g_dir_close(dir);
        }
        return INT_MIN;
    }
    while ((tid = g_dir_read_name(dir))) {
        setpriority(PRIO_PROCESS, (id_t)atoi(tid), to);
    }
    g_dir_close(dir);
    return before;
}

bool
backup_pull_copy(struct backup *b, GError **errp)
{
    struct pull *p = b->pull;
    guint n = b->disks->len;
    g_autofree int *fds = g_new(int, n);
    struct progress *prog;
    int nice_before;
    bool ok = true;

    for (guint k = 0; k < n; k++) {
        fds[k] = -1;
    }
    if (!start_server(b, fds, errp)) {
        return false;
    }
    backup_trace(b, "NBD exports started");
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        if (ok) {
            ok = connect_disk(b, d, pd, fds[k], errp);
        } else {
            close(fds[k]);
        }
    }
    if (!ok) {
        return false;
    }
    backup_trace(b, "NBD connected");
    recover_crash_point("running");
    prog = backup_progress_new(b);
    for (guint k = 0; prog && k < n; k++) {
        pull_copy_count(((struct pull_disk *)p->disks->pdata[k])->copy);
    }
    /* The guest's vCPUs and QEMU's main loop (which serves both the
     * guest's I/O and the export) share the CPUs with the copy: at a
     * lower priority the copy takes what they leave.  Only now, after the
     * point: the freeze window runs at full priority.  Measured on 2
     * cores (TCG guest, a full of 1 GiB): guest O_DIRECT write median
     * 3.1x that of no backup at nice 0, 1.5x at 19; the copy 1.4x
     * longer. */
    nice_before = INT_MIN;
    errno = 0;
    if (b->opts->nice > getpriority(PRIO_PROCESS, 0) && !errno) {
        nice_before = renice(b->opts->nice);
    }
    ok = copy_loop(b, prog, errp);
    if (nice_before != INT_MIN) {
        renice(nice_before); /* fails without CAP_SYS_NICE: stays low */
    }
    progress_end(prog, ok);
    if (!ok) {
        return false;
    }
    backup_trace(b, "copied");
    measure_scratch(p);
    recover_crash_point("pending");
    for (guint k = 0; k < n; k++) {
        if (!check_snapshot(b, b->disks->pdata[k], p->disks->pdata[k], errp)) {
            return false;
        }
    }
    return true;
}

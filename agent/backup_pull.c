/* Pull mode's QEMU side: fleecing per disk, the NBD export, teardown and
 * recovery.  See backup_pull.h.
 *
 * Graph per disk, built bottom-up before the point in time:
 *
 *   device --> cbw (copy-before-write) --file--> the disk's node
 *                  \--target--> scratch (qcow2) --> raw (size: limit)
 *                                                     --> file (scratch dir)
 *   snapshot-access (--file--> cbw) <-- QEMU's NBD export <-- qbak (libnbd)
 *
 * The point in time is the moment the device's writes start going through
 * the filter: from then on it copies old data to scratch before a guest
 * write lands.  With one disk that is a qom-set of the device's drive to
 * the filter.  With several, every disk's point must be the same instant,
 * and QMP has no transaction for qom-set: each device first goes onto a
 * pass node (raw, no offset: it passes everything through) above its own
 * node, before the point; then one blockdev-reopen turns every pass
 * node's file child to its filter.  QEMU drains all of them around one
 * reopen, so no guest write lands on any disk while some disks are
 * switched and others not, and the vCPUs never stop:
 *
 *   device --> pass (raw) --file--> the disk's node      before the point
 *   device --> pass (raw) --file--> cbw --file--> node    after it
 *
 * The raw layer bounds the scratch file: a copy past
 * the limit fails with ENOSPC, which, like any scratch failure or a copy
 * slower than cbw-timeout, breaks the snapshot (on-cbw-error=
 * break-snapshot) and lets the guest's write through: the backup fails
 * (reads of the point then fail), the guest never sees an error.
 * The scratch file node ignores flushes: guest flushes pass through the
 * filter to its target, and scratch is worth nothing after a crash. */
#include "agent/backup_pull.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent/backup_int.h"
#include "agent/error.h"
#include "agent/progress.h"
#include "agent/pull_copy.h"
#include "agent/recover.h"
#include "io/nbd_client.h"

#define MARKER ".pull-pending"
/* Guest writes wait at most this long for a copy to scratch (QEMU's
 * cbw-timeout, seconds); a slower copy breaks the backup instead. */
#define CBW_TIMEOUT_S 5
#define SCRATCH_CLUSTER_BITS 16

struct pull_disk {
    char *qdev;
    char *scr, *cbw, *acc, *exp_bitmap, *export_id;
    char *pass; /* several disks: a raw node the device sits on (below) */
    char *scratch_path;
    int scratch_fd; /* read-only, to measure the scratch file */
    uint64_t scratch_limit;
    bool scr_added, cbw_added, acc_added, bitmap_added, export_added;
    bool pass_added, pass_on_cbw;
    bool swapped; /* the device is off its own node (on pass or cbw) */
    struct nbd_client *client;
    struct pull_copy *copy;
};

/* Several QMP commands in one round trip (qmp_client_call_many), each
 * with the flag it sets on success, so what was done can be undone. */
struct batch {
    struct qmp_call *calls;
    struct batch_flag {
        const char *what;
        bool *flag; /* set to value on success (NULL: none) */
        bool value;
    } * flags;
    size_t n, cap;
};

struct pull {
    GPtrArray *disks; /* struct pull_disk *, as b->disks */
    bool multi;       /* several disks: the point goes through pass nodes */
    struct batch teardown; /* sent, replies awaited (calls non-NULL) */
    bool teardown_on_cbw;  /* false once the pass nodes left the filters */
    bool server_started;
    bool marker;
    /* The NBD server's listening socket, made before the point (a mkdir
     * of a busy file system once took 135 ms after it); -1, NULL once
     * the server has it. */
    int lfd;
    char *sock_dir;
    uint64_t scratch_peak;
};

static bool make_listener(struct pull *p, guint n, GError **errp);
static void drop_listener(struct pull *p);

static json_t *
call(struct backup *b, const char *cmd, json_t *args, GError **errp)
{
    return qmp_client_call(b->qmp, cmd, args, b->opts->timeout_ms, errp);
}

static bool
call_ok(struct backup *b, const char *what, const char *cmd, json_t *args,
        GError **errp)
{
    json_t *r = call(b, cmd, args, errp);

    if (!r) {
        g_prefix_error(errp, "%s: ", what);
        return false;
    }
    json_decref(r);
    return true;
}

static void
batch_init(struct batch *bt, size_t cap)
{
    bt->calls = g_new0(struct qmp_call, cap);
    bt->flags = g_new0(struct batch_flag, cap);
    bt->n = 0;
    bt->cap = cap;
}

/* args taken. */
static void
batch_add(struct batch *bt, const char *what, const char *cmd, json_t *args,
          bool *flag, bool value)
{
    g_assert(bt->n < bt->cap);
    bt->calls[bt->n].cmd = cmd;
    bt->calls[bt->n].args = args;
    bt->flags[bt->n] = (struct batch_flag){what, flag, value};
    bt->n++;
}

/* Waits for a sent batch's replies, sets the flags and frees the batch.
 * The first failure goes to errp (NULL: none wanted), every failure to
 * warnings (NULL: none wanted). */
static bool
batch_finish(struct backup *b, struct batch *bt, GPtrArray *warnings,
             GError **errp)
{
    bool ok =
        qmp_client_wait_many(b->qmp, bt->calls, bt->n, b->opts->timeout_ms);

    for (size_t i = 0; i < bt->n; i++) {
        struct batch_flag *f = &bt->flags[i];
        GError *e = bt->calls[i].error;
        if (!e) {
            if (f->flag) {
                *f->flag = f->value;
            }
            continue;
        }
        if (warnings) {
            g_ptr_array_add(warnings,
                            g_strdup_printf("%s: %s", f->what, e->message));
        }
        if (errp && !*errp) {
            g_set_error(errp, e->domain, e->code, "%s: %s", f->what,
                        e->message);
        }
    }
    qmp_calls_clear(bt->calls, bt->n);
    g_free(bt->calls);
    g_free(bt->flags);
    bt->calls = NULL;
    bt->flags = NULL;
    return ok;
}

/* Sends the batch, waits for it: batch_finish's. */
static bool
batch_run(struct backup *b, struct batch *bt, GPtrArray *warnings,
          GError **errp)
{
    qmp_client_send_many(b->qmp, bt->calls, bt->n, b->opts->timeout_ms);
    return batch_finish(b, bt, warnings, errp);
}

/* The device's QOM path, from query-block. */
static char *
qdev_of(struct backup *b, struct disk *d)
{
    size_t i;
    json_t *dev;

    json_array_foreach(b->block, i, dev)
    {
        json_t *ins = json_object_get(dev, "inserted");
        if (g_strcmp0(json_string_value(json_object_get(ins, "node-name")),
                      d->node) == 0) {
            return g_strdup(json_string_value(json_object_get(dev, "qdev")));
        }
    }
    return NULL;
}

static char *
scratch_name(struct repo_vm *r, unsigned k)
{
    return g_strdup_printf("qbak-%.8s-%u.scratch", r->vm_id, k);
}

/* The marker lists what this run may create, written before the first
 * change, so recovery finds all of it after SIGKILL.  Not fsynced: only a
 * host crash loses it, and that ends QEMU and everything in it too; a
 * scratch file left then is replaced by the next backup of the VM (the
 * names are fixed per disk).  Two fsyncs cost more than the rest of a
 * small incremental's set-up on a busy disk. */
static bool
write_marker(struct backup *b, GError **errp)
{
    struct pull *p = b->pull;
    json_t *disks = json_array(), *m;
    g_autofree char *text = NULL;
    int fd;
    bool ok;

    for (guint k = 0; k < p->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        struct disk *d = b->disks->pdata[k];
        json_array_append_new(
            disks,
            json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "qdev",
                      pd->qdev, "node", d->node, "scratch", pd->scratch_path,
                      "scr", pd->scr, "cbw", pd->cbw, "acc", pd->acc, "bitmap",
                      pd->exp_bitmap, "export", pd->export_id));
        if (pd->pass) {
            json_object_set_new(json_array_get(disks, k), "pass",
                                json_string(pd->pass));
        }
    }
    m = json_pack("{s:o}", "disks", disks);
    text = json_dumps(m, JSON_COMPACT);
    json_decref(m);
    fd = openat(b->repo->vm_fd, MARKER ".tmp",
                O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    ok = fd >= 0 && write(fd, text, strlen(text)) == (ssize_t)strlen(text) &&
         renameat(b->repo->vm_fd, MARKER ".tmp", b->repo->vm_fd, MARKER) == 0;
    if (!ok) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", MARKER, g_strerror(errno));
    }
    if (fd >= 0) {
        close(fd);
    }
    p->marker = ok;
    return ok;
}

/* An empty qcow2 image of the disk's size, its file stretched (sparse) to
 * the limit: QEMU's raw layer refuses a size beyond its file. */
static bool
make_scratch(struct pull_disk *pd, uint64_t size, GError **errp)
{
    struct qcow2_writer *w;
    int fd;
    bool ok;

    unlink(pd->scratch_path);
    fd = open(pd->scratch_path,
              O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "scratch %s: %s", pd->scratch_path, g_strerror(errno));
        return false;
    }
    w = qcow2_writer_new(fd, size, SCRATCH_CLUSTER_BITS, NULL, NULL, errp);
    ok = w && qcow2_writer_finish(w, errp);
    qcow2_writer_free(w);
    if (ok && ftruncate(fd, (off_t)pd->scratch_limit) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "scratch %s: %s", pd->scratch_path, g_strerror(errno));
        ok = false;
    }
    if (!ok) {
        close(fd);
        g_prefix_error(errp, "scratch %s: ", pd->scratch_path);
        return false;
    }
    close(fd);
    pd->scratch_fd = open(pd->scratch_path, O_RDONLY | O_CLOEXEC);
    return true;
}

/* A pass node's options, its file child `file` (blockdev-add and
 * blockdev-reopen alike: a reopen resets what it does not name). */
static json_t *
pass_options(struct pull_disk *pd, const char *file)
{
    return json_pack("{s:s, s:s, s:s, s:s}", "driver", "raw", "node-name",
                     pd->pass, "file", file, "discard", "unmap");
}

/* Test-only: QBAK_TEST_POINT_GAP_MS spreads the per-disk changes to QEMU's
 * graph out in time, so a test can prove the point is one instant anyway
 * (tests/integration/test-pull-atomic.py). */
static void
test_point_gap(void)
{
    const char *ms = getenv("QBAK_TEST_POINT_GAP_MS");

    if (ms) {
        g_usleep((gulong)atol(ms) * 1000);
    }
}

/* The point for several disks: one reopen turns every pass node to its
 * filter (to_cbw) or back to the disk's own node. */
static bool
reopen_passes(struct backup *b, bool to_cbw, GError **errp)
{
    struct pull *p = b->pull;
    json_t *opts = json_array();

    for (guint k = 0; k < p->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        if (pd->pass_added && pd->pass_on_cbw != to_cbw) {
            json_array_append_new(opts,
                                  pass_options(pd, to_cbw ? pd->cbw : d->node));
        }
    }
    if (json_array_size(opts) == 0) {
        json_decref(opts);
        return true;
    }
    if (!call_ok(b, "disks", "blockdev-reopen",
                 json_pack("{s:o}", "options", opts), errp)) {
        return false;
    }
    for (guint k = 0; k < p->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        if (pd->pass_added) {
            pd->pass_on_cbw = to_cbw;
        }
    }
    return true;
}

static bool
add_nodes(struct backup *b, struct disk *d, struct pull_disk *pd, GError **errp)
{
    struct batch bt;

    batch_init(&bt, 5);
    batch_add(&bt, d->name, "blockdev-add",
              json_pack("{s:s, s:s, s:{s:b}, s:{s:s, s:I, s:{s:s, s:s, "
                        "s:{s:b}}}}",
                        "driver", "qcow2", "node-name", pd->scr, "cache",
                        "no-flush", 1, "file", "driver", "raw", "size",
                        (json_int_t)pd->scratch_limit, "file", "driver", "file",
                        "filename", pd->scratch_path, "cache", "no-flush", 1),
              &pd->scr_added, true);
    /* discard=unmap on the nodes put above the disk's: a node without it
     * drops the guest's discards instead of passing them down. */
    batch_add(&bt, d->name, "blockdev-add",
              json_pack("{s:s, s:s, s:s, s:s, s:s, s:i, s:s}", "driver",
                        "copy-before-write", "node-name", pd->cbw, "file",
                        d->node, "target", pd->scr, "on-cbw-error",
                        "break-snapshot", "cbw-timeout", CBW_TIMEOUT_S,
                        "discard", "unmap"),
              &pd->cbw_added, true);
    /* The bitmap of the next generation (raw images cannot store a
     * persistent one), in the same round trip: added before the point
     * in time, it records a superset of the writes after it, which is
     * safe; a failure undoes it with the rest. */
    batch_add(&bt, d->name, "block-dirty-bitmap-add",
              json_pack("{s:s, s:s, s:b}", "node", d->node, "name", d->bitmap,
                        "persistent", g_strcmp0(d->drv, "qcow2") == 0),
              &d->bitmap_added, true);
    if (pd->pass) {
        batch_add(&bt, d->name, "blockdev-add", pass_options(pd, d->node),
                  &pd->pass_added, true);
        batch_add(&bt, d->name, "qom-set",
                  json_pack("{s:s, s:s, s:s}", "path", pd->qdev, "property",
                            "drive", "value", pd->pass),
                  &pd->swapped, true);
    }
    if (!batch_run(b, &bt, NULL, errp)) {
        return false;
    }
    if (pd->pass) {
        test_point_gap();
    }
    return true;
}

bool
backup_pull_prepare(struct backup *b, GError **errp)
{
    const struct backup_opts *o = b->opts;
    int v = qmp_client_qemu_version(b->qmp);
    uint64_t total = 0;
    struct pull *p;

    if (v < BACKUP_PULL_MIN_QEMU) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "pull mode needs QEMU 7.1 or later (QEMU %d.%d has no "
                    "on-cbw-error=break-snapshot: a failing scratch would "
                    "fail guest writes); use --mode push",
                    v / 10000, v / 100 % 100);
        return false;
    }
    p = b->pull = g_new0(struct pull, 1);
    p->lfd = -1;
    p->disks = g_ptr_array_new();
    p->multi = b->disks->len > 1;
    for (guint k = 0; k < b->disks->len; k++) {
        total += ((struct disk *)b->disks->pdata[k])->size;
    }
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = g_new0(struct pull_disk, 1);
        g_autofree char *base = recover_node_name(b->repo, k);
        g_autofree char *sname = scratch_name(b->repo, k);

        g_ptr_array_add(p->disks, pd);
        pd->scratch_fd = -1;
        pd->qdev = qdev_of(b, d);
        if (!pd->qdev) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "%s: no device path in query-block", d->name);
            return false;
        }
        pd->scr = g_strdup_printf("%s-s", base);
        pd->cbw = g_strdup_printf("%s-f", base);
        pd->acc = g_strdup_printf("%s-a", base);
        pd->exp_bitmap = g_strdup_printf("%s-x", base);
        pd->export_id = g_strdup_printf("%s-e", base);
        if (p->multi) {
            pd->pass = g_strdup_printf("%s-p", base);
        }
        pd->scratch_path = g_build_filename(o->scratch_dir, sname, NULL);
        /* The limit is shared in proportion to the disks' sizes; without
         * one, scratch may hold the whole disk and its tables. */
        pd->scratch_limit = o->scratch_max
                                ? (uint64_t)((double)o->scratch_max *
                                             (double)d->size / (double)total)
                                : d->size + d->size / 64 + (8u << 20);
        pd->scratch_limit = MAX(pd->scratch_limit, 1u << 20) & ~UINT64_C(511);
    }
    if (!write_marker(b, errp)) {
        return false;
    }
    backup_trace(b, "pull marker written");
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];

        d->file = g_strdup_printf("%s.qcow2", d->name);
        d->target = backup_target_new(&b->ring, b->partial_fd, d->file, d->name,
                                      d->size, o->cluster_bits, d->backing_rel,
                                      d->backing, NULL, errp);
        if (!d->target || !make_scratch(pd, d->size, errp)) {
            return false;
        }
    }
    backup_trace(b, "targets and scratch made");
    return make_listener(p, b->disks->len, errp);
}

bool
backup_pull_add_nodes(struct backup *b, GError **errp)
{
    struct pull *p = b->pull;

    for (guint k = 0; k < b->disks->len; k++) {
        if (!add_nodes(b, b->disks->pdata[k], p->disks->pdata[k], errp)) {
            return false;
        }
    }
    return true;
}

bool
backup_pull_point(struct backup *b, GError **errp)
{
    struct pull *p = b->pull;

    /* Each device's writes go through its filter from here on: this is
     * the point in time (inside the freeze window when there is one), one
     * instant for all disks (see the top of this file). */
    if (p->multi) {
        if (!reopen_passes(b, true, errp)) {
            return false;
        }
    } else {
        struct disk *d = b->disks->pdata[0];
        struct pull_disk *pd = p->disks->pdata[0];
        if (!call_ok(b, d->name, "qom-set",
                     json_pack("{s:s, s:s, s:s}", "path", pd->qdev, "property",
                               "drive", "value", pd->cbw),
                     errp)) {
            return false;
        }
        pd->swapped = true;
    }
    recover_crash_point("transaction");
    return true;
}

/* Readers of the points, the bitmaps an incremental reads, QEMU's NBD
 * server on the listening socket handed over as fdname, and an export per
 * disk: one round trip. */
static bool
export_points(struct backup *b, const char *fdname, GError **errp)
{
    struct pull *p = b->pull;
    guint n = b->disks->len;
    json_t *actions = json_array();
    struct batch bt;
    g_autoptr(GError) err = NULL;

    batch_init(&bt, 2 * n + 2);
    /* Only after the point: a filter with a parent unshares writes on its
     * node, which the device still held before the switch. */
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        batch_add(&bt, d->name, "blockdev-add",
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
        batch_add(&bt, "bitmaps", "transaction",
                  json_pack("{s:o}", "actions", actions), NULL, true);
    } else {
        json_decref(actions);
    }
    /* QEMU has one NBD server: someone else's may be running. */
    batch_add(&bt,
              "NBD (pull mode needs QEMU's NBD server; with it in use "
              "elsewhere, use --mode push)",
              "nbd-server-start",
              json_pack("{s:{s:s, s:{s:s}}, s:i}", "addr", "type", "fd", "data",
                        "str", fdname, "max-connections", (int)n),
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
        batch_add(&bt, d->name, "block-export-add", args, &pd->export_added,
                  true);
    }
    batch_run(b, &bt, NULL, &err);
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

static void
drop_listener(struct pull *p)
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

static bool
make_listener(struct pull *p, guint n, GError **errp)
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
        drop_listener(p);
        return false;
    }
    return true;
}

/* QEMU's NBD server listens on a socket qbak made in a private directory
 * (make_listener) and handed over (getfd): qbak connects once per disk,
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
    drop_listener(p);
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

/* Queue the undoing of one step if it was done (args taken). */
static void
undo(struct batch *bt, bool *done, const char *what, const char *cmd,
     json_t *args)
{
    if (!*done) {
        json_decref(args);
        return;
    }
    batch_add(bt, what, cmd, args, done, false);
}

/* Everything qbak changed in QEMU, undone in one round trip; a failure is
 * a warning, and what stays is in the marker for the next run.  The
 * exports and the server go first, then the readers (with a parent, a
 * filter unshares writes on the disk's node), then the pass nodes leave
 * the filters, then the devices go back on their own nodes, then the
 * filters.  A failed step fails the ones that need it, harmlessly. */
static void
undo_send(struct backup *b)
{
    struct pull *p = b->pull;
    guint n = p->disks->len;
    json_t *reopen = json_array();
    struct batch *bt = &p->teardown;

    p->teardown_on_cbw = true;
    batch_init(bt, 8 * n + 2);
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        undo(bt, &pd->export_added, d->name, "block-export-del",
             json_pack("{s:s, s:s}", "id", pd->export_id, "mode", "hard"));
    }
    undo(bt, &p->server_started, "NBD", "nbd-server-stop", NULL);
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        undo(bt, &pd->acc_added, d->name, "blockdev-del",
             json_pack("{s:s}", "node-name", pd->acc));
        if (pd->pass_added && pd->pass_on_cbw) {
            json_array_append_new(reopen, pass_options(pd, d->node));
        }
    }
    if (json_array_size(reopen) > 0) {
        batch_add(bt, "disks", "blockdev-reopen",
                  json_pack("{s:o}", "options", reopen), &p->teardown_on_cbw,
                  false);
    } else {
        json_decref(reopen);
    }
    for (guint k = 0; k < n; k++) {
        struct disk *d = b->disks->pdata[k];
        struct pull_disk *pd = p->disks->pdata[k];
        undo(bt, &pd->swapped, d->name, "qom-set",
             json_pack("{s:s, s:s, s:s}", "path", pd->qdev, "property", "drive",
                       "value", d->node));
        undo(bt, &pd->pass_added, d->name, "blockdev-del",
             json_pack("{s:s}", "node-name", pd->pass));
        undo(bt, &pd->cbw_added, d->name, "blockdev-del",
             json_pack("{s:s}", "node-name", pd->cbw));
        undo(bt, &pd->scr_added, d->name, "blockdev-del",
             json_pack("{s:s}", "node-name", pd->scr));
        undo(bt, &pd->bitmap_added, d->name, "block-dirty-bitmap-remove",
             json_pack("{s:s, s:s}", "node", d->node, "name", pd->exp_bitmap));
    }
    qmp_client_send_many(b->qmp, bt->calls, bt->n, b->opts->timeout_ms);
}

static void
undo_finish(struct backup *b, GPtrArray *warnings)
{
    struct pull *p = b->pull;

    batch_finish(b, &p->teardown, warnings, NULL);
    for (guint k = 0; k < p->disks->len && !p->teardown_on_cbw; k++) {
        ((struct pull_disk *)p->disks->pdata[k])->pass_on_cbw = false;
    }
}

void
backup_pull_release_start(struct backup *b)
{
    struct pull *p = b->pull;

    if (!p || p->teardown.calls) {
        return;
    }
    for (guint k = 0; k < p->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        /* The client first: reads in flight end with it. */
        g_clear_pointer(&pd->client, nbd_client_free);
        g_clear_pointer(&pd->copy, pull_copy_free);
    }
    if (b->qmp) {
        undo_send(b);
    }
}

void
backup_pull_release(struct backup *b, GPtrArray *warnings)
{
    struct pull *p = b->pull;
    bool all_undone = true;

    if (!p) {
        return;
    }
    backup_pull_release_start(b);
    if (p->teardown.calls) {
        undo_finish(b, warnings);
    }
    for (guint k = 0; k < p->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        all_undone &= !pd->swapped && !pd->acc_added && !pd->pass_added &&
                      !pd->cbw_added && !pd->scr_added;
        if (pd->scratch_fd >= 0) {
            close(pd->scratch_fd);
            pd->scratch_fd = -1;
        }
        if (pd->scratch_path && !pd->scr_added) {
            unlink(pd->scratch_path);
        }
    }
    /* Left for the next run's recovery if QEMU still holds something. */
    if (p->marker && (all_undone || !b->qmp)) {
        unlinkat(b->repo->vm_fd, MARKER, 0);
        p->marker = false;
    }
}

void
backup_pull_free(struct backup *b)
{
    struct pull *p = b->pull;

    if (!p) {
        return;
    }
    for (guint k = 0; k < p->disks->len; k++) {
        struct pull_disk *pd = p->disks->pdata[k];
        nbd_client_free(pd->client);
        pull_copy_free(pd->copy);
        if (pd->scratch_fd >= 0) {
            close(pd->scratch_fd);
        }
        g_free(pd->qdev);
        g_free(pd->scr);
        g_free(pd->cbw);
        g_free(pd->acc);
        g_free(pd->exp_bitmap);
        g_free(pd->export_id);
        g_free(pd->pass);
        g_free(pd->scratch_path);
        g_free(pd);
    }
    drop_listener(p);
    g_ptr_array_free(p->disks, true);
    g_free(p);
    b->pull = NULL;
}

void
backup_pull_result(struct backup *b, json_t *result)
{
    json_object_set_new(result, "mode", json_string(b->pull ? "pull" : "push"));
    json_object_set_new(result, "mode_reason",
                        json_string(b->mode_reason ? b->mode_reason : ""));
    if (b->pull) {
        json_object_set_new(result, "scratch_dir",
                            json_string(b->opts->scratch_dir));
        json_object_set_new(result, "scratch_peak_bytes",
                            json_integer((json_int_t)b->pull->scratch_peak));
    }
}

/* Recovery: one call, its failure (the thing is already gone) ignored. */
static void
try_call(struct qmp_client *qmp, int timeout_ms, const char *cmd, json_t *args,
         GPtrArray *done, const char *what)
{
    json_t *r = qmp_client_call(qmp, cmd, args, timeout_ms, NULL);

    if (r && what) {
        g_ptr_array_add(done, g_strdup(what));
    }
    json_decref(r);
}

bool
backup_pull_recover(struct qmp_client *qmp, struct repo_vm *r, int timeout_ms,
                    GPtrArray *done, GError **errp)
{
    g_autoptr(GError) err = NULL;
    json_t *m = repo_read_json(r->vm_fd, MARKER, &err);
    json_t *disk;
    size_t i;

    if (!m) {
        if (faccessat(r->vm_fd, MARKER, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
            /* A marker cut short by a crash: nothing was made after it. */
            unlinkat(r->vm_fd, MARKER, 0);
        }
        return true;
    }
    json_array_foreach(json_object_get(m, "disks"), i, disk)
    {
        const char *exp = json_string_value(json_object_get(disk, "export"));
        if (exp) {
            try_call(qmp, timeout_ms, "block-export-del",
                     json_pack("{s:s, s:s}", "id", exp, "mode", "hard"), done,
                     NULL);
        }
    }
    try_call(qmp, timeout_ms, "nbd-server-stop", NULL, done,
             "stopped the NBD server of an earlier pull run");
    json_array_foreach(json_object_get(m, "disks"), i, disk)
    {
        const char *qdev = json_string_value(json_object_get(disk, "qdev"));
        const char *node = json_string_value(json_object_get(disk, "node"));
        const char *scratch =
            json_string_value(json_object_get(disk, "scratch"));
        const char *pass = json_string_value(json_object_get(disk, "pass"));
        const char *names[] = {"acc", "pass", "cbw", "scr"};
        g_autofree char *what = NULL;

        if (!qdev || !node) {
            continue;
        }
        what = g_strdup_printf("put %s back on node %s (a fleecing filter "
                               "left by an earlier run)",
                               qdev, node);
        if (json_string_value(json_object_get(disk, "acc"))) {
            try_call(
                qmp, timeout_ms, "blockdev-del",
                json_pack("{s:O}", "node-name", json_object_get(disk, "acc")),
                done, NULL);
        }
        /* A pass node leaves the filter first: the filter, with a
         * parent, unshares writes on the disk's node. */
        if (pass) {
            try_call(qmp, timeout_ms, "blockdev-reopen",
                     json_pack("{s:[{s:s, s:s, s:s, s:s}]}", "options",
                               "driver", "raw", "node-name", pass, "file", node,
                               "discard", "unmap"),
                     done, NULL);
        }
        /* Only if the device sits on our filter or pass node now. */
        if (json_string_value(json_object_get(disk, "cbw"))) {
            json_t *cur = qmp_client_call(
                qmp, "qom-get",
                json_pack("{s:s, s:s}", "path", qdev, "property", "drive"),
                timeout_ms, NULL);
            const char *on = json_string_value(cur);
            if (on && (g_strcmp0(on, json_string_value(
                                         json_object_get(disk, "cbw"))) == 0 ||
                       g_strcmp0(on, pass) == 0)) {
                try_call(qmp, timeout_ms, "qom-set",
                         json_pack("{s:s, s:s, s:s}", "path", qdev, "property",
                                   "drive", "value", node),
                         done, what);
            }
            json_decref(cur);
        }
        for (unsigned j = 0; j < G_N_ELEMENTS(names); j++) {
            const char *nn = json_string_value(json_object_get(disk, names[j]));
            if (nn) {
                try_call(qmp, timeout_ms, "blockdev-del",
                         json_pack("{s:s}", "node-name", nn), done, NULL);
            }
        }
        if (json_string_value(json_object_get(disk, "bitmap"))) {
            try_call(qmp, timeout_ms, "block-dirty-bitmap-remove",
                     json_pack("{s:s, s:O}", "node", node, "name",
                               json_object_get(disk, "bitmap")),
                     done, NULL);
        }
        if (scratch && unlink(scratch) == 0) {
            g_ptr_array_add(
                done, g_strdup_printf("removed scratch file %s", scratch));
        }
    }
    json_decref(m);
    if (unlinkat(r->vm_fd, MARKER, 0) == 0) {
        fsync(r->vm_fd);
    }
    (void)errp;
    return true;
}

/* Pull mode's QEMU side: fleecing per disk, the point in time and the
 * teardown (the export and copy: backup_pull_copy.c; recovery after a
 * crash: backup_pull_recover.c).  See backup_pull.h.
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
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent/backup_int.h"
#include "agent/backup_pull_int.h"
#include "agent/error.h"
#include "agent/pull_copy.h"
#include "agent/recover.h"
#include "io/nbd_client.h"
#include "qmp/batch.h"

/* Guest writes wait at most this long for a copy to scratch (QEMU's
 * cbw-timeout, seconds); a slower copy breaks the backup instead. */
#define CBW_TIMEOUT_S 5
#define SCRATCH_CLUSTER_BITS 16

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
    fd = openat(b->repo->vm_fd, PULL_MARKER ".tmp",
                O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    ok = fd >= 0 && write(fd, text, strlen(text)) == (ssize_t)strlen(text) &&
         renameat(b->repo->vm_fd, PULL_MARKER ".tmp", b->repo->vm_fd,
                  PULL_MARKER) == 0;
    if (!ok) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", PULL_MARKER, g_strerror(errno));
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
    struct qmp_batch bt;

    qmp_batch_init(&bt, 5);
    qmp_batch_add(&bt, d->name, "blockdev-add",
                  json_pack("{s:s, s:s, s:{s:b}, s:{s:s, s:I, s:{s:s, s:s, "
                            "s:{s:b}}}}",
                            "driver", "qcow2", "node-name", pd->scr, "cache",
                            "no-flush", 1, "file", "driver", "raw", "size",
                            (json_int_t)pd->scratch_limit, "file", "driver",
                            "file", "filename", pd->scratch_path, "cache",
                            "no-flush", 1),
                  &pd->scr_added, true);
    /* discard=unmap on the nodes put above the disk's: a node without it
     * drops the guest's discards instead of passing them down. */
    qmp_batch_add(&bt, d->name, "blockdev-add",
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
    qmp_batch_add(&bt, d->name, "block-dirty-bitmap-add",
                  json_pack("{s:s, s:s, s:b}", "node", d->node, "name",
                            d->bitmap, "persistent",
                            g_strcmp0(d->drv, "qcow2") == 0),
                  &d->bitmap_added, true);
    if (pd->pass) {
        qmp_batch_add(&bt, d->name, "blockdev-add", pass_options(pd, d->node),
                      &pd->pass_added, true);
        qmp_batch_add(&bt, d->name, "qom-set",
                      json_pack("{s:s, s:s, s:s}", "path", pd->qdev, "property",
                                "drive", "value", pd->pass),
                      &pd->swapped, true);
    }
    if (!qmp_batch_run(b->qmp, &bt, b->opts->timeout_ms, NULL, errp)) {
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
    return pull_make_listener(p, b->disks->len, errp);
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

/* Queue the undoing of one step if it was done (args taken). */
static void
undo(struct qmp_batch *bt, bool *done, const char *what, const char *cmd,
     json_t *args)
{
    if (!*done) {
        json_decref(args);
        return;
    }
    qmp_batch_add(bt, what, cmd, args, done, false);
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
    struct qmp_batch *bt = &p->teardown;

    p->teardown_on_cbw = true;
    qmp_batch_init(bt, 8 * n + 2);
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
        qmp_batch_add(bt, "disks", "blockdev-reopen",
                      json_pack("{s:o}", "options", reopen),
                      &p->teardown_on_cbw, false);
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
    qmp_batch_send(b->qmp, bt, b->opts->timeout_ms);
}

static void
undo_finish(struct backup *b, GPtrArray *warnings)
{
    struct pull *p = b->pull;

    qmp_batch_finish(b->qmp, &p->teardown, b->opts->timeout_ms, warnings, NULL);
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
        unlinkat(b->repo->vm_fd, PULL_MARKER, 0);
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
    pull_drop_listener(p);
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

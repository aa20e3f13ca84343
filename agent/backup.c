/* The backup state machine: plan, start in one transaction, receive, commit
 * before finalize.
 *
 * Why this order keeps "nothing lost": each point owns a persistent bitmap
 * generation, added just before the transaction, so it records a superset
 * of the writes after the point.  An incremental copies what the previous
 * generation recorded and leaves it untouched (bitmap-mode=never); the
 * previous generation is removed only after the new point is durable.  A
 * crash anywhere therefore leaves a generation that covers every change
 * since the last committed point, and a disk image swapped for an older
 * copy (which carries an older generation) is noticed and backed up in
 * full. */
#include "agent/backup.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "agent/backup_int.h"
#include "agent/backup_pull.h"
#include "agent/damage.h"
#include "agent/prune.h"
#include "agent/recover.h"
#include "agent/vm/settings.h"
#include "agent/vm/vmstate.h"
#include "io/lazy_libs.h"
#include "io/qcow2_sums.h"

#define RING_ENTRIES 256
/* Bytes QEMU copies per backup request (x-perf max-chunk): a cluster of
 * the default size. */
#define MAX_CHUNK 65536

volatile sig_atomic_t backup_interrupted;
/* Guest agent calls wait the --timeout, at most this long (a freeze that
 * takes longer is not worth waiting for). */
#define QGA_TIMEOUT_MAX_MS 10000

/* --verbose: where the time goes, phase by phase. */
void
backup_trace(struct backup *b, const char *phase)
{
    if (b->opts->verbose) {
        fprintf(stderr, "qbak: %8.1f ms  %s\n",
                (double)(g_get_monotonic_time() - b->start_us) / 1000.0, phase);
    }
}

static void
disk_free(struct disk *d)
{
    backup_target_free(d->target);
    qcow2_reader_free(d->backing);
    if (d->stale_bitmaps) {
        g_ptr_array_free(d->stale_bitmaps, true);
    }
    g_free(d->name);
    g_free(d->node);
    g_free(d->drv);
    g_free(d->reason);
    g_free(d->chain);
    g_free(d->bitmap);
    g_free(d->prev_bitmap);
    g_free(d->backing_rel);
    g_free(d->file);
    g_free(d->job_id);
    g_free(d->nbd_node);
    g_free(d);
}

/* The disk's name: its device id when the device has one. */
static char *
disk_name(json_t *dev, const char *node)
{
    const char *qdev = json_string_value(json_object_get(dev, "qdev"));
    const char *prefix = "/machine/peripheral/";

    if (qdev && g_str_has_prefix(qdev, prefix)) {
        const char *id = qdev + strlen(prefix);
        const char *end = strchr(id, '/');
        return end ? g_strndup(id, (gsize)(end - id)) : g_strdup(id);
    }
    return g_strdup(node);
}

static bool
wanted(const struct backup_opts *o, const char *name)
{
    if (!o->disks) {
        return true;
    }
    for (char **p = o->disks; *p; p++) {
        if (strcmp(*p, name) == 0) {
            return true;
        }
    }
    return false;
}

/* Every writable, non-empty block device with a guest device. */
static bool
discover_disks(struct backup *b, struct vm_settings_pending *settings,
               GError **errp)
{
    const struct backup_opts *o = b->opts;
    size_t i;
    json_t *dev;

    b->block = vm_settings_capture_query_block(settings, errp);
    if (!b->block) {
        return false;
    }
    if (!json_is_array(b->block)) {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "query-block: not an array");
        return false;
    }
    json_array_foreach(b->block, i, dev)
    {
        json_t *ins = json_object_get(dev, "inserted");
        const char *node = json_string_value(json_object_get(ins, "node-name"));
        json_t *vsize =
            json_object_get(json_object_get(ins, "image"), "virtual-size");
        struct disk *d;

        if (!json_is_object(ins) || !node || !json_object_get(dev, "qdev") ||
            json_is_true(json_object_get(ins, "ro"))) {
            continue;
        }
        if (!json_is_integer(vsize) || json_integer_value(vsize) <= 0) {
            continue;
        }
        d = g_new0(struct disk, 1);
        d->node = g_strdup(node);
        d->name = disk_name(dev, node);
        d->drv = g_strdup(json_string_value(json_object_get(ins, "drv")));
        d->size = (uint64_t)json_integer_value(vsize);
        d->standalone =
            g_strcmp0(d->drv, "qcow2") == 0 &&
            !json_object_get(ins, "backing_file") &&
            !json_object_get(json_object_get(ins, "image"), "backing-image");
        d->bitmaps = json_object_get(ins, "dirty-bitmaps");
        d->stale_bitmaps = g_ptr_array_new_with_free_func(g_free);
        if (!wanted(o, d->name)) {
            disk_free(d);
            continue;
        }
        if (!repo_name_valid(d->name, "disk", errp)) {
            disk_free(d);
            return false;
        }
        for (guint k = 0; k < b->disks->len; k++) {
            struct disk *other = b->disks->pdata[k];
            if (strcmp(other->name, d->name) == 0) {
                /* One's device id is the other's node name. */
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                            "two disks are named %s (nodes %s and %s): give "
                            "the devices ids that no node name uses",
                            d->name, other->node, d->node);
                disk_free(d);
                return false;
            }
        }
        g_ptr_array_add(b->disks, d);
    }
    for (char **p = o->disks; p && *p; p++) {
        bool found = false;
        for (guint k = 0; k < b->disks->len; k++) {
            found |= strcmp(((struct disk *)b->disks->pdata[k])->name, *p) == 0;
        }
        if (!found) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "%s: no such writable disk in the VM", *p);
            return false;
        }
    }
    if (b->disks->len == 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "the VM has no writable disk attached to a device");
        return false;
    }
    return true;
}

static json_t *
find_bitmap(json_t *bitmaps, const char *name)
{
    size_t i;
    json_t *bm;

    json_array_foreach(bitmaps, i, bm)
    {
        if (g_strcmp0(json_string_value(json_object_get(bm, "name")), name) ==
            0) {
            return bm;
        }
    }
    return NULL;
}

/* Why the chain's bitmap cannot carry an incremental, or NULL if it can. */
static char *
bitmap_problem(struct disk *d, json_t *last, const char *bitmap)
{
    json_t *bm = find_bitmap(d->bitmaps, bitmap);
    uint64_t last_size =
        (uint64_t)json_integer_value(json_object_get(last, "virtual_size"));

    if (!bm) {
        return g_strdup_printf("bitmap %s is missing (QEMU restarted with a "
                               "non-persistent bitmap, or it was removed)",
                               bitmap);
    }
    if (json_is_true(json_object_get(bm, "inconsistent"))) {
        return g_strdup_printf("bitmap %s is inconsistent (QEMU did not shut "
                               "down cleanly)",
                               bitmap);
    }
    if (json_is_true(json_object_get(bm, "busy"))) {
        return g_strdup_printf("bitmap %s is busy", bitmap);
    }
    if (!json_is_true(json_object_get(bm, "recording"))) {
        return g_strdup_printf("bitmap %s is not recording", bitmap);
    }
    if (last_size != d->size) {
        return g_strdup_printf("disk size changed from %" PRIu64 " to %" PRIu64,
                               last_size, d->size);
    }
    return NULL;
}

/* Why the chain of disk at point `last' cannot carry an incremental: a
 * point of it marked damaged (by verify, restore or a backup), missing, or
 * with a manifest that does not validate; NULL when none is. */
static char *
chain_damage(struct backup *b, struct restore_point *last, const char *disk)
{
    struct restore_point *p = last;

    for (unsigned depth = 0; depth < QCOW2_MAX_CHAIN_DEPTH; depth++) {
        const struct manifest_disk *md = manifest_disk(p->info, disk);
        json_auto_t *mark = damage_read(b->repo, p->id);
        const char *mdisk = json_string_value(json_object_get(mark, "disk"));
        g_autofree char *parent = NULL;
        const char *slash;

        if (mark && (!mdisk || strcmp(mdisk, disk) == 0)) {
            return g_strdup_printf(
                "point %s is damaged (found by %s): %s", p->id,
                json_string_value(json_object_get(mark, "found_by")),
                json_string_value(json_object_get(mark, "reason")));
        }
        if (!md) {
            return g_strdup_printf("point %s of the chain has no disk %s",
                                   p->id, disk);
        }
        if (md->full) {
            return NULL;
        }
        /* "../<point>/<file>", as plan_disk writes it */
        slash = g_str_has_prefix(md->backing, "../")
                    ? strchr(md->backing + 3, '/')
                    : NULL;
        if (!slash) {
            return g_strdup_printf("point %s: unexpected backing file %s",
                                   p->id, md->backing);
        }
        parent = g_strndup(md->backing + 3, (gsize)(slash - md->backing - 3));
        p = NULL;
        for (guint k = 0; k < b->points->len && !p; k++) {
            struct restore_point *q = b->points->pdata[k];
            p = strcmp(q->id, parent) == 0 ? q : NULL;
        }
        if (!p) {
            return g_strdup_printf("point %s of the chain is missing", parent);
        }
        if (p->damage) {
            return g_strdup_printf("point %s of the chain is damaged: %s",
                                   p->id, p->damage);
        }
    }
    return g_strdup("the chain is too long");
}

/* Decide full or incremental for one disk (see the bitmap rules above). */
static void
plan_disk(struct backup *b, struct disk *d)
{
    struct restore_point *last = NULL;
    json_t *entry = NULL;
    const char *damaged = NULL;
    const char *bitmap;
    g_autofree char *path = NULL;
    g_autoptr(GError) err = NULL;
    g_autofree char *prefix = g_strdup_printf("qbak-%s-", b->repo->vm_id);
    size_t i;
    json_t *bm;

    for (guint k = b->points->len; k > 0 && !entry && !damaged; k--) {
        last = b->points->pdata[k - 1];
        entry = restore_point_disk(last, d->name);
        damaged = last->damage;
    }
    /* Every bitmap of ours in QEMU now is stale once this point commits:
     * the point brings its own generation (below). */
    bitmap = entry ? json_string_value(json_object_get(entry, "bitmap")) : NULL;
    json_array_foreach(d->bitmaps, i, bm)
    {
        const char *name = json_string_value(json_object_get(bm, "name"));
        if (name && g_str_has_prefix(name, prefix)) {
            g_ptr_array_add(d->stale_bitmaps, g_strdup(name));
        }
    }

    if (damaged) {
        /* It may have held this disk: nothing newer than it is known. */
        d->full = true;
        d->reason =
            g_strdup_printf("point %s is damaged: %s", last->id, damaged);
    } else if (!entry) {
        d->full = true; /* first backup of this disk: no reason needed */
    } else if ((d->reason = chain_damage(b, last, d->name))) {
        d->full = true;
    } else if (b->opts->full) {
        d->full = true;
        d->reason = g_strdup("full backup requested (--full)");
    } else if (!bitmap) {
        d->full = true;
        d->reason =
            g_strdup_printf("point %s has no bitmap for this disk", last->id);
    } else if ((d->reason = bitmap_problem(d, entry, bitmap))) {
        d->full = true;
    } else {
        const char *file = json_string_value(json_object_get(entry, "file"));
        path = g_build_filename(last->id, file ? file : "", NULL);
        d->backing = qcow2_reader_open(b->repo->vm_fd, path, &err);
        if (!d->backing) {
            d->full = true;
            d->reason = g_strdup_printf("previous point %s is unreadable: %s",
                                        last->id, err->message);
            /* Damaged or missing layers: marked, so that list, verify and
             * later backups know without opening them again. */
            if (err->domain == G_FILE_ERROR &&
                (err->code == G_FILE_ERROR_INVAL ||
                 err->code == G_FILE_ERROR_NOENT)) {
                damage_mark(b->repo, last->id, d->name, -1, err->message,
                            "backup", NULL);
            }
        } else if (qcow2_reader_virtual_size(d->backing) != d->size) {
            d->full = true;
            d->reason =
                g_strdup_printf("previous point %s has another size", last->id);
            g_clear_pointer(&d->backing, qcow2_reader_free);
        }
    }
    if (d->full) {
        char chain[17];
        g_snprintf(chain, sizeof(chain), "%08x%08x", g_random_int(),
                   g_random_int());
        d->chain = g_strdup(chain);
    } else {
        d->chain = g_strdup(json_string_value(json_object_get(entry, "chain")));
        d->prev_bitmap = g_strdup(bitmap);
        d->backing_rel = g_strdup_printf("../%s", path);
    }
    /* One generation of the chain's bitmap per point, random so that a
     * retry after a crash never meets its predecessor's: a disk image
     * swapped for an older copy outside QEMU carries an older generation,
     * and the next backup falls back to full instead of trusting it. */
    d->bitmap = g_strdup_printf("%s%s-%08x", prefix, d->chain, g_random_int());
}

/* QEMU's NBD client gets its end of our socketpair through the monitor
 * (getfd), so no socket file exists that anyone else could connect to.  The
 * fd's name is the node's: getfd replaces an fd of that name that a crashed
 * run left in the monitor. */
static bool
attach_target(struct backup *b, struct disk *d, int client_fd, GError **errp)
{
    json_t *ret;

    ret = qmp_client_call_fd(b->qmp, "getfd",
                             json_pack("{s:s}", "fdname", d->nbd_node),
                             client_fd, b->opts->timeout_ms, errp);
    close(client_fd);
    if (!ret) {
        return false;
    }
    json_decref(ret);
    /* QEMU takes the fd and does the NBD handshake during blockdev-add:
     * the call runs the ring, so our server answers meanwhile. */
    ret = qmp_client_call(b->qmp, "blockdev-add",
                          json_pack("{s:s, s:s, s:{s:s, s:s}, s:s}", "driver",
                                    "nbd", "node-name", d->nbd_node, "server",
                                    "type", "fd", "str", d->nbd_node, "export",
                                    d->name),
                          b->opts->timeout_ms, errp);
    if (!ret) {
        /* After a timeout QEMU may still add the node: delete it. */
        d->nbd_added = g_error_matches(*errp, QMP_ERROR, QMP_ERROR_TIMEOUT);
        /* A blockdev-add that failed before taking the fd leaves it in
         * the monitor; otherwise there is nothing to close. */
        json_decref(qmp_client_call(b->qmp, "closefd",
                                    json_pack("{s:s}", "fdname", d->nbd_node),
                                    b->opts->timeout_ms, NULL));
        return false;
    }
    json_decref(ret);
    d->nbd_added = true;
    return true;
}

static bool
start_targets(struct backup *b, GError **errp)
{
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        int client_fd = -1;

        d->file = g_strdup_printf("%s.qcow2", d->name);
        d->job_id = recover_job_id(b->repo, b->point, k);
        d->nbd_node = recover_node_name(b->repo, k);
        d->target =
            backup_target_new(&b->ring, b->partial_fd, d->file, d->name,
                              d->size, b->opts->cluster_bits, d->backing_rel,
                              d->backing, &client_fd, errp);
        if (!d->target) {
            return false;
        }
        backup_target_set_watchdog(d->target, (gint64)b->opts->stall_ms * 1000);
        if (!attach_target(b, d, client_fd, errp)) {
            g_prefix_error(errp, "%s: ", d->name);
            return false;
        }
    }
    return true;
}

/* This point's bitmap generation, added just before the transaction: it
 * records from a moment before the point in time, so a superset of the
 * writes after it, which is safe. */
static bool
add_bitmaps(struct backup *b, GError **errp)
{
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        json_t *ret;

        /* Raw images cannot store a persistent bitmap. */
        ret = qmp_client_call(b->qmp, "block-dirty-bitmap-add",
                              json_pack("{s:s, s:s, s:b}", "node", d->node,
                                        "name", d->bitmap, "persistent",
                                        g_strcmp0(d->drv, "qcow2") == 0),
                              b->opts->timeout_ms, errp);
        if (!ret) {
            g_prefix_error(errp, "%s: ", d->name);
            return false;
        }
        json_decref(ret);
        d->bitmap_added = true;
    }
    return true;
}

static bool
start_transaction(struct backup *b, GError **errp)
{
    json_t *actions = json_array();
    json_t *ret;

    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        json_t *job;

        /* A full of a qcow2 image without backing copies only what is
         * allocated in it (top): the rest reads as zeroes, and so does a
         * cluster left unallocated in the new full.  QEMU then skips the
         * unallocated part of the disk instead of sending it as zeroes,
         * so a sparse disk's full costs its data, not its size. */
        job = json_pack("{s:s, s:s, s:s, s:s, s:b, s:b}", "device", d->node,
                        "target", d->nbd_node, "job-id", d->job_id, "sync",
                        !d->full        ? "bitmap"
                        : d->standalone ? "top"
                                        : "full",
                        "auto-finalize", 0, "auto-dismiss", 0);
        /* An incremental copies what the previous generation recorded and
         * leaves it as it is (never): until this point is committed, that
         * generation stays the chain's truth, whatever happens.  The new
         * generation, added just before (block-dirty-bitmap-add cannot
         * join a grouped transaction), records a superset of the writes
         * after this point. */
        if (!d->full) {
            json_object_set_new(job, "bitmap", json_string(d->prev_bitmap));
            json_object_set_new(job, "bitmap-mode", json_string("never"));
        }
        if (b->opts->speed) {
            json_object_set_new(job, "speed", json_integer(b->opts->speed));
        }
        if (qmp_client_qemu_version(b->qmp) >= 60000) {
            /* QEMU's default 1 MiB chunks each get a fresh bounce buffer,
             * whose first touch costs QEMU more CPU than the copy itself;
             * 64 KiB buffers come from its heap, warm.  x-perf is QEMU
             * 6.0's; the name is unstable, hence the version gate. */
            json_object_set_new(
                job, "x-perf",
                json_pack("{s:I}", "max-chunk", (json_int_t)MAX_CHUNK));
        }
        json_array_append_new(
            actions,
            json_pack("{s:s, s:o}", "type", "blockdev-backup", "data", job));
    }
    ret = qmp_client_call(b->qmp, "transaction",
                          json_pack("{s:o, s:{s:s}}", "actions", actions,
                                    "properties", "completion-mode", "grouped"),
                          b->opts->timeout_ms, errp);
    if (!ret) {
        return false;
    }
    json_decref(ret);
    for (guint k = 0; k < b->disks->len; k++) {
        ((struct disk *)b->disks->pdata[k])->job_started = true;
    }
    recover_crash_point("transaction");
    return true;
}

static json_t *
make_manifest(struct backup *b, const char *parent, double duration)
{
    int v = qmp_client_qemu_version(b->qmp);
    g_autofree char *time = repo_time_now();
    g_autofree char *qemu =
        g_strdup_printf("%d.%d.%d", v / 10000, v / 100 % 100, v % 100);
    json_t *m = manifest_new(b->opts->vm, b->point, parent, time, qemu,
                             quiesce_consistency(b->quiesce),
                             quiesce_json(b->quiesce), duration);

    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        g_autofree char *sums = g_strconcat(d->file, QCOW2_SUMS_SUFFIX, NULL);
        struct manifest_disk md = {
            .disk = d->name,
            .full = d->full,
            .reason = d->reason,
            .file = d->file,
            .chain = d->chain,
            .bitmap = d->bitmap,
            .backing = d->backing_rel,
            .sums = sums,
            .virtual_size = d->size,
            .cluster_size = 1u << b->opts->cluster_bits,
        };
        manifest_add_disk(
            m, &md,
            json_pack("{s:s, s:I}", "node", d->node, "bytes_written",
                      (json_int_t)backup_target_file_size(d->target)));
    }
    /* What the point holds beside its disks (see the manifest schema). */
    json_object_set_new(m, "memory", vmstate_json(b->vmstate));
    json_object_set_new(m, "settings", vm_settings_summary(b->settings));
    return m;
}

static bool
commit(struct backup *b, const char *parent, json_t **manifest, GError **errp)
{
    if (!b->pull && !backup_jobs_still_pending(b, errp)) {
        return false;
    }
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        if (!backup_target_commit(d->target, errp)) {
            return false;
        }
    }
    *manifest = make_manifest(
        b, parent, (double)(g_get_monotonic_time() - b->start_us) / 1e6);
    if (!repo_commit_sync(b->repo, b->partial_fd, b->point, *manifest, errp)) {
        return false;
    }
    recover_crash_point("fsynced");
    if (!repo_commit_publish(b->repo, b->point, errp)) {
        return false;
    }
    b->committed = true;
    recover_crash_point("committed");
    return true;
}

/* The bitmaps the committed point made stale, removed in one round trip:
 * sent (calls returned, *n of them, names[i] the disk of calls[i]) before
 * the answers to the graph's teardown are awaited, collected after. */
static struct qmp_call *
stale_bitmaps_send(struct backup *b, GPtrArray *names, size_t *n)
{
    struct qmp_call *calls;
    size_t total = 0, j = 0;

    for (guint k = 0; k < b->disks->len; k++) {
        total += ((struct disk *)b->disks->pdata[k])->stale_bitmaps->len;
    }
    *n = total;
    if (total == 0) {
        return NULL;
    }
    calls = g_new0(struct qmp_call, total);
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        for (guint i = 0; i < d->stale_bitmaps->len; i++, j++) {
            calls[j].cmd = "block-dirty-bitmap-remove";
            calls[j].args = json_pack("{s:s, s:s}", "node", d->node, "name",
                                      (char *)d->stale_bitmaps->pdata[i]);
            g_ptr_array_add(names, d->name);
        }
    }
    qmp_client_send_many(b->qmp, calls, total, b->opts->timeout_ms);
    return calls;
}

static void
stale_bitmaps_finish(struct backup *b, struct qmp_call *calls, size_t n,
                     GPtrArray *names, GPtrArray *warnings)
{
    if (!calls) {
        return;
    }
    qmp_client_wait_many(b->qmp, calls, n, b->opts->timeout_ms);
    for (size_t i = 0; i < n; i++) {
        if (calls[i].error) {
            g_ptr_array_add(warnings,
                            g_strdup_printf("%s: %s", (char *)names->pdata[i],
                                            calls[i].error->message));
        }
    }
    qmp_calls_clear(calls, n);
    g_free(calls);
}

/* Undo what QEMU holds for us: jobs, NBD nodes; then stop serving. */
static void
release_qemu(struct backup *b, bool failed, GPtrArray *warnings)
{
    gint64 deadline;

    if (b->qmp && failed) {
        backup_jobs_conclude(b, true);
    }
    for (guint k = 0; b->qmp && k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        if (d->nbd_added) {
            g_autoptr(GError) err = NULL;
            json_t *r =
                qmp_client_call(b->qmp, "blockdev-del",
                                json_pack("{s:s}", "node-name", d->nbd_node),
                                b->opts->timeout_ms, &err);
            if (!r && warnings) {
                g_ptr_array_add(warnings, g_strdup(err->message));
            }
            json_decref(r);
            d->nbd_added = false;
        }
        if (failed && d->bitmap_added && b->qmp) {
            /* A full that failed leaves a bitmap nothing refers to. */
            json_decref(qmp_client_call(
                b->qmp, "block-dirty-bitmap-remove",
                json_pack("{s:s, s:s}", "node", d->node, "name", d->bitmap),
                b->opts->timeout_ms, NULL));
        }
    }
    /* QEMU sends NBD_CMD_DISC on blockdev-del; give it a moment. */
    deadline = qmp_now_ms() + 2000;
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        while (d->target && backup_target_connected(d->target) &&
               !backup_target_finished(d->target) && qmp_now_ms() < deadline) {
            ring_run_once(&b->ring, 100);
        }
        g_clear_pointer(&d->target, backup_target_free);
    }
}

static json_t *
strings_json(GPtrArray *a)
{
    json_t *arr = json_array();

    for (guint i = 0; i < a->len; i++) {
        json_array_append_new(arr, json_string(a->pdata[i]));
    }
    return arr;
}

static json_t *
result_json(struct backup *b, json_t *manifest, GPtrArray *warnings,
            GPtrArray *recovered)
{
    json_t *out = json_pack(
        "{s:s, s:s, s:O?, s:O, s:o, s:O, s:O}", "vm", b->opts->vm, "point",
        b->point, "parent", json_object_get(manifest, "parent"), "disks",
        json_object_get(manifest, "disks"), "duration_s",
        json_real((double)(g_get_monotonic_time() - b->start_us) / 1e6),
        "consistency", json_object_get(manifest, "consistency"), "freeze",
        json_object_get(manifest, "freeze"));
    GPtrArray *qw = quiesce_warnings(b->quiesce);

    json_object_set(out, "memory", json_object_get(manifest, "memory"));
    json_object_set(out, "settings", json_object_get(manifest, "settings"));
    if (b->vmstate) {
        GPtrArray *vw = vmstate_warnings(b->vmstate);
        for (guint i = 0; i < vw->len; i++) {
            g_ptr_array_add(warnings, g_strdup(vw->pdata[i]));
        }
    }
    for (guint i = 0; i < qw->len; i++) {
        g_ptr_array_add(warnings, g_strdup(qw->pdata[i]));
    }
    json_object_set_new(out, "warnings", strings_json(warnings));
    json_object_set_new(out, "recovered", strings_json(recovered));
    return out;
}

/* A full because QEMU's bitmaps are gone says why when QEMU is another
 * process than at the previous point (a restored VM: a new chain). */
static void
explain_full(struct backup *b, struct disk *d, const char *last_point)
{
    g_autofree char *path = NULL, *why = NULL;
    json_auto_t *prev = NULL;

    if (!d->full || !d->reason || !last_point ||
        !strstr(d->reason, "is missing")) {
        return;
    }
    path = g_strdup_printf("%s/%s", last_point, VM_SETTINGS_NAME);
    prev = repo_read_json(b->repo->vm_fd, path, NULL);
    why = vm_settings_new_process_reason(b->settings, prev, last_point);
    if (why) {
        char *r = g_strdup_printf("%s (%s)", why, d->reason);
        g_free(d->reason);
        d->reason = r;
    }
}

/* Pull mode's data (agent/backup_pull.h): fleecing set up, the point in
 * time inside the freeze window, the copy, and QEMU's graph put back as it
 * was (asked for as soon as the data is in, so the guest's writes stop
 * going through the filter while the commit runs). */
static bool
pull_data(struct backup *b, GPtrArray *warnings, GError **errp)
{
    bool started;

    if (!backup_pull_add_nodes(b, errp)) {
        return false;
    }
    backup_trace(b, "fleecing nodes and bitmaps added");
    if (!quiesce_freeze(b->quiesce, errp)) {
        return false;
    }
    started = backup_pull_point(b, errp);
    quiesce_thaw(b->quiesce);
    backup_trace(b, "filters inserted (point in time)");
    if (!started || !backup_pull_copy(b, errp)) {
        return false;
    }
    backup_trace(b, "all data read");
    /* QEMU's graph goes back while the commit's fsyncs run; the answers
     * are collected after the commit (backup_run). */
    backup_pull_release_start(b);
    return true;
}

json_t *
backup_run(const struct backup_opts *o, GError **errp)
{
    struct backup b = {.opts = o, .partial_fd = -1};
    g_autoptr(GPtrArray) warnings = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) recovered = g_ptr_array_new_with_free_func(g_free);
    json_t *manifest = NULL, *result = NULL;
    const char *parent = NULL, *last_point = NULL;
    bool any_incremental = false, started;
    int qga_timeout_ms = MIN(o->timeout_ms, QGA_TIMEOUT_MAX_MS);
    struct vm_settings_pending *settings = NULL;
    int ret;

    b.start_us = g_get_monotonic_time();
    if (o->mode == BACKUP_MODE_PULL) {
        lazy_libs_preload_nbd(); /* as early as can be: see below */
    }
    b.disks = g_ptr_array_new_with_free_func((GDestroyNotify)disk_free);
    ret = ring_init(&b.ring, RING_ENTRIES);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "io_uring: %s", g_strerror(-ret));
        goto out;
    }
    b.ring_ok = true;
    b.repo = repo_vm_open(o->repo, o->vm, true, REPO_LOCK_EXCLUSIVE, o->wait_ms,
                          errp);
    if (!b.repo) {
        goto out;
    }
    if (repo_partial_cleanup(b.repo) > 0) {
        g_ptr_array_add(recovered, g_strdup("removed unfinished point "
                                            "directories (.partial-*)"));
    }
    /* A prune that was killed is completed first: the points listed
     * below, and the one this backup builds on, are then final.  A
     * failure leaves every listed point readable, so the backup goes on. */
    {
        GError *perr = NULL;
        if (!prune_recover(b.repo, recovered, &perr)) {
            g_ptr_array_add(warnings, g_strdup(perr->message));
            g_error_free(perr);
        }
    }
    /* A guest a killed run left frozen is thawed before anything else. */
    if (!quiesce_recover(&b.ring, b.repo, qga_timeout_ms, recovered, errp)) {
        goto out;
    }
    /* Damaged points too: they must not pass unseen, and new ids sort
     * after theirs. */
    b.points = repo_scan_points(b.repo, errp);
    if (!b.points) {
        goto out;
    }
    if (b.points->len > 0) {
        last_point =
            ((struct restore_point *)b.points->pdata[b.points->len - 1])->id;
    }
    backup_trace(&b, "repository locked");
    b.qmp = qmp_client_connect(&b.ring, o->qmp_path, QMP_PARSER_QMP,
                               o->timeout_ms, errp);
    if (!b.qmp) {
        goto out;
    }
    backup_trace(&b, "QMP connected");
    if (!backup_pull_recover(b.qmp, b.repo, o->timeout_ms, recovered, errp) ||
        !recover_qemu(b.qmp, b.repo, o->timeout_ms, recovered, errp) ||
        !vmstate_recover(b.qmp, b.repo, o->timeout_ms, recovered, errp)) {
        goto out;
    }
    backup_trace(&b, "leftovers checked");
    if (!backup_choose_mode(&b, errp)) {
        goto out;
    }
    if (b.use_pull) {
        lazy_libs_preload_nbd(); /* io/lazy_libs.h: 90 ms, overlapped */
    }
    if (o->verbose) {
        fprintf(stderr, "qbak: mode %s: %s\n", b.use_pull ? "pull" : "push",
                b.mode_reason);
    }
    /* The settings' queries, query-block first: qbak plans the disks
     * from it and prepares while QEMU answers the rest; the answers are
     * collected before anything in QEMU changes. */
    settings = vm_settings_capture_start(b.qmp, o->qmp_path, o->qga_path,
                                         o->timeout_ms);
    if (!discover_disks(&b, settings, errp)) {
        goto out;
    }
    for (guint k = 0; k < b.disks->len; k++) {
        struct disk *d = b.disks->pdata[k];
        plan_disk(&b, d);
        any_incremental |= !d->full;
    }
    /* The agent is checked before anything starts in QEMU, so a required
     * freeze that cannot happen fails the backup early. */
    b.quiesce =
        quiesce_new(&b.ring, b.repo, o->quiesce, o->qga_path, qga_timeout_ms);
    backup_trace(&b, "disks planned");
    if (!quiesce_prepare(b.quiesce, errp)) {
        goto out;
    }
    if (any_incremental) {
        parent = last_point;
    }
    b.point = repo_new_point_id(last_point);
    b.partial_fd = repo_partial_create(b.repo, b.point, errp);
    if (b.partial_fd < 0) {
        goto out;
    }
    b.partial_made = true;
    if (b.use_pull && !backup_pull_prepare(&b, errp)) {
        goto out;
    }
    b.settings = vm_settings_capture_finish(g_steal_pointer(&settings));
    for (guint k = 0; k < b.disks->len; k++) {
        explain_full(&b, b.disks->pdata[k], last_point);
    }
    /* The settings, with or without memory; durable with the rest of the
     * point at the commit (repo_commit_sync). */
    if (!vm_settings_write(b.partial_fd, VM_SETTINGS_NAME, b.settings, errp)) {
        goto out;
    }
    if (o->memory != VMSTATE_OFF) {
        b.vmstate = vmstate_new(b.qmp, b.repo, b.partial_fd, o->memory,
                                o->qmp_path, o->timeout_ms);
        if (!vmstate_prepare(b.vmstate, errp)) {
            goto out;
        }
    }
    if (b.use_pull) {
        if (!pull_data(&b, warnings, errp)) {
            goto out;
        }
        goto copied;
    }
    /* The freeze comes last and the thaw right after the transaction:
     * the window is as short as QEMU makes it. */
    if (!vmstate_save_first(b.vmstate, errp) || !start_targets(&b, errp)) {
        goto out;
    }
    backup_trace(&b, "NBD targets attached");
    if (!add_bitmaps(&b, errp) || (!vmstate_vcpus_stopped(b.vmstate) &&
                                   !quiesce_freeze(b.quiesce, errp))) {
        goto out;
    }
    /* With memory: vCPUs stopped around the transaction, the snapshot
     * armed before they run again (agent/vm/vmstate.h). */
    if (b.vmstate && !vmstate_stop(b.vmstate, errp)) {
        goto out;
    }
    started = start_transaction(&b, errp);
    if (b.vmstate) {
        started =
            vmstate_start(b.vmstate, started, started ? errp : NULL) && started;
    }
    quiesce_thaw(b.quiesce);
    backup_trace(&b, "transaction done (point in time)");
    if (!started || !backup_jobs_wait_pending(&b, errp)) {
        goto out;
    }
    backup_trace(&b, "all data received");
    if (b.vmstate && !vmstate_finish(b.vmstate, errp)) {
        goto out;
    }
copied:
    if (!commit(&b, parent, &manifest, errp)) {
        goto out;
    }
    backup_trace(&b, "committed");
    if (!b.pull) {
        backup_jobs_finalize(&b, warnings);
    }
    {
        /* QEMU runs the removals after the teardown sent before the
         * commit: one wait for both. */
        g_autoptr(GPtrArray) names = g_ptr_array_new();
        size_t n;
        struct qmp_call *stale = stale_bitmaps_send(&b, names, &n);

        backup_pull_release(&b, warnings);
        stale_bitmaps_finish(&b, stale, n, names, warnings);
    }
    backup_trace(&b, "finalized");
    release_qemu(&b, false, warnings);
    backup_trace(&b, "NBD nodes released");
    result = result_json(&b, manifest, warnings, recovered);
    backup_pull_result(&b, result);
out:
    if (b.quiesce) {
        quiesce_thaw(b.quiesce); /* before any clean-up that may block */
    }
    vm_settings_capture_abandon(settings);
    vmstate_free(b.vmstate); /* the VM runs again, the snapshot stops */
    backup_pull_release(&b, b.committed ? warnings : NULL);
    if (b.partial_made || b.disks->len) {
        release_qemu(&b, !b.committed, b.committed ? warnings : NULL);
    }
    if (b.partial_made && !b.committed) {
        repo_partial_remove(b.repo, b.point);
    }
    quiesce_free(b.quiesce);
    if (b.partial_fd >= 0) {
        close(b.partial_fd);
    }
    json_decref(manifest);
    backup_pull_free(&b);
    g_ptr_array_free(b.disks, true);
    qmp_client_free(b.qmp);
    json_decref(b.block);
    json_decref(b.settings);
    if (b.points) {
        g_ptr_array_free(b.points, true);
    }
    repo_vm_close(b.repo);
    if (b.ring_ok) {
        ring_fini(&b.ring);
    }
    lazy_libs_preload_wait();
    g_free(b.point);
    g_free(b.mode_reason);
    if (!result && errp && !*errp) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "internal error: no result and no error");
    }
    return result;
}

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
#include "agent/prune.h"
#include "agent/recover.h"
#include "agent/vm/settings.h"
#include "agent/vm/vmstate.h"
#include "io/lazy_libs.h"
#include "io/qcow2_sums.h"
#include "qmp/batch.h"

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
 * sent before the answers to the graph's teardown are awaited, collected
 * after (qmp_batch_finish: a failure is a warning naming the disk). */
static void
stale_bitmaps_send(struct backup *b, struct qmp_batch *bt)
{
    size_t total = 0;

    for (guint k = 0; k < b->disks->len; k++) {
        total += ((struct disk *)b->disks->pdata[k])->stale_bitmaps->len;
    }
    qmp_batch_init(bt, total);
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        for (guint i = 0; i < d->stale_bitmaps->len; i++) {
            qmp_batch_add(bt, d->name, "block-dirty-bitmap-remove",
                          json_pack("{s:s, s:s}", "node", d->node, "name",
                                    (char *)d->stale_bitmaps->pdata[i]),
                          NULL, false);
        }
    }
    if (total > 0) {
        qmp_batch_send(b->qmp, bt, b->opts->timeout_ms);
    }
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
    b.disks = g_ptr_array_new_with_free_func((GDestroyNotify)backup_disk_free);
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
    if (!backup_discover_disks(&b, settings, errp)) {
        goto out;
    }
    for (guint k = 0; k < b.disks->len; k++) {
        struct disk *d = b.disks->pdata[k];
        backup_plan_disk(&b, d);
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
        backup_explain_full(&b, b.disks->pdata[k], last_point);
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
        struct qmp_batch stale;

        stale_bitmaps_send(&b, &stale);
        backup_pull_release(&b, warnings);
        qmp_batch_finish(b.qmp, &stale, b.opts->timeout_ms, warnings, NULL);
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

/* Push or pull: what --mode auto (the default) picks, and why.
 *
 * Pull holds guest writes least (copy-before-write copies an old cluster
 * to local scratch, where push waits for the repository), and is as fast
 * or faster, so it is the default wherever it is safe:
 *   - QEMU 7.1 or later: copy-before-write's on-cbw-error=break-snapshot
 *     and cbw-timeout, without which a failing scratch fails guest writes;
 *   - no --memory: the VM state is captured inside push's transaction;
 *   - QEMU's one NBD server free: pull exports the point over it;
 *   - before QEMU 9.0, no disk whose device runs in an iothread (below).
 * Otherwise push.  The version is the greeting's (no round trip); the
 * NBD server costs one query-block-exports, asked only when the rest
 * allows pull. */
#include <string.h>

#include "agent/backup_int.h"
#include "agent/backup_pull.h"
#include "agent/error.h"
#include "qmp/client.h"

/* QEMU 7.2 aborts, and the VM with it ("qemu_mutex_unlock_impl: Operation
 * not permitted": an AioContext lock released by a thread that does not
 * hold it), when pull mode adds its snapshot-access node above the filter
 * of a disk whose device runs in an iothread while the guest writes: every
 * time in our measurements, never without an iothread.  QEMU 9.0 removed
 * the AioContext lock; before it, such a disk is backed up in push mode
 * (QEMU's own backup job, which works there). */
#define PULL_IOTHREAD_MIN_QEMU 90000

static bool
link_set(json_t *v)
{
    return json_is_string(v) && json_string_length(v) > 0;
}

/* The device (qdev path) of a disk that runs in an iothread, or NULL:
 * virtio-blk has the link on the device, a SCSI disk on its controller
 * (the owner of its parent bus).  Without iothread objects, one round
 * trip. */
static char *
iothread_disk(struct backup *b, GError **errp)
{
    int t = b->opts->timeout_ms;
    json_t *its = qmp_client_call(b->qmp, "query-iothreads", NULL, t, errp);
    json_t *block = NULL, *dev;
    GPtrArray *qdevs = g_ptr_array_new();
    struct qmp_call *calls = NULL;
    size_t i, n = 0;
    char *found = NULL;

    if (!its || json_array_size(its) == 0 ||
        !(block = qmp_client_call(b->qmp, "query-block", NULL, t, errp))) {
        goto out;
    }
    json_array_foreach(block, i, dev)
    {
        const char *q = json_string_value(json_object_get(dev, "qdev"));
        if (q && json_is_object(json_object_get(dev, "inserted"))) {
            g_ptr_array_add(qdevs, (gpointer)q);
        }
    }
    /* Per device: its own link and its parent bus, in one round trip;
     * an error is a device without the property. */
    calls = g_new0(struct qmp_call, 2 * qdevs->len);
    for (guint k = 0; k < qdevs->len; k++) {
        calls[n++] = (struct qmp_call){
            .cmd = "qom-get",
            .args = json_pack("{s:s, s:s}", "path", qdevs->pdata[k], "property",
                              "iothread")};
        calls[n++] = (struct qmp_call){
            .cmd = "qom-get",
            .args = json_pack("{s:s, s:s}", "path", qdevs->pdata[k], "property",
                              "parent_bus")};
    }
    qmp_client_call_many(b->qmp, calls, n, t);
    for (guint k = 0; k < qdevs->len && !found; k++) {
        const char *bus = json_string_value(calls[2 * k + 1].result);
        const char *slash = bus ? strrchr(bus, '/') : NULL;

        if (link_set(calls[2 * k].result)) {
            found = g_strdup(qdevs->pdata[k]);
        } else if (slash && slash > bus) {
            g_autofree char *owner = g_strndup(bus, (gsize)(slash - bus));
            g_autoptr(GError) err = NULL;
            json_t *v = qmp_client_call(
                b->qmp, "qom-get",
                json_pack("{s:s, s:s}", "path", owner, "property", "iothread"),
                t, &err);
            if (link_set(v)) {
                found = g_strdup(qdevs->pdata[k]);
            }
            json_decref(v);
        }
    }
    qmp_calls_clear(calls, n);
out:
    g_free(calls);
    g_ptr_array_free(qdevs, true);
    json_decref(block);
    json_decref(its);
    return found;
}

/* An NBD export that is not ours (an earlier run's were removed by
 * recovery) means someone else's NBD server runs: QEMU has only one.
 * Returns its id, or NULL.  A QEMU that cannot answer is taken as busy. */
static char *
nbd_export_in_use(struct backup *b, GError **errp)
{
    g_autoptr(GError) err = NULL;
    json_t *list = qmp_client_call(b->qmp, "query-block-exports", NULL,
                                   b->opts->timeout_ms, &err);
    json_t *e;
    size_t i;
    char *id = NULL;

    if (!list) {
        if (!g_error_matches(err, QMP_ERROR, QMP_ERROR_FAILED)) {
            g_propagate_error(errp, g_steal_pointer(&err));
            return NULL;
        }
        return g_strdup_printf("(query-block-exports failed: %s)",
                               err->message);
    }
    json_array_foreach(list, i, e)
    {
        if (g_strcmp0(json_string_value(json_object_get(e, "type")), "nbd") ==
            0) {
            id = g_strdup(json_string_value(json_object_get(e, "id")));
            if (!id) {
                id = g_strdup("?");
            }
            break;
        }
    }
    json_decref(list);
    return id;
}

bool
backup_choose_mode(struct backup *b, GError **errp)
{
    const struct backup_opts *o = b->opts;
    int v = qmp_client_qemu_version(b->qmp);
    g_autofree char *busy = NULL;
    GError *err = NULL;

    if (o->mode == BACKUP_MODE_PULL && v < PULL_IOTHREAD_MIN_QEMU) {
        g_autofree char *dev = iothread_disk(b, &err);
        if (err) {
            g_propagate_prefixed_error(errp, err, "checking for iothreads: ");
            return false;
        }
        if (dev) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                        "--mode pull: device %s runs in an iothread, and "
                        "QEMU %d.%d aborts when pull mode's snapshot-access "
                        "node goes above such a disk while the guest "
                        "writes: use --mode push (or auto)",
                        dev, v / 10000, v / 100 % 100);
            return false;
        }
    }
    if (o->mode == BACKUP_MODE_PUSH || o->mode == BACKUP_MODE_PULL) {
        b->use_pull = o->mode == BACKUP_MODE_PULL;
        b->mode_reason = g_strdup("asked for (--mode)");
        return true;
    }
    b->use_pull = false;
    if (o->memory != VMSTATE_OFF) {
        b->mode_reason = g_strdup("--memory: the VM state is captured "
                                  "in push mode's transaction");
        return true;
    }
    if (v < BACKUP_PULL_MIN_QEMU) {
        b->mode_reason = g_strdup_printf(
            "QEMU %d.%d lacks copy-before-write's on-cbw-error="
            "break-snapshot (7.1): in pull mode a failing scratch would "
            "fail guest writes",
            v / 10000, v / 100 % 100);
        return true;
    }
    if (v < PULL_IOTHREAD_MIN_QEMU) {
        g_autofree char *dev = iothread_disk(b, &err);
        if (err) {
            g_propagate_prefixed_error(errp, err, "choosing the mode: ");
            return false;
        }
        if (dev) {
            b->mode_reason = g_strdup_printf(
                "device %s runs in an iothread: QEMU %d.%d aborts when pull "
                "mode's snapshot-access node goes above such a disk while "
                "the guest writes",
                dev, v / 10000, v / 100 % 100);
            return true;
        }
    }
    busy = nbd_export_in_use(b, &err);
    if (err) {
        g_propagate_prefixed_error(errp, err, "choosing the mode: ");
        return false;
    }
    if (busy) {
        b->mode_reason = g_strdup_printf(
            "QEMU's NBD server is in use (export %s), pull mode needs it",
            busy);
        return true;
    }
    b->use_pull = true;
    b->mode_reason = g_strdup_printf(
        "QEMU %d.%d with copy-before-write's break-snapshot and a free NBD "
        "server: pull holds guest writes least",
        v / 10000, v / 100 % 100);
    return true;
}

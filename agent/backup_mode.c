/* Push or pull: what --mode auto (the default) picks, and why.
 *
 * Pull holds guest writes least (copy-before-write copies an old cluster
 * to local scratch, where push waits for the repository), and is as fast
 * or faster, so it is the default wherever it is safe:
 *   - QEMU 7.1 or later: copy-before-write's on-cbw-error=break-snapshot
 *     and cbw-timeout, without which a failing scratch fails guest writes;
 *   - no --memory: the VM state is captured inside push's transaction;
 *   - QEMU's one NBD server free: pull exports the point over it.
 * Otherwise push.  The version is the greeting's (no round trip); the
 * NBD server costs one query-block-exports, asked only when the rest
 * allows pull. */
#include <string.h>

#include "agent/backup_int.h"
#include "agent/backup_pull.h"
#include "qmp/client.h"

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

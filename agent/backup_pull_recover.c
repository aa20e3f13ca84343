/* Pull mode's recovery after a crash: see backup_pull.h. */
#include <fcntl.h>
#include <unistd.h>

#include "agent/backup_pull.h"
#include "agent/backup_pull_int.h"

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
    json_t *m = repo_read_json(r->vm_fd, PULL_MARKER, &err);
    json_t *disk;
    size_t i;

    if (!m) {
        if (faccessat(r->vm_fd, PULL_MARKER, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
            /* A marker cut short by a crash: nothing was made after it. */
            unlinkat(r->vm_fd, PULL_MARKER, 0);
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
    if (unlinkat(r->vm_fd, PULL_MARKER, 0) == 0) {
        fsync(r->vm_fd);
    }
    (void)errp;
    return true;
}

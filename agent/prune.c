/* qbak prune, protect, unprotect: the policy side.  See prune.h. */
#include "agent/prune.h"

#include "agent/damage.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/prune_int.h"
#include "agent/recover.h"

/* When the point was taken: its manifest's time, else its id's. */
static time_t
point_time(const struct prune_dir *p)
{
    const char *t = json_string_value(json_object_get(p->manifest, "time"));
    g_autofree char *from_id = g_strndup(p->id, 16); /* 20261205T113600Z */
    g_autoptr(GDateTime) dt = NULL;

    if (t) {
        dt = g_date_time_new_from_iso8601(t, NULL);
    }
    if (!dt) {
        dt = g_date_time_new_from_iso8601(from_id, NULL);
    }
    return dt ? (time_t)g_date_time_to_unix(dt) : 0;
}

static char *
layer_key(const char *id, const char *disk)
{
    return g_strdup_printf("%s/%s", id, disk);
}

/* needed: "<point>/<disk>" for every layer that a kept point reads
 * through (its own included).  Children are newer than their parents, so
 * one pass newest first sees every child before its parent. */
static GHashTable *
needed_layers(struct prune_ctx *c, GHashTable *kept)
{
    GHashTable *needed =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);

    for (guint k = c->dirs->len; k > 0; k--) {
        struct prune_dir *x = c->dirs->pdata[k - 1];
        size_t i;
        json_t *e;

        json_array_foreach(json_object_get(x->manifest, "disks"), i, e)
        {
            const char *disk = json_string_value(json_object_get(e, "disk"));
            const char *back = json_string_value(json_object_get(e, "backing"));
            g_autofree char *key = NULL;
            const char *slash;

            if (!disk) {
                continue;
            }
            key = layer_key(x->id, disk);
            if (g_hash_table_contains(kept, x->id)) {
                g_hash_table_add(needed, g_strdup(key));
            }
            if (!g_hash_table_contains(needed, key) || !back ||
                !g_str_has_prefix(back, "../") ||
                !(slash = strchr(back + 3, '/'))) {
                continue;
            }
            g_autofree char *parent =
                g_strndup(back + 3, (gsize)(slash - back - 3));
            g_hash_table_add(needed, layer_key(parent, disk));
        }
    }
    return needed;
}

/* The point whose layer of disk the data of a removed layer ends in:
 * from ch, its child, up the chain to the first point kept (the layers
 * between are removed too, and all fold into that one). */
static struct prune_dir *
landing_point(struct prune_ctx *c, struct prune_dir *ch, const char *disk,
              GHashTable *kept)
{
    unsigned steps = 0;

    while (ch && !g_hash_table_contains(kept, ch->id) &&
           steps++ <= c->dirs->len) {
        json_t *e = prune_manifest_disk(ch->manifest, disk);
        const char *file =
            e ? json_string_value(json_object_get(e, "file")) : NULL;

        ch = file ? prune_child(c, ch, disk, file) : NULL;
    }
    return ch && g_hash_table_contains(kept, ch->id) ? ch : NULL;
}

/* What removing p does to each of its disks. */
static json_t *
removal_json(struct prune_ctx *c, struct prune_dir *p, GHashTable *needed,
             GHashTable *kept, bool *merges)
{
    json_t *disks = json_array();
    size_t i;
    json_t *e;

    json_array_foreach(json_object_get(p->manifest, "disks"), i, e)
    {
        const char *disk = json_string_value(json_object_get(e, "disk"));
        const char *file = json_string_value(json_object_get(e, "file"));
        g_autofree char *key = layer_key(p->id, disk ? disk : "");
        struct prune_dir *ch =
            disk && file ? prune_child(c, p, disk, file) : NULL;

        if (ch && g_hash_table_contains(needed, key)) {
            struct prune_dir *into = landing_point(c, ch, disk, kept);

            *merges = true;
            json_array_append_new(
                disks, json_pack("{s:s, s:s, s:s}", "disk", disk, "action",
                                 "merge", "into", into ? into->id : ch->id));
        } else {
            json_array_append_new(disks, json_pack("{s:s?, s:s}", "disk", disk,
                                                   "action", "delete"));
        }
    }
    return disks;
}

/* Keeps the first error; counts the rest. */
static void
note_failure(GError **first, unsigned *more, GError *err)
{
    if (!*first) {
        *first = err;
    } else {
        (*more)++;
        g_error_free(err);
    }
}

/* Whether any disk of p is in a chain of failed (adds them with add). */
static bool
in_chains(struct prune_dir *p, GHashTable *chains, bool add)
{
    bool found = false;
    size_t i;
    json_t *e;

    json_array_foreach(json_object_get(p->manifest, "disks"), i, e)
    {
        const char *chain = json_string_value(json_object_get(e, "chain"));
        if (!chain) {
            continue;
        }
        found |= g_hash_table_contains(chains, chain);
        if (add) {
            g_hash_table_add(chains, g_strdup(chain));
        }
    }
    return found;
}

/* A point that cannot be removed stops the removals in its chain (the
 * chain stays as it is from there on); other chains go on. */
static bool
run_removals(struct prune_ctx *c, GPtrArray *order, GError **errp)
{
    g_autoptr(GHashTable) failed =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    GError *first = NULL;
    unsigned more = 0, skipped = 0;

    /* A removal that merges may fold the layers of later doomed points
     * along with its child's (prune_remove_point). */
    for (guint i = 0; i < order->len; i++) {
        ((struct prune_dir *)order->pdata[i])->doomed = true;
    }
    for (guint i = 0; i < order->len; i++) {
        struct prune_dir *p = order->pdata[i];
        GError *err = NULL;

        if (in_chains(p, failed, false)) {
            skipped++;
            continue;
        }
        if (!prune_remove_point(c, p, &err)) {
            note_failure(&first, &more, err);
            in_chains(p, failed, true);
        }
    }
    if (first) {
        if (more) {
            g_prefix_error(&first,
                           "%u points could not be removed; first: ", more + 1);
        }
        if (skipped) {
            /* Points a failed fold delisted stay so until a prune
             * completes their removal (prune_point.c: relist). */
            char *msg = g_strdup_printf("%s (%u later points of its chain "
                                        "not removed: left to a later prune)",
                                        first->message, skipped);
            g_free(first->message);
            first->message = msg;
        }
        g_propagate_error(errp, first);
        return false;
    }
    return true;
}

/* Holds off file-level readers (and waits for none) while a backup's
 * recovery changes files; prune itself already holds this. */
static int
browse_lock(struct repo_vm *r, GError **errp)
{
    int fd;

    if (r->browse_fd >= 0) {
        return -2;
    }
    fd = openat(r->vm_fd, ".browse", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
                0640);
    if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int err = errno;
        if (fd >= 0) {
            close(fd);
        }
        g_set_error(errp, QBAK_ERROR,
                    err == EWOULDBLOCK ? QBAK_ERROR_BUSY : QBAK_ERROR_FAILED,
                    "an interrupted prune is left for later: %s",
                    err == EWOULDBLOCK ? "file-level readers are active"
                                       : g_strerror(err));
        return -1;
    }
    return fd;
}

static void
note_cleanup(struct repo_vm *r, GPtrArray *done)
{
    unsigned n = prune_cleanup_removed(r);

    if (n) {
        g_ptr_array_add(done, g_strdup_printf("removed %u directories of "
                                              "pruned points",
                                              n));
    }
}

/* The points a prune delisted are the work left: each is completed from
 * the state of its files (prune_remove_point).  Points of the journal not
 * delisted yet are untouched and stay. */
bool
prune_recover(struct repo_vm *r, GPtrArray *done, GError **errp)
{
    struct prune_ctx c = {.r = r};
    g_autoptr(GPtrArray) order = g_ptr_array_new();
    bool journal, ok = true;
    int lock;

    /* Every backup comes here: it costs a directory listing unless
     * there is work. */
    if (!prune_work_pending(r)) {
        return true;
    }
    c.dirs = prune_scan(r, errp);
    if (!c.dirs) {
        return false;
    }
    journal =
        faccessat(r->vm_fd, PRUNE_JOURNAL, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
    for (guint i = 0; i < c.dirs->len; i++) {
        struct prune_dir *p = c.dirs->pdata[i];
        if (p->delisted) {
            g_ptr_array_add(order, p);
        }
    }
    if (!journal && !order->len) {
        note_cleanup(r, done);
        g_ptr_array_free(c.dirs, true);
        return true;
    }
    lock = browse_lock(r, errp);
    if (lock == -1) {
        g_ptr_array_free(c.dirs, true);
        return false;
    }
    note_cleanup(r, done);
    if (order->len) {
        ok = run_removals(&c, order, errp);
        for (guint i = 0; i < order->len; i++) {
            struct prune_dir *p = order->pdata[i];
            if (p->gone) {
                g_ptr_array_add(done,
                                g_strdup_printf("completed the removal of "
                                                "point %s (an interrupted "
                                                "prune)",
                                                p->id));
            }
        }
    } else {
        g_ptr_array_add(done, g_strdup("an interrupted prune had changed "
                                       "nothing yet: its plan is dropped"));
    }
    if (ok) {
        ok = prune_journal_remove(r, errp);
    }
    prune_finish_removals(&c);
    if (lock >= 0) {
        close(lock);
    }
    g_ptr_array_free(c.dirs, true);
    return ok;
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

/* Decides, describes and (unless dry_run) removes.  Returns the points'
 * JSON; order gets the points to remove in the order to remove them. */
static json_t *
plan(struct prune_ctx *c, const struct prune_opts *o, GPtrArray *order,
     unsigned *n_kept)
{
    g_autoptr(GPtrArray) listed = g_ptr_array_new();
    g_autoptr(GHashTable) kept = g_hash_table_new(g_str_hash, g_str_equal);
    g_autoptr(GHashTable) needed = NULL;
    g_autofree struct retention_point *rp = NULL;
    g_autofree struct retention_decision *dec = NULL;
    g_autoptr(GPtrArray) merges = g_ptr_array_new();
    json_t *points = json_array();

    for (guint i = 0; i < c->dirs->len; i++) {
        struct prune_dir *p = c->dirs->pdata[i];
        if (!p->delisted) {
            g_ptr_array_add(listed, p);
        }
    }
    rp = g_new0(struct retention_point, listed->len + 1);
    dec = g_new0(struct retention_decision, listed->len + 1);
    for (guint i = 0; i < listed->len; i++) {
        struct prune_dir *p = listed->pdata[i];
        rp[i] = (struct retention_point){p->id, point_time(p), p->protected};
    }
    retention_select(rp, listed->len, &o->policy, dec);
    for (guint i = 0; i < listed->len; i++) {
        if (dec[i].keep) {
            g_hash_table_add(kept, ((struct prune_dir *)listed->pdata[i])->id);
        }
    }
    needed = needed_layers(c, kept);
    *n_kept = 0;
    for (guint i = 0; i < listed->len; i++) {
        struct prune_dir *p = listed->pdata[i];
        json_t *pj =
            json_pack("{s:s, s:O?, s:b, s:s, s:b}", "point", p->id, "time",
                      json_object_get(p->manifest, "time"), "keep", dec[i].keep,
                      "reason", dec[i].reason, "protected", p->protected);
        if (dec[i].keep) {
            (*n_kept)++;
        } else {
            bool merge = false;
            json_object_set_new(pj, "disks",
                                removal_json(c, p, needed, kept, &merge));
            /* Layers nothing kept reads go newest first (no point is
             * ever left listed on a deleted backing file); merges go
             * oldest first (each folds one child's data). */
            if (merge) {
                g_ptr_array_add(merges, p);
            } else {
                g_ptr_array_insert(order, 0, p);
            }
        }
        json_array_append_new(points, pj);
    }
    for (guint i = 0; i < merges->len; i++) {
        g_ptr_array_add(order, merges->pdata[i]);
    }
    return points;
}

json_t *
prune_run(const struct prune_opts *o, GError **errp)
{
    gint64 start = g_get_monotonic_time();
    struct prune_ctx c = {0};
    g_autoptr(GPtrArray) recovered = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) order = g_ptr_array_new();
    GError *first = NULL;
    unsigned more = 0, n_kept = 0;
    json_t *points, *res = NULL;

    if (!retention_policy_any(&o->policy)) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "no retention rule given: nothing would be kept");
        return NULL;
    }
    /* A dry run changes nothing: restores may go on meanwhile. */
    c.r = repo_vm_open(o->repo, o->vm, false,
                       o->dry_run ? REPO_LOCK_SHARED : REPO_LOCK_PRUNE,
                       o->wait_ms, errp);
    if (!c.r) {
        return NULL;
    }
    if (!o->dry_run) {
        GError *err = NULL;
        if (!prune_recover(c.r, recovered, &err)) {
            note_failure(&first, &more, err);
        }
    }
    c.dirs = prune_scan(c.r, errp);
    if (!c.dirs) {
        goto out;
    }
    points = plan(&c, o, order, &n_kept);
    if (!o->dry_run && order->len) {
        GError *err = NULL;
        bool left = false;

        if (!prune_journal_write(&c, order, &err)) {
            note_failure(&first, &more, err);
            goto failed;
        }
        recover_crash_point("prune-journal");
        if (!run_removals(&c, order, &err)) {
            note_failure(&first, &more, err);
        }
        /* Delisted points left by a failure keep the journal for the
         * recovery that completes them. */
        for (guint i = 0; i < order->len; i++) {
            struct prune_dir *p = order->pdata[i];
            left |= p->delisted && !p->gone;
        }
        if (!left && !prune_journal_remove(c.r, &err)) {
            note_failure(&first, &more, err);
        } else if (left && !prune_sync_pending(&c, &err)) {
            note_failure(&first, &more, err);
        }
    }
failed:
    if (first) {
        json_decref(points);
        if (more) {
            g_prefix_error(&first, "(%u failures) ", more + 1);
        }
        g_propagate_error(errp, first);
        goto out;
    }
    res = json_pack("{s:s, s:b, s:o, s:i, s:i, s:I, s:o, s:f}", "vm", o->vm,
                    "dry_run", o->dry_run, "points", points, "kept", n_kept,
                    "removed", (int)order->len, "merged_bytes",
                    (json_int_t)c.merged_bytes, "recovered",
                    strings_json(recovered), "duration_s",
                    (double)(g_get_monotonic_time() - start) / 1e6);
out:
    prune_finish_removals(&c);
    if (c.dirs) {
        g_ptr_array_free(c.dirs, true);
    }
    repo_vm_close(c.r);
    return res;
}

json_t *
prune_protect(const char *repo, const char *vm, const char *point, bool protect,
              int wait_ms, GError **errp)
{
    /* Backups go on; a prune is held off, so it never removes a point
     * being protected. */
    struct repo_vm *r =
        repo_vm_open(repo, vm, false, REPO_LOCK_BROWSE, wait_ms, errp);
    GPtrArray *points;
    bool found = false, was;
    json_t *res = NULL;
    int pfd;

    if (!r) {
        return NULL;
    }
    points = repo_list_points(r, errp);
    if (!points) {
        goto out;
    }
    for (guint i = 0; i < points->len; i++) {
        found |= !strcmp(((struct restore_point *)points->pdata[i])->id, point);
    }
    g_ptr_array_free(points, true);
    if (!found) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no committed point %s", vm, point);
        goto out;
    }
    pfd = openat(r->vm_fd, point,
                 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (pfd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s/%s: %s", vm, point, g_strerror(errno));
        goto out;
    }
    was = faccessat(pfd, PROTECTED_NAME, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
    if (was != protect &&
        !prune_marker_set(pfd, PROTECTED_NAME, protect, errp)) {
        g_prefix_error(errp, "%s/%s/", vm, point);
        close(pfd);
        goto out;
    }
    close(pfd);
    res = json_pack("{s:s, s:s, s:b, s:b}", "vm", vm, "point", point,
                    "protected", protect, "changed", was != protect);
out:
    repo_vm_close(r);
    return res;
}

/* qbak index and find: catalogs per point and disk, and searches across
 * points that read them (an appliance only for points without one). */
#include <fnmatch.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

/* Drives per appliance launch (libguestfs takes up to 255; memory and
 * start-up time grow with each). */
#define MAX_DRIVES 48

/* Lists every file system of drive i into a catalog for target t. */
static struct files_catalog *
catalog_of_drive(struct files_session *s, guint i, struct files_target *t,
                 bool *relaunch, GError **errp)
{
    GPtrArray *fss = files_list_fs(s, i, errp);
    struct files_catalog *c;

    if (!fss) {
        return NULL;
    }
    for (guint k = 0; k < fss->len; k++) {
        if (files_needs_relaunch(s, fss->pdata[k])) {
            *relaunch = true;
            g_ptr_array_free(fss, true);
            return NULL;
        }
    }
    c = g_new0(struct files_catalog, 1);
    c->point = g_strdup(t->point->id);
    c->disk = g_strdup(t->disk);
    c->fss = fss;
    for (guint k = 0; k < fss->len; k++) {
        struct files_fs *fs = fss->pdata[k];
        g_autoptr(GError) err = NULL;
        /* each at its own mount point, left mounted: an umount costs
         * 0.4-0.9 s under TCG */
        g_autofree char *mp = files_mount_at(s, fs, &err);

        if (!mp) {
            /* recorded: the catalog says this one could not be listed */
            fs->error = g_strdup(err->message);
            continue;
        }
        fs->entries = files_walk_at(s, mp, "/", fs->type, &err);
        if (!fs->entries) {
            fs->error = g_strdup(err->message);
        }
        if ((!fs->entries || fs->entries->len > FILES_MOUNTED_ENTRIES) &&
            !files_umount_at(s, mp, errp)) {
            files_catalog_free(c);
            return NULL;
        }
    }
    return c;
}

/* One catalog on its way to disk.  A writer thread encodes it and writes
 * it durably (two fsyncs) while the appliance walks the next point: the
 * appliance sat idle for 0.2 s per point before (30 points, load 5). */
struct catalog_job {
    struct files_session *s;
    struct files_catalog *c; /* the writer frees it unless keep */
    struct files_target t;
    bool keep;     /* the caller's too (find): read-only until joined */
    guint entries; /* for the report */
    double duration_s;
    int64_t bytes; /* set by the writer: -1 with err */
    GError *err;
};

static void
catalog_job_free(struct catalog_job *j)
{
    g_clear_error(&j->err);
    g_free(j);
}

static void
catalog_job_run(gpointer data, gpointer user_data)
{
    struct catalog_job *j = data;
    gint *failed = user_data;
    int fd = files_point_fd(j->s, j->t.point, &j->err);

    j->bytes = fd < 0 ? -1 : files_catalog_write(fd, j->c, &j->err);
    if (fd >= 0) {
        close(fd);
    }
    if (j->bytes < 0) {
        g_atomic_int_set(failed, 1);
    }
    if (!j->keep) {
        g_clear_pointer(&j->c, files_catalog_free);
    }
}

/* Waits for the writer, then reports each job in order: a catalog that
 * could not be written fails index (the first error), and is a warning
 * for find (it still answers; the next run indexes again). */
static bool
catalog_jobs_finish(struct files_session *s, GThreadPool *pool, GPtrArray *jobs,
                    bool strict, json_t *report, GError **errp)
{
    bool ok = true;

    g_thread_pool_free(pool, false, true);
    for (guint k = 0; k < jobs->len; k++) {
        struct catalog_job *j = jobs->pdata[k];

        if (j->bytes < 0 && strict) {
            if (ok) {
                g_propagate_prefixed_error(errp, g_steal_pointer(&j->err),
                                           "%s/%s: ", s->o->vm, j->t.point->id);
            }
            ok = false;
            continue;
        }
        if (j->bytes < 0) {
            fprintf(stderr, "qbak find: %s/%s: catalog not saved: %s\n",
                    s->o->vm, j->t.point->id, j->err->message);
        }
        json_array_append_new(
            report,
            json_pack("{s:s, s:s, s:b, s:I, s:I, s:f}", "point", j->t.point->id,
                      "disk", j->t.disk, "indexed", 1, "entries",
                      (json_int_t)j->entries, "bytes", (json_int_t)j->bytes,
                      "duration_s", j->duration_s));
    }
    return ok;
}

/* Indexes targets (struct files_target *) and writes their catalogs;
 * appends each catalog to out (if not NULL) and a line to report.
 * duration_s of a point: its listing (the writing overlaps the next). */
static bool
index_targets(struct files_session *s, GPtrArray *targets, GPtrArray *out,
              json_t *report, GError **errp)
{
    g_autoptr(GPtrArray) jobs =
        g_ptr_array_new_with_free_func((GDestroyNotify)catalog_job_free);
    gint failed = 0;
    GThreadPool *pool =
        g_thread_pool_new(catalog_job_run, &failed, 1, true, NULL);
    guint done = 0;
    bool ok = true;

    while (ok && done < targets->len) {
        g_autoptr(GPtrArray) batch = g_ptr_array_new();
        guint n = MIN(MAX_DRIVES, targets->len - done);

        g_ptr_array_extend(batch, targets, NULL, NULL);
        g_ptr_array_remove_range(batch, 0, done);
        g_ptr_array_set_size(batch, n);
        if (s->o->progress) {
            fprintf(stderr, "indexing %u point(s): starting the appliance\n",
                    n);
        }
        if (!files_launch(s, batch, errp)) {
            ok = false;
            break;
        }
        for (guint i = 0; i < n; i++) {
            struct files_target *t = batch->pdata[i];
            bool relaunch = false;
            struct files_catalog *c;
            struct catalog_job *j;
            gint64 t0 = g_get_monotonic_time();

            if (!out && g_atomic_int_get(&failed)) {
                /* a catalog could not be written: index fails anyway */
                ok = false;
                break;
            }
            c = catalog_of_drive(s, i, t, &relaunch, errp);
            if (relaunch) {
                break; /* a second btrfs copy: the rest in a new launch */
            }
            if (!c) {
                g_prefix_error(errp, "%s/%s: %s: ", s->o->vm, t->point->id,
                               t->disk);
                ok = false;
                break;
            }
            j = g_new0(struct catalog_job, 1);
            j->s = s;
            j->c = c;
            j->t = *t;
            j->keep = out != NULL;
            j->duration_s = (g_get_monotonic_time() - t0) / 1e6;
            for (guint k = 0; k < c->fss->len; k++) {
                struct files_fs *fs = c->fss->pdata[k];
                j->entries += fs->entries ? fs->entries->len : 0;
            }
            if (s->o->progress) {
                fprintf(stderr, "indexed %s %s: %u entries\n", t->point->id,
                        t->disk, j->entries);
            }
            if (out) {
                g_ptr_array_add(out, c);
            }
            g_ptr_array_add(jobs, j);
            g_thread_pool_push(pool, j, NULL);
            done++;
        }
    }
    files_shutdown(s);
    if (!ok) {
        /* the error already set wins; the writer still finishes what it
         * has (each catalog is whole or absent) */
        GError *later = NULL;
        catalog_jobs_finish(s, pool, jobs, !out, report,
                            errp && *errp ? &later : errp);
        g_clear_error(&later);
        return false;
    }
    return catalog_jobs_finish(s, pool, jobs, !out, report, errp);
}

/* The catalog of (point, disk) if it exists and verifies.  A damaged one
 * is reported on stderr and rebuilt. */
static struct files_catalog *
read_catalog(struct files_session *s, struct restore_point *p, const char *disk)
{
    g_autoptr(GError) err = NULL;
    struct files_catalog *c = NULL;
    int fd = files_point_fd(s, p, &err);

    if (fd >= 0) {
        c = files_catalog_read(fd, disk, &err);
        close(fd);
    }
    if (!c && !g_error_matches(err, QBAK_ERROR, QBAK_ERROR_NOT_FOUND)) {
        g_autofree char *msg =
            files_name_printable(err->message, strlen(err->message));
        fprintf(stderr, "qbak: %s/%s: %s (indexing it again)\n", s->o->vm,
                p->id, msg);
    }
    if (c && (strcmp(c->point, p->id) || strcmp(c->disk, disk))) {
        fprintf(stderr,
                "qbak: %s/%s: catalog of another point (indexing "
                "it again)\n",
                s->o->vm, p->id);
        files_catalog_free(c);
        c = NULL;
    }
    return c;
}

static GPtrArray *
disks_of_point(struct files_session *s, struct restore_point *p)
{
    GPtrArray *v = g_ptr_array_new();
    size_t i;
    json_t *d;

    if (s->disk) {
        g_ptr_array_add(v, s->disk);
        return v;
    }
    json_array_foreach(json_object_get(p->manifest, "disks"), i, d)
    {
        const char *n = json_string_value(json_object_get(d, "disk"));
        if (n && files_point_disk_file(p, n)) {
            g_ptr_array_add(v, (gpointer)n);
        }
    }
    return v;
}

json_t *
files_index(const struct files_opts *o, GError **errp)
{
    struct files_session *s = files_session_open(o, true, true, errp);
    g_autoptr(GPtrArray) todo = g_ptr_array_new_with_free_func(g_free);
    json_t *report, *res = NULL;
    gint64 t0 = g_get_monotonic_time();

    if (!s) {
        return NULL;
    }
    report = json_array();
    for (guint k = 0; k < s->sel->len; k++) {
        struct restore_point *p = s->sel->pdata[k];
        g_autoptr(GPtrArray) disks = disks_of_point(s, p);
        for (guint d = 0; d < disks->len; d++) {
            struct files_catalog *c = read_catalog(s, p, disks->pdata[d]);
            if (c) {
                json_array_append_new(
                    report, json_pack("{s:s, s:s, s:b}", "point", p->id, "disk",
                                      (char *)disks->pdata[d], "indexed", 0));
                files_catalog_free(c);
            } else {
                struct files_target *t = g_new0(struct files_target, 1);
                t->point = p;
                t->disk = disks->pdata[d];
                g_ptr_array_add(todo, t);
            }
        }
    }
    if (index_targets(s, todo, NULL, report, errp)) {
        res = json_pack("{s:s, s:o, s:i, s:f, s:f}", "vm", o->vm, "points",
                        report, "launches", (int)s->launches, "launch_s",
                        s->launch_s, "duration_s",
                        (g_get_monotonic_time() - t0) / 1e6);
        report = NULL;
    }
    json_decref(report);
    files_session_free(s);
    return res;
}

static struct files_fs *
catalog_fs(struct files_catalog *c, const char *name)
{
    for (guint i = 0; c && i < c->fss->len; i++) {
        struct files_fs *fs = c->fss->pdata[i];
        if (strcmp(fs->name, name) == 0) {
            return fs;
        }
    }
    return NULL;
}

static bool
matches(const struct files_entry *e, const char *name_glob,
        const char *path_glob)
{
    const char *base = strrchr(e->path, '/');

    if (name_glob && fnmatch(name_glob, base ? base + 1 : e->path, 0) != 0) {
        return false;
    }
    if (path_glob && fnmatch(path_glob, e->path, 0) != 0) {
        return false;
    }
    return true;
}

static json_t *
match_json(const char *point, const struct files_entry *e, const char *change)
{
    g_autofree char *path = files_name_utf8(e->path, strlen(e->path));
    g_autofree char *mtime = files_time_iso(e->mtime);

    return json_pack("{s:s, s:s, s:s, s:I, s:s, s:s}", "point", point, "path",
                     path, "type", files_type_name(e->type), "size",
                     (json_int_t)e->size, "mtime", mtime, "change", change);
}

static gint
match_cmp(gconstpointer a, gconstpointer b)
{
    json_t *ja = *(json_t *const *)a, *jb = *(json_t *const *)b;
    return strcmp(json_string_value(json_object_get(ja, "path")),
                  json_string_value(json_object_get(jb, "path")));
}

/* Compares the matches of each point with those of the previous one. */
static json_t *
compare_points(GPtrArray *cats, const char *fs_name, const char *name_glob,
               const char *path_glob)
{
    json_t *out = json_array();
    g_autoptr(GHashTable) prev = NULL;

    for (guint k = 0; k < cats->len; k++) {
        struct files_catalog *c = cats->pdata[k];
        struct files_fs *fs = catalog_fs(c, fs_name);
        g_autoptr(GHashTable) cur = g_hash_table_new(g_str_hash, g_str_equal);
        g_autoptr(GPtrArray) lines =
            g_ptr_array_new_with_free_func((GDestroyNotify)json_decref);

        if (fs && fs->error) {
            /* not listed at this point: no match there, nothing deleted */
            g_autofree char *msg =
                files_name_printable(fs->error, strlen(fs->error));
            fprintf(stderr, "qbak find: %s: file system %s not searched: %s\n",
                    c->point, fs_name, msg);
            continue;
        }

        for (guint i = 0; fs && fs->entries && i < fs->entries->len; i++) {
            struct files_entry *e =
                &g_array_index(fs->entries, struct files_entry, i);
            struct files_entry *was;
            const char *change = "new";

            if (!matches(e, name_glob, path_glob)) {
                continue;
            }
            g_hash_table_insert(cur, e->path, e);
            was = prev ? g_hash_table_lookup(prev, e->path) : NULL;
            if (was) {
                change = was->size != e->size || was->mtime != e->mtime ||
                                 was->type != e->type
                             ? "changed"
                             : "same";
            }
            g_ptr_array_add(lines, match_json(c->point, e, change));
        }
        if (prev) {
            GHashTableIter it;
            gpointer key, val;
            g_hash_table_iter_init(&it, prev);
            while (g_hash_table_iter_next(&it, &key, &val)) {
                if (!g_hash_table_contains(cur, key)) {
                    g_ptr_array_add(lines,
                                    match_json(c->point, val, "deleted"));
                }
            }
        }
        g_ptr_array_sort(lines, match_cmp);
        for (guint i = 0; i < lines->len; i++) {
            json_array_append(out, lines->pdata[i]);
        }
        g_clear_pointer(&prev, g_hash_table_unref);
        prev = g_steal_pointer(&cur);
    }
    return out;
}

/* The file system find searches: --fs, or the only one the catalogs
 * know of. */
static const char *
find_fs_name(GPtrArray *cats, const char *want, GError **errp)
{
    g_autoptr(GPtrArray) names = g_ptr_array_new();
    g_autoptr(GString) list = g_string_new(NULL);

    for (guint k = 0; k < cats->len; k++) {
        struct files_catalog *c = cats->pdata[k];
        for (guint i = 0; i < c->fss->len; i++) {
            struct files_fs *fs = c->fss->pdata[i];
            bool seen = false;
            for (guint j = 0; j < names->len; j++) {
                seen = seen || strcmp(names->pdata[j], fs->name) == 0;
            }
            if (!seen) {
                g_ptr_array_add(names, fs->name);
                g_string_append_printf(list, "%s%s (%s)",
                                       names->len > 1 ? ", " : "", fs->name,
                                       fs->type);
            }
            if (want && strcmp(want, fs->name) == 0) {
                return want;
            }
        }
    }
    if (!want && names->len == 1) {
        return names->pdata[0];
    }
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                want         ? "no file system %s in the chosen points (--fs "
                               "values: %s)"
                : names->len ? "several file systems: choose one with --fs "
                               "(%s%s)"
                             : "no file system found%s%s",
                want ? want : "", list->str);
    return NULL;
}

json_t *
files_find(const struct files_opts *o, const char *name_glob,
           const char *path_glob, GError **errp)
{
    struct files_session *s = files_session_open(o, true, false, errp);
    g_autoptr(GPtrArray) cats =
        g_ptr_array_new_with_free_func((GDestroyNotify)files_catalog_free);
    g_autoptr(GPtrArray) fresh =
        g_ptr_array_new_with_free_func((GDestroyNotify)files_catalog_free);
    g_autoptr(GPtrArray) todo = g_ptr_array_new_with_free_func(g_free);
    json_t *report = json_array(), *ids = json_array(), *res = NULL;
    const char *fs_name;

    if (!s) {
        goto out;
    }
    for (guint k = 0; k < s->sel->len; k++) {
        struct restore_point *p = s->sel->pdata[k];
        struct files_catalog *c = read_catalog(s, p, s->disk);
        if (!c) {
            struct files_target *t = g_new0(struct files_target, 1);
            t->point = p;
            t->disk = s->disk;
            g_ptr_array_add(todo, t);
        }
        g_ptr_array_add(cats, c); /* NULL: filled in below */
        json_array_append_new(ids, json_string(p->id));
    }
    if (todo->len && !index_targets(s, todo, fresh, report, errp)) {
        goto out;
    }
    for (guint k = 0, f = 0; k < cats->len; k++) {
        if (!cats->pdata[k] && f < fresh->len) {
            cats->pdata[k] = fresh->pdata[f];
            fresh->pdata[f++] = NULL;
        }
    }
    fs_name = find_fs_name(cats, o->fs, errp);
    if (!fs_name) {
        goto out;
    }
    {
        json_t *indexed = json_array();
        size_t i;
        json_t *r;
        json_array_foreach(report, i, r)
        {
            json_array_append(indexed, json_object_get(r, "point"));
        }
        res = json_pack("{s:s, s:s, s:s, s:O, s:o, s:i, s:f, s:o}", "vm", o->vm,
                        "disk", s->disk, "fs", fs_name, "points", ids,
                        "indexed", indexed, "launches", (int)s->launches,
                        "launch_s", s->launch_s, "matches",
                        compare_points(cats, fs_name, name_glob, path_glob));
    }
out:
    json_decref(report);
    json_decref(ids);
    files_session_free(s);
    return res;
}

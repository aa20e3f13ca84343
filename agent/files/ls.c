/* qbak ls: one directory (or file) of one point. */
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

void
files_mode_string(uint32_t mode, char out[11])
{
    static const char rwx[] = "rwxrwxrwx";
    char t = files_type_of_mode(mode);

    out[0] = t == 'f' ? '-' : t == 'o' ? '?' : t;
    if (S_ISCHR(mode)) {
        out[0] = 'c';
    } else if (S_ISBLK(mode)) {
        out[0] = 'b';
    } else if (S_ISFIFO(mode)) {
        out[0] = 'p';
    } else if (S_ISSOCK(mode)) {
        out[0] = 's';
    }
    for (int i = 0; i < 9; i++) {
        out[1 + i] = (mode & (0400 >> i)) ? rwx[i] : '-';
    }
    out[10] = 0;
}

/* The file system of drive 0 that the point's catalog names (want, or
 * its only one), ready to mount: an indexed point needs no probing of its
 * disk (blkid, 0.2-0.3 s under TCG).  NULL: no catalog, not there, or an
 * LVM volume (its filter needs the probe). */
static struct files_fs *
catalog_fs_of(struct files_session *s, const char *want)
{
    struct restore_point *p = s->sel->pdata[0];
    const char *dev = s->drives->pdata[0];
    struct files_catalog *c = NULL;
    struct files_fs *fs = NULL, *hit = NULL;
    int fd = files_point_fd(s, p, NULL);

    if (fd >= 0) {
        c = files_catalog_read(fd, s->disk, NULL);
        close(fd);
    }
    for (guint i = 0; c && i < c->fss->len; i++) {
        struct files_fs *f = c->fss->pdata[i];
        if (want ? strcmp(f->name, want) == 0 : c->fss->len == 1) {
            hit = f;
        }
    }
    if (hit && !hit->error && hit->type &&
        (strcmp(hit->name, "disk") == 0 ||
         (strspn(hit->name, "0123456789") == strlen(hit->name) &&
          strlen(hit->name) < 4))) {
        fs = files_fs_new();
        fs->name = g_strdup(hit->name);
        fs->dev = strcmp(hit->name, "disk") == 0
                      ? g_strdup(dev)
                      : g_strconcat(dev, hit->name, NULL);
        fs->type = g_strdup(hit->type);
        fs->label = g_strdup(hit->label ? hit->label : "");
        fs->size = hit->size;
    }
    if (c) {
        files_catalog_free(c);
    }
    return fs;
}

struct files_session *
files_open_one(const struct files_opts *o, GPtrArray **fss,
               struct files_fs **fs, bool fs_required, GError **errp)
{
    struct files_session *s = files_session_open(o, false, false, errp);

    *fss = NULL;
    *fs = NULL;
    if (!s || !files_launch_one(s, errp)) {
        goto fail;
    }
    if (g_strcmp0(o->fs, "os") != 0) {
        struct files_fs *cfs = catalog_fs_of(s, o->fs);
        if (cfs && files_mount(s, cfs, NULL)) {
            *fss =
                g_ptr_array_new_with_free_func((GDestroyNotify)files_fs_free);
            g_ptr_array_add(*fss, cfs);
            *fs = cfs;
            return s;
        }
        if (cfs) {
            /* not mountable as recorded: probing reports why */
            files_fs_free(cfs);
        }
    }
    if (o->fs && strcmp(o->fs, "os") != 0) {
        /* --fs given: straight to it */
        *fss = g_ptr_array_new_with_free_func((GDestroyNotify)files_fs_free);
        *fs = files_named_fs(s, 0, o->fs, errp);
        if (!*fs) {
            goto fail;
        }
        g_ptr_array_add(*fss, *fs);
        if (!files_mount(s, *fs, errp)) {
            goto fail;
        }
        return s;
    }
    if (!(*fss = files_list_fs(s, 0, errp))) {
        goto fail;
    }
    if ((!o->fs && (*fss)->len > 1) || g_strcmp0(o->fs, "os") == 0) {
        struct files_fs *os = files_mount_os(s, errp);
        if (os) {
            g_ptr_array_add(*fss, os);
            *fs = os;
            return s;
        }
        if (*errp) {
            goto fail;
        }
        if (o->fs) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                        "--fs os: no operating system found on this disk");
            goto fail;
        }
    }
    if (!fs_required && !o->fs && (*fss)->len != 1) {
        return s; /* the caller lists the file systems */
    }
    *fs = files_pick_fs(*fss, o->fs, errp);
    if (!*fs || !files_mount(s, *fs, errp)) {
        goto fail;
    }
    return s;
fail:
    if (s) {
        g_prefix_error(errp, "%s/%s: ", o->vm,
                       s->sel ? ((struct restore_point *)s->sel->pdata[0])->id
                              : "");
    }
    if (*fss) {
        g_ptr_array_free(*fss, true);
        *fss = NULL;
    }
    files_session_free(s);
    return NULL;
}

static json_t *
entry_json(struct files_session *s, const struct files_entry *e,
           const char *name)
{
    g_autofree char *n = files_name_utf8(name, strlen(name));
    g_autofree char *mtime = files_time_iso(e->mtime);
    char mode[16];
    json_t *j;

    g_snprintf(mode, sizeof(mode), "%04o", e->mode & 07777);
    j = json_pack("{s:s, s:s, s:I, s:s, s:s}", "name", n, "type",
                  files_type_name(e->type), "size", (json_int_t)e->size,
                  "mtime", mtime, "mode", mode);
    if (e->type == 'l') {
        char *t = guestfs_readlink(s->g, e->path);
        if (t) {
            g_autofree char *tu = files_name_utf8(t, strlen(t));
            json_object_set_new(j, "target", json_string(tu));
            free(t);
        }
    }
    return j;
}

static json_t *
fs_list_json(GPtrArray *fss)
{
    json_t *a = json_array();

    for (guint i = 0; i < fss->len; i++) {
        struct files_fs *fs = fss->pdata[i];
        g_autofree char *label = files_name_utf8(fs->label, strlen(fs->label));
        json_array_append_new(a,
                              json_pack("{s:s, s:s, s:I, s:s}", "fs", fs->name,
                                        "type", fs->type, "size",
                                        (json_int_t)fs->size, "label", label));
    }
    return a;
}

/* The entries of directory dir (resolved), sorted by name.  A name that
 * cannot be read, or a listing its link count (nlink, on fstype) says is
 * short, adds a line to errors: what can be read is still listed. */
static json_t *
list_dir(struct files_session *s, const char *dir, const char *fstype,
         int64_t nlink, json_t *errors, GError **errp)
{
    int64_t subdirs = 0, unreadable = 0;
    g_autofree char *damage = NULL;
    char **names = guestfs_ls(s->g, dir);
    g_autoptr(GPtrArray) v = g_ptr_array_new_with_free_func(free);
    GArray *entries = files_entries_new();
    json_t *a = json_array();
    const char *prefix = strcmp(dir, "/") == 0 ? "" : dir;

    if (!names) {
        files_gerror(s, dir, errp);
        goto fail;
    }
    for (char **n = names; *n; n++) {
        g_ptr_array_add(v, *n);
    }
    free(names);
    /* lstat the whole directory in batches: one round trip each */
    for (guint off = 0; off < v->len; off += 1000) {
        guint n = MIN(1000, v->len - off);
        g_autofree char **batch = g_new0(char *, n + 1);
        struct guestfs_statns_list *st;

        memcpy(batch, v->pdata + off, n * sizeof(char *));
        st = guestfs_lstatnslist(s->g, dir, batch);
        if (!st) {
            files_gerror(s, dir, errp);
            goto fail;
        }
        for (guint i = 0; i < st->len && i < n; i++) {
            struct files_entry e = {0};
            e.path = g_strconcat(prefix, "/", batch[i], NULL);
            if (st->val[i].st_ino < 0) {
                g_autofree char *why = files_lstat_reason(s, e.path);
                g_autofree char *line = g_strdup_printf("%s: %s", e.path, why);
                g_autofree char *u = files_name_utf8(line, strlen(line));

                json_array_append_new(errors, json_string(u));
                g_free(e.path);
                unreadable++;
                continue;
            }
            subdirs += S_ISDIR(st->val[i].st_mode);
            e.mode = (uint32_t)st->val[i].st_mode;
            e.type = files_type_of_mode(e.mode);
            e.size = (uint64_t)MAX(st->val[i].st_size, 0);
            e.mtime = st->val[i].st_mtime_sec;
            g_array_append_val(entries, e);
        }
        guestfs_free_statns_list(st);
    }
    if (!files_kernel_errors(s, &damage, errp)) {
        goto fail;
    }
    if (damage) {
        g_autofree char *line =
            g_strdup_printf("%s: file system damaged: %s", dir, damage);
        g_autofree char *u = files_name_utf8(line, strlen(line));

        json_array_append_new(errors, json_string(u));
    }
    /* An unreadable name may be one of the subdirectories counted. */
    if (files_nlink_counts_subdirs(fstype) && nlink >= 2 &&
        (nlink < 2 + subdirs || nlink > 2 + subdirs + unreadable)) {
        g_autofree char *line = files_nlink_damage(dir, nlink, subdirs);
        g_autofree char *u = files_name_utf8(line, strlen(line));

        json_array_append_new(errors, json_string(u));
    }
    files_entries_sort(entries);
    for (guint i = 0; i < entries->len; i++) {
        struct files_entry *e = &g_array_index(entries, struct files_entry, i);
        json_array_append_new(a, entry_json(s, e, strrchr(e->path, '/') + 1));
    }
    g_array_unref(entries);
    return a;
fail:
    g_array_unref(entries);
    json_decref(a);
    return NULL;
}

json_t *
files_ls(const struct files_opts *o, const char *path, GError **errp)
{
    GPtrArray *fss = NULL;
    struct files_fs *fs = NULL;
    struct files_session *s = files_open_one(o, &fss, &fs, path != NULL, errp);
    struct restore_point *p;
    struct guestfs_statns *st = NULL;
    g_autofree char *rpath = NULL;
    json_t *res = NULL, *entries = NULL, *errors = NULL;

    if (!s) {
        return NULL;
    }
    p = s->sel->pdata[0];
    if (!fs) {
        res = json_pack("{s:s, s:s, s:o}", "point", p->id, "disk", s->disk,
                        "filesystems", fs_list_json(fss));
        goto out;
    }
    rpath = files_resolve(s, path ? path : "/", errp);
    if (!rpath) {
        goto out;
    }
    st = guestfs_lstatns(s->g, rpath);
    if (!st) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no such file or directory in point %s", path, p->id);
        goto out;
    }
    errors = json_array();
    if (S_ISDIR(st->st_mode)) {
        entries = list_dir(s, rpath, fs->type, st->st_nlink, errors, errp);
    } else {
        struct files_entry e = {
            .path = rpath,
            .mode = (uint32_t)st->st_mode,
            .type = files_type_of_mode((uint32_t)st->st_mode),
            .size = (uint64_t)MAX(st->st_size, 0),
            .mtime = st->st_mtime_sec,
        };
        entries = json_array();
        json_array_append_new(entries,
                              entry_json(s, &e, strrchr(rpath, '/') + 1));
    }
    if (entries) {
        g_autofree char *pu = files_name_utf8(rpath, strlen(rpath));
        res = json_pack("{s:s, s:s, s:s, s:s, s:o, s:O, s:f}", "point", p->id,
                        "disk", s->disk, "fs", fs->name, "path", pu, "entries",
                        entries, "errors", errors, "launch_s", s->launch_s);
    }
out:
    if (!res) {
        g_prefix_error(errp, "%s/%s: ", o->vm, p->id);
    }
    if (st) {
        guestfs_free_statns(st);
    }
    json_decref(errors);
    g_ptr_array_free(fss, true);
    files_session_free(s);
    return res;
}

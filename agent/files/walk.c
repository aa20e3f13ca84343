/* Walking a mounted file system: every path with its lstat data, in a
 * few round trips (see guestfs.h).
 *
 * Measured under TCG on a 20,000-file ext4: find0 sends one protocol
 * chunk per name (2.5-2.9 s), and each appliance call costs about 2 ms
 * however small.  So the walk goes level by level: one glob_expand per
 * level lists the children of every directory found so far (one reply,
 * 0.4 s for 20,000 names), then one lstatnslist per directory (it takes
 * plain names only, no paths) gives types, sizes and times.  The glob
 * names only real directories found by lstat, so it never follows a
 * symlink, and needs no stat of its own (no directory slash).
 *
 * glob skips what it cannot read, silently: a directory the appliance's
 * kernel cannot open or read (I/O error, corrupt blocks) would look
 * empty or short, and a name whose inode cannot be read would vanish.
 * So a name lstat cannot read fails the walk with lstatns's error, and
 * a directory whose children look wrong is read again with ls, which
 * reports a read error: one that came out empty, or (on file systems
 * whose directory link count is 2 + its subdirectories: ext2/3/4, xfs)
 * one whose subdirectories found do not match its link count.  A
 * mismatch that ls does not explain still fails: the listing would be
 * short.  Probes are rare (empty directories), so the walk stays at a
 * few round trips per level.
 *
 * The cost is the appliance's kernel, not the round trips: a call costs
 * about 1 ms (echo_daemon), an lstatnslist of 200 names 21 ms cold and
 * 5 ms warm, and a static C walker run inside the appliance (readdir +
 * fstatat, no protocol) took 80 % of this walk's time on the same
 * appliance (2.66 s against 3.36 s a point, 20,000 files, load 5).
 * filesystem_walk (libtsk) is no cheaper (same QEMU CPU a point) and
 * has no mode.
 */
#include <string.h>
#include <sys/stat.h>

#include "agent/error.h"
#include "agent/files/guestfs.h"
#include "agent/files/names.h"

/* Names per lstatnslist call: a reply stays well under the protocol's
 * message limit (about 180 bytes a name). */
#define STAT_BATCH 1000
/* Pattern bytes per glob_expand call (the protocol takes up to 4 MB a
 * message; the reply, which holds every child, must fit as well). */
#define GLOB_PATTERN_MAX (64 * 1024)
/* Every name of a directory, dot files included: glob matches a leading
 * dot only literally, and each alternative reads the directory again,
 * so two, with ".." dropped from the second. */
#define GLOB_CHILDREN "/{*,.?*}"

/* One directory of the current level: its path in the file system and
 * its children's names (plain names). */
struct walk_dir {
    char *path;  /* "/" or "/a/b" */
    char *apath; /* the appliance's path: mountpoint + path */
    GPtrArray *names;
    int64_t nlink; /* its lstat link count, or -1 */
};

static void
walk_dir_free(struct walk_dir *d)
{
    g_free(d->path);
    g_free(d->apath);
    g_ptr_array_unref(d->names);
    g_free(d);
}

/* The children of dirs[from..to) in one glob_expand; on a failure (a
 * reply over the message limit) halves the range, and lists one
 * directory alone with ls (streamed: no limit). */
static bool
glob_children(struct files_session *s, struct walk_dir **dirs, guint from,
              guint to, GHashTable *by_apath, GError **errp)
{
    struct guestfs_glob_expand_opts_argv ga = {
        .bitmask = GUESTFS_GLOB_EXPAND_OPTS_DIRECTORYSLASH_BITMASK,
        .directoryslash = 0,
    };
    g_autoptr(GString) pat = g_string_new(NULL);
    char **got;

    if (to - from == 1) {
        /* the appliance's root "/" adds nothing before "/{...}" */
        if (strcmp(dirs[from]->apath, "/") != 0) {
            files_glob_quote(pat, dirs[from]->apath, strlen(dirs[from]->apath));
        }
    } else {
        /* glob_expand takes an absolute pattern: "/{a/b,c}/{...}"; a
         * level holds no root, only paths below it */
        g_string_append(pat, "/{");
        for (guint i = from; i < to; i++) {
            if (i > from) {
                g_string_append_c(pat, ',');
            }
            files_glob_quote(pat, dirs[i]->apath + 1,
                             strlen(dirs[i]->apath + 1));
        }
        g_string_append_c(pat, '}');
    }
    g_string_append(pat, GLOB_CHILDREN);
    got = guestfs_glob_expand_opts_argv(s->g, pat->str, &ga);
    if (!got && to - from > 1) {
        guint mid = from + (to - from) / 2;
        return glob_children(s, dirs, from, mid, by_apath, errp) &&
               glob_children(s, dirs, mid, to, by_apath, errp);
    }
    if (!got) {
        /* one huge directory */
        char **names = guestfs_ls(s->g, dirs[from]->apath);
        if (!names) {
            return files_gerror(s, dirs[from]->apath, errp);
        }
        for (char **n = names; *n; n++) {
            g_ptr_array_add(dirs[from]->names, *n);
        }
        free(names);
        return true;
    }
    for (char **p = got; *p; p++) {
        char *slash = strrchr(*p, '/');
        struct walk_dir *d;

        if (!slash || !slash[1] || strcmp(slash + 1, "..") == 0) {
            free(*p);
            continue;
        }
        *slash = 0;
        d = g_hash_table_lookup(by_apath, **p ? *p : "/");
        if (d) {
            g_ptr_array_add(d->names, g_strdup(slash + 1));
        }
        free(*p);
    }
    free(got);
    return true;
}

/* The children of every directory of dirs. */
static bool
list_level(struct files_session *s, GPtrArray *dirs, GError **errp)
{
    g_autoptr(GHashTable) by_apath = g_hash_table_new(g_str_hash, g_str_equal);
    guint from = 0;
    gsize bytes = 0;

    for (guint i = 0; i < dirs->len; i++) {
        struct walk_dir *d = dirs->pdata[i];
        g_hash_table_insert(by_apath, d->apath, d);
    }
    for (guint i = 0; i < dirs->len; i++) {
        struct walk_dir *d = dirs->pdata[i];
        /* quoting at most doubles a path */
        bytes += 2 * strlen(d->apath) + 1;
        if (bytes > GLOB_PATTERN_MAX && i > from) {
            if (!glob_children(s, (struct walk_dir **)dirs->pdata, from, i,
                               by_apath, errp)) {
                return false;
            }
            from = i;
            bytes = 2 * strlen(d->apath) + 1;
        }
    }
    return from == dirs->len ||
           glob_children(s, (struct walk_dir **)dirs->pdata, from, dirs->len,
                         by_apath, errp);
}

static struct walk_dir *
walk_dir_new(const char *mnt, const char *path, int64_t nlink)
{
    struct walk_dir *d = g_new0(struct walk_dir, 1);

    d->nlink = nlink;
    d->path = g_strdup(path);
    d->apath = strcmp(path, "/") == 0 ? g_strdup(*mnt ? mnt : "/")
                                      : g_strconcat(mnt, path, NULL);
    d->names = g_ptr_array_new_with_free_func(free);
    return d;
}

bool
files_nlink_counts_subdirs(const char *fstype)
{
    static const char *const types[] = {"ext2", "ext3", "ext4", "xfs"};

    for (guint i = 0; fstype && i < G_N_ELEMENTS(types); i++) {
        if (strcmp(fstype, types[i]) == 0) {
            return true;
        }
    }
    return false;
}

char *
files_nlink_damage(const char *path, int64_t nlink, int64_t subdirs)
{
    return g_strdup_printf(
        "%s: directory damaged: its link count %" G_GINT64_FORMAT
        " means %" G_GINT64_FORMAT " subdirectories, %" G_GINT64_FORMAT
        " can be read",
        path, nlink, nlink - 2, subdirs);
}

char *
files_lstat_reason(struct files_session *s, const char *apath)
{
    struct guestfs_statns *st = guestfs_lstatns(s->g, apath);
    const char *msg = st ? "lstat failed" : guestfs_last_error(s->g);

    if (st) {
        guestfs_free_statns(st);
    }
    /* "lstatns: /qbak/N/a/b: Structure needs cleaning": the reason only,
     * the appliance's path means nothing to the user */
    if (msg && g_str_has_prefix(msg, "lstatns: ") &&
        g_str_has_prefix(msg + 9, apath) &&
        g_str_has_prefix(msg + 9 + strlen(apath), ": ")) {
        msg += 9 + strlen(apath) + 2;
    }
    return g_strdup(msg ? msg : "cannot be read");
}

/* A name glob listed that lstat could not read: lstatns says why. */
static bool
unreadable_name(struct files_session *s, struct walk_dir *d, const char *name,
                GError **errp)
{
    g_autofree char *apath = g_strconcat(
        strcmp(d->apath, "/") == 0 ? "" : d->apath, "/", name, NULL);
    g_autofree char *reason = files_lstat_reason(s, apath);
    g_autofree char *path =
        g_strconcat(strcmp(d->path, "/") == 0 ? "" : d->path, "/", name, NULL);

    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED, "%s: %s", path, reason);
    return false;
}

/* d came out empty, or with subdirs subdirectories where its link count
 * says otherwise: ls reads it again and fails on a read error that glob
 * skipped.  Fails too when ls finds names glob did not, or the link
 * count still disagrees (a short listing either way). */
static bool
check_dir(struct files_session *s, struct walk_dir *d, bool nlink_ok,
          int64_t subdirs, GError **errp)
{
    bool mismatch = nlink_ok && d->nlink >= 2 && d->nlink != 2 + subdirs;
    char **names;
    guint n = 0;

    if (d->names->len && !mismatch) {
        return true;
    }
    names = guestfs_ls(s->g, d->apath);
    if (!names) {
        const char *msg = guestfs_last_error(s->g);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                    "%s: directory cannot be read: %s", d->path,
                    msg ? msg : "ls failed");
        return false;
    }
    for (char **p = names; *p; p++) {
        n++;
        free(*p);
    }
    free(names);
    if (n != d->names->len) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                    "%s: directory reads differently (%u names, then %u)",
                    d->path, d->names->len, n);
        return false;
    }
    if (mismatch) {
        g_autofree char *msg = files_nlink_damage(d->path, d->nlink, subdirs);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED, "%s", msg);
        return false;
    }
    return true;
}

/* lstat of d's children: appends them to entries and their
 * subdirectories to next; then checks d (check_dir). */
static bool
stat_dir(struct files_session *s, const char *mnt, struct walk_dir *d,
         bool nlink_ok, GArray *entries, GPtrArray *next, GError **errp)
{
    const char *prefix = strcmp(d->path, "/") == 0 ? "" : d->path;
    int64_t subdirs = 0;

    for (guint off = 0; off < d->names->len; off += STAT_BATCH) {
        guint n = MIN(STAT_BATCH, d->names->len - off);
        /* the top directory's own link count (its parent's lstat gave
         * every other one's): "." in the first batch, no extra call */
        bool self = nlink_ok && d->nlink < 0 && off == 0;
        g_autofree char **v = g_new0(char *, n + 2);
        struct guestfs_statns_list *st;

        memcpy(v, d->names->pdata + off, n * sizeof(char *));
        if (self) {
            v[n] = (char *)".";
        }
        st = guestfs_lstatnslist(s->g, d->apath, v);
        if (!st) {
            return files_gerror(s, "lstatnslist", errp);
        }
        if (self && st->len > n && st->val[n].st_ino >= 0) {
            d->nlink = st->val[n].st_nlink;
        }
        for (guint i = 0; i < st->len && i < n; i++) {
            struct guestfs_statns *t = &st->val[i];
            struct files_entry e = {0};
            if (t->st_ino < 0) {
                /* listed but unreadable (a corrupt inode, an I/O
                 * error): the file system is read-only, nothing moved */
                guestfs_free_statns_list(st);
                return unreadable_name(s, d, v[i], errp);
            }
            e.path = g_strconcat(prefix, "/", v[i], NULL);
            e.mode = (uint32_t)t->st_mode;
            e.type = files_type_of_mode(e.mode);
            e.size = t->st_size < 0 ? 0 : (uint64_t)t->st_size;
            e.mtime = t->st_mtime_sec;
            g_array_append_val(entries, e);
            if (S_ISDIR(e.mode)) {
                subdirs++;
                g_ptr_array_add(next, walk_dir_new(mnt, e.path, t->st_nlink));
            }
        }
        guestfs_free_statns_list(st);
    }
    return check_dir(s, d, nlink_ok, subdirs, errp);
}

GArray *
files_walk_at(struct files_session *s, const char *mnt, const char *root,
              const char *fstype, GError **errp)
{
    GArray *entries = files_entries_new();
    GPtrArray *level =
        g_ptr_array_new_with_free_func((GDestroyNotify)walk_dir_free);
    bool nlink_ok = files_nlink_counts_subdirs(fstype);
    g_autofree char *damage = NULL;

    mnt = mnt && strcmp(mnt, "/") != 0 ? mnt : "";
    g_ptr_array_add(level, walk_dir_new(mnt, root, -1));
    while (level->len) {
        GPtrArray *next =
            g_ptr_array_new_with_free_func((GDestroyNotify)walk_dir_free);

        if (!list_level(s, level, errp)) {
            goto fail_next;
        }
        for (guint i = 0; i < level->len; i++) {
            if (!stat_dir(s, mnt, level->pdata[i], nlink_ok, entries, next,
                          errp)) {
                goto fail_next;
            }
        }
        g_ptr_array_unref(level);
        level = next;
        continue;
    fail_next:
        g_ptr_array_unref(next);
        g_ptr_array_unref(level);
        g_array_unref(entries);
        /* What this file system logged is not the next one's. */
        files_kernel_errors(s, NULL, NULL);
        return NULL;
    }
    g_ptr_array_unref(level);
    /* What the kernel skipped without an error to the caller (ext4
     * drops a directory block that fails its checksum) it logged. */
    if (!files_kernel_errors(s, &damage, errp)) {
        g_array_unref(entries);
        return NULL;
    }
    if (damage) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                    "%s: file system damaged: %s", root, damage);
        g_array_unref(entries);
        return NULL;
    }
    files_entries_sort(entries);
    return entries;
}

GArray *
files_walk(struct files_session *s, const char *root, const char *fstype,
           GError **errp)
{
    return files_walk_at(s, NULL, root, fstype, errp);
}

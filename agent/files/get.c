/* qbak get: copies files and directories out of one point.
 *
 * Every name comes from the guest file system and is untrusted: each
 * component is checked (names.h) before it is created, everything is
 * created relative to a directory fd with O_NOFOLLOW and O_EXCL, and
 * directories are entered with O_NOFOLLOW, so a symlink (ours or one
 * planted under DEST) is never followed and nothing lands outside DEST.
 * Symlinks are copied as symlinks; their targets are just bytes.  Set-id
 * bits are dropped (the copies belong to whoever runs qbak); device
 * nodes, fifos and sockets are not created. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

/* Directory depth copied at most (one fd each while creating). */
#define MAX_DEPTH 256

struct get {
    struct files_session *s;
    const char *fstype; /* of the file system read (borrowed) */
    json_t *skipped;
    uint64_t files, dirs, symlinks, bytes;
    GPtrArray *dir_fixups; /* struct dir_fixup *: modes and times last */
};

struct dir_fixup {
    char **parts; /* components below the copy's top directory fd */
    uint32_t mode;
    int64_t atime, mtime;
};

static void
skip(struct get *g, const char *path, const char *reason)
{
    g_autofree char *p = files_name_utf8(path, strlen(path));
    json_array_append_new(g->skipped,
                          json_pack("{s:s, s:s}", "path", p, "reason", reason));
}

static void
set_times(int fd, const char *name, int64_t atime, int64_t mtime, int flags)
{
    struct timespec ts[2] = {{.tv_sec = atime}, {.tv_sec = mtime}};
    utimensat(fd, name, ts, flags);
}

/* Downloads the guest file at rpath into a new file name under dirfd. */
static bool
copy_file(struct get *g, int dirfd, const char *name, const char *rpath,
          const struct guestfs_statns *st, GError **errp)
{
    g_autofree char *proc = NULL;
    struct stat out;
    int fd = openat(dirfd, name,
                    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "create %s: %s", name, g_strerror(errno));
        return false;
    }
    proc = g_strdup_printf("/proc/self/fd/%d", fd);
    if (guestfs_download(g->s->g, rpath, proc) < 0) {
        close(fd);
        return files_gerror(g->s, rpath, errp);
    }
    if (fstat(fd, &out) < 0 || out.st_size != st->st_size) {
        close(fd);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                    "%s: copied %lld bytes of %lld", rpath,
                    (long long)out.st_size, (long long)st->st_size);
        return false;
    }
    fchmod(fd, (mode_t)(st->st_mode & 0777));
    {
        struct timespec ts[2] = {
            {.tv_sec = st->st_atime_sec, .tv_nsec = st->st_atime_nsec},
            {.tv_sec = st->st_mtime_sec, .tv_nsec = st->st_mtime_nsec}};
        if (ts[0].tv_nsec < 0 || ts[0].tv_nsec > 999999999) {
            ts[0].tv_nsec = 0;
        }
        if (ts[1].tv_nsec < 0 || ts[1].tv_nsec > 999999999) {
            ts[1].tv_nsec = 0;
        }
        futimens(fd, ts);
    }
    close(fd);
    g->files++;
    g->bytes += (uint64_t)st->st_size;
    return true;
}

static bool
copy_symlink(struct get *g, int dirfd, const char *name, const char *rpath,
             const struct guestfs_statns *st, GError **errp)
{
    char *target = guestfs_readlink(g->s->g, rpath);

    if (!target) {
        return files_gerror(g->s, rpath, errp);
    }
    if (symlinkat(target, dirfd, name) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "symlink %s: %s", name, g_strerror(errno));
        free(target);
        return false;
    }
    free(target);
    set_times(dirfd, name, st->st_atime_sec, st->st_mtime_sec,
              AT_SYMLINK_NOFOLLOW);
    g->symlinks++;
    return true;
}

/* Opens the directory parts[0..n-1] under top, never following a
 * symlink. */
static int
open_parts(int top, char **parts, guint n)
{
    int fd = dup(top);

    for (guint i = 0; fd >= 0 && i < n; i++) {
        int next = openat(fd, parts[i],
                          O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        close(fd);
        fd = next;
    }
    return fd;
}

static void
fixup_free(struct dir_fixup *f)
{
    g_strfreev(f->parts);
    g_free(f);
}

/* Copies the tree below rdir (resolved) into topfd (created for it). */
static bool
copy_tree(struct get *g, int topfd, const char *rdir, GError **errp)
{
    GArray *entries = files_walk(g->s, rdir, g->fstype, errp);
    size_t rlen = strcmp(rdir, "/") == 0 ? 0 : strlen(rdir);
    g_autofree char *cached = NULL; /* relative dir of cached_fd */
    int cached_fd = -1;
    bool ok = true;

    if (!entries) {
        return false;
    }
    for (guint i = 0; ok && i < entries->len; i++) {
        struct files_entry *e = &g_array_index(entries, struct files_entry, i);
        const char *rel = e->path + rlen;
        const char *why = NULL;
        g_auto(GStrv) parts =
            files_path_split(rel, strlen(rel), MAX_DEPTH, &why);
        guint n;
        g_autofree char *parent = NULL;
        int dirfd;
        g_autoptr(GError) err = NULL;
        /* what the walk saw (one round trip per directory, not per
         * entry); atime is not kept, mtime stands in */
        struct guestfs_statns sb = {
            .st_mode = e->mode,
            .st_size = (int64_t)e->size,
            .st_atime_sec = e->mtime,
            .st_mtime_sec = e->mtime,
        };
        struct guestfs_statns *st = &sb;

        if (!parts) {
            skip(g, e->path, why);
            continue;
        }
        n = g_strv_length(parts);
        parent = g_strjoinv("/", parts);
        {
            char *slash = strrchr(parent, '/');
            if (slash) {
                *slash = 0;
            } else {
                parent[0] = 0;
            }
        }
        if (!cached || strcmp(cached, parent) != 0) {
            if (cached_fd >= 0) {
                close(cached_fd);
            }
            cached_fd = open_parts(topfd, parts, n - 1);
            g_free(cached);
            cached = g_strdup(parent);
        }
        dirfd = cached_fd;
        if (dirfd < 0) {
            skip(g, e->path, "its directory was not copied");
            continue;
        }
        switch (files_type_of_mode((uint32_t)st->st_mode)) {
        case 'f':
            ok = copy_file(g, dirfd, parts[n - 1], e->path, st, &err);
            break;
        case 'l':
            ok = copy_symlink(g, dirfd, parts[n - 1], e->path, st, &err);
            break;
        case 'd':
            if (mkdirat(dirfd, parts[n - 1], 0700) < 0) {
                g_set_error(&err, G_FILE_ERROR, g_file_error_from_errno(errno),
                            "mkdir %s: %s", parts[n - 1], g_strerror(errno));
                ok = false;
            } else {
                struct dir_fixup *f = g_new0(struct dir_fixup, 1);
                f->parts = g_strdupv(parts);
                f->mode = (uint32_t)st->st_mode;
                f->atime = st->st_atime_sec;
                f->mtime = st->st_mtime_sec;
                g_ptr_array_add(g->dir_fixups, f);
                g->dirs++;
            }
            break;
        default:
            skip(g, e->path, "special file (device, fifo or socket)");
        }
        if (!ok && err && err->domain == G_FILE_ERROR &&
            err->code == G_FILE_ERROR_EXIST) {
            /* two entries of one name (a damaged directory): keep the
             * first, never replace */
            skip(g, e->path, "a second entry of this name");
            ok = true;
        } else if (!ok) {
            g_propagate_prefixed_error(errp, g_steal_pointer(&err),
                                       "%s: ", e->path);
        }
    }
    if (cached_fd >= 0) {
        close(cached_fd);
    }
    g_array_unref(entries);
    return ok;
}

/* Modes and times of the directories, deepest first, once nothing more
 * is written into them. */
static void
fix_dirs(struct get *g, int topfd)
{
    for (guint i = g->dir_fixups->len; i > 0; i--) {
        struct dir_fixup *f = g->dir_fixups->pdata[i - 1];
        int fd = open_parts(topfd, f->parts, g_strv_length(f->parts));
        if (fd >= 0) {
            struct timespec ts[2] = {{.tv_sec = f->atime},
                                     {.tv_sec = f->mtime}};
            fchmod(fd, (mode_t)(f->mode & 01777));
            futimens(fd, ts);
            close(fd);
        }
    }
    g_ptr_array_set_size(g->dir_fixups, 0);
}

/* Copies one resolved path to dirfd/name. */
static bool
copy_one(struct get *g, int dirfd, const char *name, const char *rpath,
         GError **errp)
{
    struct guestfs_statns *st = guestfs_lstatns(g->s->g, rpath);
    bool ok = false;
    int topfd;

    if (!st) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no such file or directory", rpath);
        return false;
    }
    switch (files_type_of_mode((uint32_t)st->st_mode)) {
    case 'f':
        ok = copy_file(g, dirfd, name, rpath, st, errp);
        break;
    case 'l':
        ok = copy_symlink(g, dirfd, name, rpath, st, errp);
        break;
    case 'd':
        if (mkdirat(dirfd, name, 0700) < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                        "mkdir %s: %s", name, g_strerror(errno));
            break;
        }
        g->dirs++;
        topfd = openat(dirfd, name,
                       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (topfd < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                        "%s: %s", name, g_strerror(errno));
            break;
        }
        ok = copy_tree(g, topfd, rpath, errp);
        fix_dirs(g, topfd);
        {
            struct timespec ts[2] = {{.tv_sec = st->st_atime_sec},
                                     {.tv_sec = st->st_mtime_sec}};
            fchmod(topfd, (mode_t)(st->st_mode & 01777));
            futimens(topfd, ts);
        }
        close(topfd);
        break;
    default:
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "%s: a special file (device, fifo or socket) is not "
                    "copied",
                    rpath);
    }
    guestfs_free_statns(st);
    return ok;
}

static bool
get_stdout(struct get *g, const char *rpath, GError **errp)
{
    struct guestfs_statns *st = guestfs_lstatns(g->s->g, rpath);
    bool is_file = st && S_ISREG(st->st_mode);

    if (st) {
        g->bytes = (uint64_t)MAX(st->st_size, 0);
        guestfs_free_statns(st);
    }
    if (!is_file) {
        g_set_error(errp, QBAK_ERROR,
                    st ? QBAK_ERROR_REFUSED : QBAK_ERROR_NOT_FOUND, "%s: %s",
                    rpath,
                    st ? "--output - takes one regular file" : "no such file");
        return false;
    }
    if (guestfs_download(g->s->g, rpath, "/proc/self/fd/1") < 0) {
        return files_gerror(g->s, rpath, errp);
    }
    g->files = 1;
    return true;
}

/* The name a copy of rpath gets inside a destination directory. */
static const char *
dest_name(const char *rpath, const char **why)
{
    const char *base = strrchr(rpath, '/');

    base = base && base[1] ? base + 1 : "root";
    *why = files_name_unsafe(base, strlen(base));
    return base;
}

static bool
get_all(struct get *g, const struct files_get_opts *go, GError **errp)
{
    struct stat st;
    bool dest_dir = stat(go->output, &st) == 0 && S_ISDIR(st.st_mode);
    int dirfd = -1;
    bool ok = true;
    g_autofree char *parent = NULL, *base = NULL;

    if (!dest_dir && g_strv_length(go->paths) > 1) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "%s: not a directory (several paths go into one)",
                    go->output);
        return false;
    }
    if (dest_dir) {
        dirfd = open(go->output, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } else {
        parent = g_path_get_dirname(go->output);
        base = g_path_get_basename(go->output);
        dirfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    if (dirfd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", dest_dir ? go->output : parent,
                    g_strerror(errno));
        return false;
    }
    for (char **p = go->paths; ok && *p; p++) {
        g_autofree char *rpath = files_resolve(g->s, *p, errp);
        const char *why = NULL;
        const char *name;

        if (!rpath) {
            ok = false;
            break;
        }
        name = dest_dir ? dest_name(rpath, &why) : base;
        if (why) {
            skip(g, rpath, why);
            continue;
        }
        ok = copy_one(g, dirfd, name, rpath, errp);
    }
    close(dirfd);
    return ok;
}

json_t *
files_get(const struct files_opts *o, const struct files_get_opts *go,
          GError **errp)
{
    GPtrArray *fss = NULL;
    struct files_fs *fs = NULL;
    struct get g = {0};
    bool ok;
    json_t *res = NULL;

    g.s = files_open_one(o, &fss, &fs, true, errp);
    if (!g.s) {
        return NULL;
    }
    g.fstype = fs->type;
    g.skipped = json_array();
    g.dir_fixups = g_ptr_array_new_with_free_func((GDestroyNotify)fixup_free);
    if (strcmp(go->output, "-") == 0) {
        ok = g_strv_length(go->paths) == 1;
        if (!ok) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                        "--output - takes one path");
        } else {
            g_autofree char *rpath = files_resolve(g.s, go->paths[0], errp);
            ok = rpath && get_stdout(&g, rpath, errp);
        }
    } else {
        ok = get_all(&g, go, errp);
    }
    if (ok) {
        res = json_pack(
            "{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:O, s:f}", "point",
            ((struct restore_point *)g.s->sel->pdata[0])->id, "disk", g.s->disk,
            "fs", fs->name, "output", go->output, "files", (json_int_t)g.files,
            "dirs", (json_int_t)g.dirs, "symlinks", (json_int_t)g.symlinks,
            "bytes", (json_int_t)g.bytes, "skipped", g.skipped, "launch_s",
            g.s->launch_s);
    } else {
        g_prefix_error(errp, "%s/%s: ", o->vm,
                       ((struct restore_point *)g.s->sel->pdata[0])->id);
    }
    json_decref(g.skipped);
    g_ptr_array_free(g.dir_fixups, true);
    g_ptr_array_free(fss, true);
    files_session_free(g.s);
    return res;
}

/* The appliance and the points in it, walks and path resolution: see
 * guestfs.h (file systems: volumes.c). */
#include "agent/files/guestfs.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/files/kmsg.h"
#include "agent/files/names.h"
#include "io/qcow2.h"

/* Appliance memory (MiB) unless LIBGUESTFS_MEMSIZE says otherwise: a
 * base, and room per drive for the inodes, dentries and metadata blocks
 * of one walked file system of FILES_MOUNTED_ENTRIES (index leaves each
 * mounted).  Measured under TCG with 30 points of 20,000 files at 640
 * MiB: reclaim stalled single lstatnslist calls for 2-6 s once a dozen
 * points were mounted, and an umount per point costs 0.5-0.9 s. */
#define FILES_APPLIANCE_MIB 640
#define FILES_APPLIANCE_MIB_PER_DRIVE 64
#define FILES_APPLIANCE_MIB_MAX 4096

bool
files_kernel_errors(struct files_session *s, char **first, GError **errp)
{
    char *log = guestfs_dmesg(s->g);
    char *found;

    if (!log) {
        return files_gerror(s, "dmesg", errp);
    }
    found = files_kmsg_first_error(log, strlen(log), &s->kmsg_seen);
    free(log);
    if (first) {
        *first = found;
    } else {
        g_free(found);
    }
    return true;
}

bool
files_gerror(struct files_session *s, const char *what, GError **errp)
{
    const char *msg = s->g ? guestfs_last_error(s->g) : NULL;

    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED, "%s: %s", what,
                msg ? msg : "failed");
    return false;
}

char *
files_time_iso(int64_t t)
{
    g_autoptr(GDateTime) d = g_date_time_new_from_unix_utc(t);

    if (!d) {
        return g_strdup_printf("@%" G_GINT64_FORMAT, t);
    }
    return g_date_time_format(d, "%Y-%m-%dT%H:%M:%SZ");
}

const char *
files_point_disk_file(const struct restore_point *p, const char *disk)
{
    json_t *d = restore_point_disk(p, disk);
    return d ? json_string_value(json_object_get(d, "file")) : NULL;
}

/* The disks of the given points, sorted, without repeats. */
static GPtrArray *
disks_of(GPtrArray *points)
{
    GPtrArray *names = g_ptr_array_new_with_free_func(g_free);

    for (guint k = 0; k < points->len; k++) {
        struct restore_point *p = points->pdata[k];
        size_t i;
        json_t *d;
        json_array_foreach(json_object_get(p->manifest, "disks"), i, d)
        {
            const char *n = json_string_value(json_object_get(d, "disk"));
            bool seen = false;
            for (guint j = 0; n && j < names->len; j++) {
                seen = seen || strcmp(names->pdata[j], n) == 0;
            }
            if (n && !seen) {
                g_ptr_array_add(names, g_strdup(n));
            }
        }
    }
    g_ptr_array_sort(names, (GCompareFunc)g_strcmp0);
    return names;
}

static char *
join_names(GPtrArray *names)
{
    GString *s = g_string_new(NULL);
    for (guint i = 0; i < names->len; i++) {
        g_string_append_printf(s, "%s%s", i ? ", " : "",
                               (char *)names->pdata[i]);
    }
    return g_string_free(s, false);
}

static struct restore_point *
point_by_id(GPtrArray *all, const char *id)
{
    for (guint k = 0; k < all->len; k++) {
        struct restore_point *p = all->pdata[k];
        if (strcmp(p->id, id) == 0) {
            return p;
        }
    }
    return NULL;
}

/* Points named by spec ("all", "ID", "FROM..TO", "FROM..", "..TO"), oldest
 * first. */
static GPtrArray *
points_by_spec(struct files_session *s, const char *spec, GError **errp)
{
    GPtrArray *out = g_ptr_array_new();
    const char *dots = spec ? strstr(spec, "..") : NULL;
    g_autofree char *from = NULL, *to = NULL;

    if (!spec || strcmp(spec, "all") == 0) {
        g_ptr_array_extend(out, s->all, NULL, NULL);
        return out;
    }
    if (!dots) {
        struct restore_point *p = point_by_id(s->all, spec);
        if (!p) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                        "%s: no committed point %s", s->o->vm, spec);
            g_ptr_array_free(out, true);
            return NULL;
        }
        g_ptr_array_add(out, p);
        return out;
    }
    from = g_strndup(spec, dots - spec);
    to = g_strdup(dots + 2);
    for (guint k = 0; k < s->all->len; k++) {
        struct restore_point *p = s->all->pdata[k];
        if ((!*from || strcmp(p->id, from) >= 0) &&
            (!*to || strcmp(p->id, to) <= 0)) {
            g_ptr_array_add(out, p);
        }
    }
    return out;
}

static bool
choose_disk(struct files_session *s, GPtrArray *candidates, GError **errp)
{
    g_autoptr(GPtrArray) names = disks_of(candidates);
    g_autofree char *list = join_names(names);

    if (s->o->disk) {
        for (guint i = 0; i < names->len; i++) {
            if (strcmp(names->pdata[i], s->o->disk) == 0) {
                s->disk = g_strdup(s->o->disk);
                return true;
            }
        }
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no disk %s in the chosen points (disks: %s)", s->o->vm,
                    s->o->disk, names->len ? list : "none");
        return false;
    }
    if (names->len != 1) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    names->len ? "%s: several disks (%s): choose one with "
                                 "--disk"
                               : "%s: no disk in the chosen points%s",
                    s->o->vm, list);
        return false;
    }
    s->disk = g_strdup(names->pdata[0]);
    return true;
}

struct files_session *
files_session_open(const struct files_opts *o, bool many, bool any_disk,
                   GError **errp)
{
    struct files_session *s = g_new0(struct files_session, 1);
    g_autoptr(GPtrArray) cand = NULL;

    s->o = o;
    s->repo =
        repo_vm_open(o->repo, o->vm, false, REPO_LOCK_BROWSE, o->wait_ms, errp);
    if (!s->repo || !(s->all = repo_list_points(s->repo, errp))) {
        goto fail;
    }
    if (s->all->len == 0) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no committed restore point", o->vm);
        goto fail;
    }
    if (many) {
        cand = points_by_spec(s, o->points, errp);
    } else {
        cand = points_by_spec(s, o->point, errp);
        if (cand && !o->point) {
            /* the newest point decides the default disk */
            g_ptr_array_remove_range(cand, 0, cand->len - 1);
        }
    }
    if (!cand || (!(any_disk && !o->disk) && !choose_disk(s, cand, errp))) {
        goto fail;
    }
    s->sel = g_ptr_array_new();
    if (!many && !o->point) {
        g_ptr_array_set_size(cand, 0);
        g_ptr_array_extend(cand, s->all, NULL, NULL);
    }
    for (guint k = 0; k < cand->len; k++) {
        if (!s->disk || files_point_disk_file(cand->pdata[k], s->disk)) {
            g_ptr_array_add(s->sel, cand->pdata[k]);
        }
    }
    if (!many && s->sel->len > 1) {
        g_ptr_array_remove_range(s->sel, 0, s->sel->len - 1);
    }
    if (s->sel->len == 0) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no chosen point holds disk %s", o->vm,
                    s->disk ? s->disk : "any");
        goto fail;
    }
    return s;
fail:
    files_session_free(s);
    return NULL;
}

static void remove_overlays(struct files_session *s);

void
files_shutdown(struct files_session *s)
{
    if (s->g) {
        guestfs_shutdown(s->g);
        guestfs_close(s->g);
        s->g = NULL;
    }
    if (s->drives) {
        g_ptr_array_free(s->drives, true);
        s->drives = NULL;
    }
    g_clear_pointer(&s->lvm_filter, g_free);
    g_clear_pointer(&s->parts, g_strfreev);
    g_clear_pointer(&s->vsizes, g_array_unref);
    remove_overlays(s);
    s->btrfs_mounted = false;
    s->mounted = 0;
    s->mount_seq = 0;
}

void
files_session_free(struct files_session *s)
{
    if (!s) {
        return;
    }
    files_shutdown(s);
    if (s->sel) {
        g_ptr_array_free(s->sel, true);
    }
    if (s->all) {
        g_ptr_array_free(s->all, true);
    }
    repo_vm_close(s->repo);
    g_free(s->disk);
    g_free(s);
}

int
files_point_fd(struct files_session *s, const struct restore_point *p,
               GError **errp)
{
    int fd = openat(s->repo->vm_fd, p->id,
                    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s/%s: %s", s->o->vm, p->id, g_strerror(errno));
    }
    return fd;
}

bool
files_launch_one(struct files_session *s, GError **errp)
{
    struct files_target t = {s->sel->pdata[0], s->disk};
    g_autoptr(GPtrArray) v = g_ptr_array_new();

    g_ptr_array_add(v, &t);
    return files_launch(s, v, errp);
}

/* A throwaway qcow2 overlay over backing (absolute), written here in a
 * few microseconds: libguestfs makes one per read-only drive with
 * qemu-img create, 0.2 s each (6 s for 30 points).  The appliance writes
 * only there (journal replay); QEMU opens the backing chain read-only.
 * NULL without an error when the size is unknown (then libguestfs's own
 * overlay serves). */
static char *
make_overlay(struct files_session *s, guint k, const char *backing,
             int64_t vsize, GError **errp)
{
    g_autofree char *path = NULL;
    struct qcow2_writer *w;
    int fd;
    bool ok;

    if (vsize <= 0) {
        return NULL;
    }
    if (!s->tmpdir && !(s->tmpdir = files_tmpdir_make(&s->tmpdir_lock, errp))) {
        return NULL;
    }
    path = g_strdup_printf("%s/overlay%u.qcow2", s->tmpdir, k);
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", path, g_strerror(errno));
        return NULL;
    }
    w = qcow2_writer_new(fd, (uint64_t)vsize, QCOW2_DEFAULT_CLUSTER_BITS,
                         backing, NULL, errp);
    ok = w && qcow2_writer_finish(w, errp);
    qcow2_writer_free(w);
    close(fd);
    if (!ok) {
        unlink(path);
        g_prefix_error(errp, "overlay of %s: ", backing);
        return NULL;
    }
    return g_steal_pointer(&path);
}

/* The overlays go once QEMU holds them open (or the launch failed):
 * nothing is left behind, whatever happens later. */
static void
remove_overlays(struct files_session *s)
{
    if (!s->tmpdir) {
        return;
    }
    for (guint k = 0; s->overlays && k < s->overlays->len; k++) {
        unlink(s->overlays->pdata[k]);
    }
    files_tmpdir_remove(s->tmpdir, s->tmpdir_lock);
    g_clear_pointer(&s->tmpdir, g_free);
    g_clear_pointer(&s->overlays, g_ptr_array_unref);
}

bool
files_launch(struct files_session *s, GPtrArray *targets, GError **errp)
{
    g_autofree char *base = g_canonicalize_filename(s->repo->repo_path, NULL);

    files_shutdown(s);
    s->g = guestfs_create();
    if (!s->g) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                    "libguestfs: cannot create a handle");
        return false;
    }
    /* Errors are reported once, by us, as one line. */
    guestfs_set_error_handler(s->g, NULL, NULL);
    /* Every drive is read-only (a throwaway overlay): nothing to sync or
     * unmount on close, which saves a round of appliance work. */
    guestfs_set_autosync(s->g, 0);
    /* One drive: 640 MiB is plenty (the default, 1280, only feeds the
     * page cache).  Many: see FILES_APPLIANCE_MIB_PER_DRIVE. */
    if (!g_getenv("LIBGUESTFS_MEMSIZE")) {
        guint mib = FILES_APPLIANCE_MIB;
        if (targets->len > 1) {
            mib = MIN(FILES_APPLIANCE_MIB_MAX,
                      512 + FILES_APPLIANCE_MIB_PER_DRIVE * targets->len);
        }
        guestfs_set_memsize(s->g, MAX(mib, FILES_APPLIANCE_MIB));
    }
    s->drives = g_ptr_array_new_with_free_func(g_free);
    s->vsizes = g_array_new(false, false, sizeof(int64_t));
    s->overlays = g_ptr_array_new_with_free_func(g_free);
    for (guint k = 0; k < targets->len; k++) {
        struct files_target *t = targets->pdata[k];
        struct restore_point *p = t->point;
        const char *file = files_point_disk_file(p, t->disk);
        json_t *vs =
            json_object_get(restore_point_disk(p, t->disk), "virtual_size");
        int64_t vsize = json_is_integer(vs) ? json_integer_value(vs) : -1;
        g_autofree char *path = NULL;
        g_autofree char *overlay = NULL;
        g_autoptr(GError) oerr = NULL;
        struct guestfs_add_drive_opts_argv a = {
            .bitmask = GUESTFS_ADD_DRIVE_OPTS_READONLY_BITMASK |
                       GUESTFS_ADD_DRIVE_OPTS_FORMAT_BITMASK |
                       GUESTFS_ADD_DRIVE_OPTS_CACHEMODE_BITMASK,
            .readonly = 1,
            .format = "qcow2",
            /* only the throwaway overlay is written */
            .cachemode = "unsafe",
        };

        if (!file || !repo_name_valid(file, "file", errp)) {
            if (errp && !*errp) {
                g_set_error(errp, QBAK_ERROR, QBAK_ERROR_DAMAGED,
                            "%s: no file for disk %s", p->id, t->disk);
            }
            g_prefix_error(errp, "%s/%s: ", s->o->vm, p->id);
            remove_overlays(s);
            return false;
        }
        g_array_append_val(s->vsizes, vsize);
        path = g_build_filename(base, s->o->vm, p->id, file, NULL);
        overlay = make_overlay(s, k, path, vsize, &oerr);
        if (oerr) {
            remove_overlays(s);
            g_propagate_error(errp, g_steal_pointer(&oerr));
            return false;
        }
        if (overlay) {
            g_ptr_array_add(s->overlays, g_strdup(overlay));
            a.readonly = 0;
        }
        if (guestfs_add_drive_opts_argv(s->g, overlay ? overlay : path, &a) <
            0) {
            remove_overlays(s);
            return files_gerror(s, path, errp);
        }
    }
    {
        gint64 t0 = g_get_monotonic_time();
        if (guestfs_launch(s->g) < 0) {
            remove_overlays(s);
            return files_gerror(s, "libguestfs: launch", errp);
        }
        remove_overlays(s);
        s->launch_s += (g_get_monotonic_time() - t0) / 1e6;
    }
    s->launches++;
    /* A new kernel: what it logged while booting is not the points'. */
    s->kmsg_seen = -1;
    if (!files_kernel_errors(s, NULL, errp)) {
        return false;
    }
    /* libguestfs names the drives in the order added (guestfs(3), block
     * device naming): list_devices would open every device to say the
     * same, 0.17 s per drive under TCG (5 s for 30 points). */
    for (guint k = 0; k < targets->len; k++) {
        g_ptr_array_add(s->drives, files_drive_name(k));
    }
    return true;
}

char *
files_resolve(struct files_session *s, const char *path, GError **errp)
{
    g_autofree char *canon = NULL;
    g_autofree char *dir = NULL;
    g_autofree char *base = NULL;
    char *rdir;
    char *out;

    if (!path || path[0] != '/') {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: a path inside the guest file system starts with /",
                    path ? path : "");
        return NULL;
    }
    canon = g_canonicalize_filename(path, "/");
    if (strcmp(canon, "/") == 0) {
        return g_strdup("/");
    }
    dir = g_path_get_dirname(canon);
    base = g_path_get_basename(canon);
    /* realpath runs chrooted into the guest file system, so a symlink
     * there resolves against the guest's root, never the appliance's. */
    rdir = guestfs_realpath(s->g, dir);
    if (!rdir) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND, "%s: %s", path,
                    guestfs_last_error(s->g) ? guestfs_last_error(s->g)
                                             : "not found");
        return NULL;
    }
    out = strcmp(rdir, "/") == 0 ? g_strconcat("/", base, NULL)
                                 : g_strconcat(rdir, "/", base, NULL);
    free(rdir);
    return out;
}

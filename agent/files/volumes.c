/* The file systems of a point's disk: partitions, whole disks and LVM
 * volumes (the LVM filter selects one point's physical volumes at a time,
 * since every point of a disk carries the same volume group), mounting
 * them read-only, and the operating-system view.  See guestfs.h. */
#include <string.h>

#include "agent/error.h"
#include "agent/files/guestfs.h"

static char *
vfs_type(struct files_session *s, const char *dev)
{
    char *t = guestfs_vfs_type(s->g, dev);
    return t ? t : g_strdup("");
}

/* The LVM filter selects these PVs (one point's) and no other copy. */
static bool
lvm_select(struct files_session *s, char **pvs, GError **errp)
{
    g_autofree char *key = g_strjoinv(" ", pvs);

    if (s->lvm_filter && strcmp(s->lvm_filter, key) == 0) {
        return true;
    }
    if (guestfs_lvm_set_filter(s->g, pvs) < 0) {
        return files_gerror(s, "lvm_set_filter", errp);
    }
    g_free(s->lvm_filter);
    s->lvm_filter = g_steal_pointer(&key);
    return true;
}

static struct files_fs *
fs_new(struct files_session *s, const char *name, const char *dev, char *type)
{
    struct files_fs *fs = files_fs_new();
    char *label = guestfs_vfs_label(s->g, dev);
    int64_t size = guestfs_blockdev_getsize64(s->g, dev);

    fs->name = g_strdup(name);
    fs->dev = g_strdup(dev);
    fs->type = type;
    fs->label = label ? label : g_strdup("");
    fs->size = size < 0 ? 0 : size;
    return fs;
}

static bool
skip_type(const char *t)
{
    return !*t || strcmp(t, "swap") == 0 || strcmp(t, "LVM2_member") == 0;
}

static bool
add_lvs(struct files_session *s, GPtrArray *pvs, GPtrArray *fss, GError **errp)
{
    char **lvs;

    g_ptr_array_add(pvs, NULL);
    if (!lvm_select(s, (char **)pvs->pdata, errp)) {
        return false;
    }
    lvs = guestfs_lvs(s->g);
    if (!lvs) {
        return files_gerror(s, "lvs", errp);
    }
    for (char **lv = lvs; *lv; lv++) {
        char *t = vfs_type(s, *lv);
        if (!skip_type(t) && g_str_has_prefix(*lv, "/dev/")) {
            struct files_fs *fs = fs_new(s, *lv + 5, *lv, t);
            fs->pvs = g_strdupv((char **)pvs->pdata);
            g_ptr_array_add(fss, fs);
        } else {
            g_free(t);
        }
        free(*lv);
    }
    free(lvs);
    return true;
}

GPtrArray *
files_list_fs(struct files_session *s, guint drive, GError **errp)
{
    const char *dev = s->drives->pdata[drive];
    size_t n = strlen(dev);
    GPtrArray *fss =
        g_ptr_array_new_with_free_func((GDestroyNotify)files_fs_free);
    g_autoptr(GPtrArray) pvs = g_ptr_array_new_with_free_func(g_free);
    char **parts = guestfs_list_partitions(s->g);
    bool any = false;

    if (!parts) {
        files_gerror(s, "list_partitions", errp);
        goto fail;
    }
    for (char **p = parts; *p; p++) {
        if (strncmp(*p, dev, n) == 0 && g_ascii_isdigit((*p)[n])) {
            char *t = vfs_type(s, *p);
            any = true;
            if (strcmp(t, "LVM2_member") == 0) {
                g_ptr_array_add(pvs, g_strdup(*p));
            }
            if (!skip_type(t)) {
                g_ptr_array_add(fss, fs_new(s, *p + n, *p, t));
            } else {
                g_free(t);
            }
        }
        free(*p);
    }
    free(parts);
    if (!any) {
        char *t = vfs_type(s, dev);
        if (strcmp(t, "LVM2_member") == 0) {
            g_ptr_array_add(pvs, g_strdup(dev));
        }
        if (!skip_type(t)) {
            g_ptr_array_add(fss, fs_new(s, "disk", dev, t));
        } else {
            g_free(t);
        }
    }
    if (pvs->len && !add_lvs(s, pvs, fss, errp)) {
        goto fail;
    }
    return fss;
fail:
    g_ptr_array_free(fss, true);
    return NULL;
}

/* The LVM physical volumes on drive i (partitions, or the whole disk). */
static GPtrArray *
drive_pvs(struct files_session *s, guint drive, GError **errp)
{
    const char *dev = s->drives->pdata[drive];
    size_t n = strlen(dev);
    GPtrArray *pvs = g_ptr_array_new_with_free_func(g_free);
    char **parts = guestfs_list_partitions(s->g);
    bool any = false;

    if (!parts) {
        files_gerror(s, "list_partitions", errp);
        g_ptr_array_free(pvs, true);
        return NULL;
    }
    for (char **p = parts; *p; p++) {
        if (strncmp(*p, dev, n) == 0 && g_ascii_isdigit((*p)[n])) {
            g_autofree char *t = vfs_type(s, *p);
            any = true;
            if (strcmp(t, "LVM2_member") == 0) {
                g_ptr_array_add(pvs, g_strdup(*p));
            }
        }
        free(*p);
    }
    free(parts);
    if (!any) {
        g_autofree char *t = vfs_type(s, dev);
        if (strcmp(t, "LVM2_member") == 0) {
            g_ptr_array_add(pvs, g_strdup(dev));
        }
    }
    return pvs;
}

struct files_fs *
files_named_fs(struct files_session *s, guint drive, const char *name,
               GError **errp)
{
    const char *dev = s->drives->pdata[drive];
    g_autofree char *d = NULL;
    g_autoptr(GPtrArray) pvs = NULL;
    struct files_fs *fs;
    char *type;

    if (strcmp(name, "disk") == 0) {
        d = g_strdup(dev);
    } else if (*name && strspn(name, "0123456789") == strlen(name) &&
               strlen(name) < 4) {
        d = g_strconcat(dev, name, NULL);
    } else if (strchr(name, '/') && name[0] != '/' && !strstr(name, "..")) {
        pvs = drive_pvs(s, drive, errp);
        if (!pvs) {
            return NULL;
        }
        if (pvs->len) {
            g_ptr_array_add(pvs, NULL);
            if (!lvm_select(s, (char **)pvs->pdata, errp)) {
                return NULL;
            }
            d = g_strconcat("/dev/", name, NULL);
        }
    }
    type = d ? guestfs_vfs_type(s->g, d) : NULL;
    if (!type || skip_type(type)) {
        /* not there: the slow way, for an error that names what is */
        g_autoptr(GPtrArray) fss = NULL;
        free(type);
        fss = files_list_fs(s, drive, errp);
        if (fss) {
            files_pick_fs(fss, name, errp);
        }
        return NULL;
    }
    fs = files_fs_new();
    fs->name = g_strdup(name);
    fs->dev = g_steal_pointer(&d);
    fs->type = g_strdup(type);
    fs->label = g_strdup("");
    free(type);
    if (pvs) {
        fs->pvs = g_strdupv((char **)pvs->pdata);
    }
    return fs;
}

static char *
fs_list(GPtrArray *fss)
{
    GString *str = g_string_new(NULL);
    for (guint i = 0; i < fss->len; i++) {
        struct files_fs *fs = fss->pdata[i];
        g_string_append_printf(str, "%s%s (%s)", i ? ", " : "", fs->name,
                               fs->type);
    }
    return g_string_free(str, false);
}

struct files_fs *
files_pick_fs(GPtrArray *fss, const char *want, GError **errp)
{
    g_autofree char *list = fs_list(fss);

    if (want) {
        for (guint i = 0; i < fss->len; i++) {
            struct files_fs *fs = fss->pdata[i];
            if (strcmp(fs->name, want) == 0) {
                return fs;
            }
        }
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "no file system %s on this disk (--fs values: %s)", want,
                    fss->len ? list : "none");
        return NULL;
    }
    if (fss->len == 1) {
        return fss->pdata[0];
    }
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                fss->len ? "several file systems on this disk: choose one "
                           "with --fs (%s)"
                         : "no file system found on this disk%s",
                list);
    return NULL;
}

bool
files_needs_relaunch(struct files_session *s, const struct files_fs *fs)
{
    return s->btrfs_mounted && g_strcmp0(fs->type, "btrfs") == 0;
}

bool
files_mount(struct files_session *s, struct files_fs *fs, GError **errp)
{
    bool xfs = g_strcmp0(fs->type, "xfs") == 0;

    if (fs->pvs && !lvm_select(s, fs->pvs, errp)) {
        return false;
    }
    /* Read-only on the overlay: ext4 and xfs still replay their journal
     * there.  nouuid: several xfs copies of one file system. */
    if (guestfs_mount_options(s->g, xfs ? "ro,nouuid" : "ro", fs->dev, "/") <
        0) {
        g_autofree char *what =
            g_strdup_printf("mount %s (%s)", fs->name, fs->type);
        return files_gerror(s, what, errp);
    }
    if (g_strcmp0(fs->type, "btrfs") == 0) {
        s->btrfs_mounted = true;
    }
    return true;
}

static gint
mountpoint_cmp(gconstpointer a, gconstpointer b)
{
    const char *const *x = *(const char *const **)a;
    const char *const *y = *(const char *const **)b;
    size_t lx = strlen(x[0]), ly = strlen(y[0]);
    return lx < ly ? -1 : lx > ly ? 1 : strcmp(x[0], y[0]);
}

static void
strv_free_all(char **v)
{
    for (char **p = v; p && *p; p++) {
        free(*p);
    }
    free(v);
}

struct files_fs *
files_mount_os(struct files_session *s, GError **errp)
{
    char **roots = guestfs_inspect_os(s->g);
    char **mps = NULL;
    g_autoptr(GPtrArray) pairs = g_ptr_array_new();
    struct files_fs *fs = NULL;

    if (!roots) {
        files_gerror(s, "inspect_os", errp);
        return NULL;
    }
    if (!roots[0] || roots[1]) {
        goto out; /* none, or several: no single view to show */
    }
    mps = guestfs_inspect_get_mountpoints(s->g, roots[0]);
    if (!mps) {
        files_gerror(s, "inspect_get_mountpoints", errp);
        goto out;
    }
    for (char **p = mps; p[0] && p[1]; p += 2) {
        g_ptr_array_add(pairs, p);
    }
    /* parents before what is mounted on them */
    g_ptr_array_sort(pairs, mountpoint_cmp);
    for (guint i = 0; i < pairs->len; i++) {
        char **pr = pairs->pdata[i];
        g_autofree char *type = vfs_type(s, pr[1]);
        bool xfs = strcmp(type, "xfs") == 0;

        if (guestfs_mount_options(s->g, xfs ? "ro,nouuid" : "ro", pr[1],
                                  pr[0]) < 0) {
            if (strcmp(pr[0], "/") == 0) {
                files_gerror(s, "mount the guest's /", errp);
                goto out;
            }
            /* a missing mount point or an unreadable file system: the
             * rest of the view stays useful */
            continue;
        }
    }
    fs = files_fs_new();
    fs->name = g_strdup("os");
    fs->type = g_strdup("os");
    fs->label = g_strdup("");
out:
    strv_free_all(roots);
    strv_free_all(mps);
    return fs;
}

bool
files_umount(struct files_session *s, GError **errp)
{
    struct guestfs_umount_opts_argv a = {0};

    if (guestfs_umount_opts_argv(s->g, "/", &a) < 0) {
        return files_gerror(s, "umount", errp);
    }
    return true;
}

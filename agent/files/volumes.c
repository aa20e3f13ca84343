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
    /* the switch deactivates every volume group: nothing may stay
     * mounted from the points indexed before */
    if (s->mounted && guestfs_umount_all(s->g) < 0) {
        return files_gerror(s, "umount_all", errp);
    }
    s->mounted = 0;
    if (guestfs_lvm_set_filter(s->g, pvs) < 0) {
        return files_gerror(s, "lvm_set_filter", errp);
    }
    g_free(s->lvm_filter);
    s->lvm_filter = g_steal_pointer(&key);
    return true;
}

/* What blkid finds on dev: its file system type ("" if none), label,
 * and whether it holds a partition table.  One blkid run answers all
 * three; vfs_type is one run and vfs_label two (0.2-0.3 s each under
 * TCG). */
struct probe {
    char *type;
    char *label;
    bool ptable;
};

static void
probe_clear(struct probe *p)
{
    g_clear_pointer(&p->type, g_free);
    g_clear_pointer(&p->label, g_free);
}

static void
probe_dev(struct files_session *s, const char *dev, struct probe *p)
{
    char **kv = guestfs_blkid(s->g, dev);
    bool answered = kv != NULL;

    p->type = NULL;
    p->label = NULL;
    p->ptable = false;
    for (char **k = kv; k && k[0] && k[1]; k += 2) {
        if (strcmp(k[0], "TYPE") == 0 && !p->type) {
            p->type = g_strdup(k[1]);
        } else if (strcmp(k[0], "LABEL") == 0 && !p->label) {
            p->label = g_strdup(k[1]);
        } else if (strcmp(k[0], "PTTYPE") == 0) {
            p->ptable = true;
        }
    }
    for (char **k = kv; kv && *k; k++) {
        free(*k);
    }
    free(kv);
    if (!answered) {
        /* blkid -p failed: nothing there, or ambivalent signatures (the
         * plain probe then picks one) */
        p->type = vfs_type(s, dev);
        if (*p->type) {
            p->label = guestfs_vfs_label(s->g, dev);
        }
    }
    if (p->label && (strchr(p->label, '\\') || strchr(p->label, '^') ||
                     strstr(p->label, "M-"))) {
        /* blkid's export format escaped something (spaces, control
         * characters, bytes over 127 as "M-"): only vfs_label gives the
         * exact bytes */
        g_free(p->label);
        p->label = guestfs_vfs_label(s->g, dev);
    }
    if (!p->type) {
        p->type = g_strdup("");
    }
    if (!p->label) {
        p->label = g_strdup("");
    }
}

/* The size of dev (drive's whole disk: the manifest's virtual size). */
static int64_t
dev_size(struct files_session *s, guint drive, const char *dev)
{
    int64_t size;

    if (strcmp(dev, s->drives->pdata[drive]) == 0 && s->vsizes &&
        drive < s->vsizes->len &&
        g_array_index(s->vsizes, int64_t, drive) >= 0) {
        return g_array_index(s->vsizes, int64_t, drive);
    }
    size = guestfs_blockdev_getsize64(s->g, dev);
    return size < 0 ? 0 : size;
}

static struct files_fs *
fs_new(struct files_session *s, guint drive, const char *name, const char *dev,
       struct probe *p)
{
    struct files_fs *fs = files_fs_new();

    fs->name = g_strdup(name);
    fs->dev = g_strdup(dev);
    fs->type = g_steal_pointer(&p->type);
    fs->label = g_steal_pointer(&p->label);
    fs->size = dev_size(s, drive, dev);
    return fs;
}

/* The partitions of every drive (one call per launch). */
static char **
partitions(struct files_session *s, GError **errp)
{
    if (!s->parts && !(s->parts = guestfs_list_partitions(s->g))) {
        files_gerror(s, "list_partitions", errp);
    }
    return s->parts;
}

static bool
skip_type(const char *t)
{
    return !*t || strcmp(t, "swap") == 0 || strcmp(t, "LVM2_member") == 0;
}

static bool
add_lvs(struct files_session *s, guint drive, GPtrArray *pvs, GPtrArray *fss,
        GError **errp)
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
        struct probe p;
        probe_dev(s, *lv, &p);
        if (!skip_type(p.type) && g_str_has_prefix(*lv, "/dev/")) {
            struct files_fs *fs = fs_new(s, drive, *lv + 5, *lv, &p);
            fs->pvs = g_strdupv((char **)pvs->pdata);
            g_ptr_array_add(fss, fs);
        }
        probe_clear(&p);
        free(*lv);
    }
    free(lvs);
    return true;
}

/* Adds the file systems (and LVM PVs) of drive's partitions; *any: it
 * has some. */
static bool
list_parts(struct files_session *s, guint drive, GPtrArray *fss, GPtrArray *pvs,
           bool *any, GError **errp)
{
    const char *dev = s->drives->pdata[drive];
    size_t n = strlen(dev);
    char **parts = partitions(s, errp);

    if (!parts) {
        return false;
    }
    for (char **p = parts; *p; p++) {
        if (strncmp(*p, dev, n) == 0 && g_ascii_isdigit((*p)[n])) {
            struct probe pp;
            probe_dev(s, *p, &pp);
            *any = true;
            if (strcmp(pp.type, "LVM2_member") == 0) {
                g_ptr_array_add(pvs, g_strdup(*p));
            }
            if (!skip_type(pp.type)) {
                g_ptr_array_add(fss, fs_new(s, drive, *p + n, *p, &pp));
            }
            probe_clear(&pp);
        }
    }
    return true;
}

GPtrArray *
files_list_fs(struct files_session *s, guint drive, GError **errp)
{
    const char *dev = s->drives->pdata[drive];
    GPtrArray *fss =
        g_ptr_array_new_with_free_func((GDestroyNotify)files_fs_free);
    g_autoptr(GPtrArray) pvs = g_ptr_array_new_with_free_func(g_free);
    struct probe whole = {0};
    bool any = false, probed = false;

    if (!s->parts) {
        /* a file system on the whole disk (no partition table) needs no
         * partition list, which opens every drive of the launch (7 s
         * for 30 points under TCG): the whole-disk probe first */
        probe_dev(s, dev, &whole);
        probed = true;
        if ((!*whole.type || whole.ptable) &&
            !list_parts(s, drive, fss, pvs, &any, errp)) {
            goto fail;
        }
    } else if (!list_parts(s, drive, fss, pvs, &any, errp)) {
        /* listed once for an earlier drive: it serves them all */
        goto fail;
    }
    if (!any) {
        if (!probed) {
            probe_dev(s, dev, &whole);
        }
        if (strcmp(whole.type, "LVM2_member") == 0) {
            g_ptr_array_add(pvs, g_strdup(dev));
        }
        if (!skip_type(whole.type)) {
            g_ptr_array_add(fss, fs_new(s, drive, "disk", dev, &whole));
        }
    }
    probe_clear(&whole);
    if (pvs->len && !add_lvs(s, drive, pvs, fss, errp)) {
        goto fail;
    }
    return fss;
fail:
    probe_clear(&whole);
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
    char **parts = partitions(s, errp);
    bool any = false;

    if (!parts) {
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
    }
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

char *
files_mount_at(struct files_session *s, struct files_fs *fs, GError **errp)
{
    bool xfs = g_strcmp0(fs->type, "xfs") == 0;
    g_autofree char *mp = NULL;

    if (fs->pvs && !lvm_select(s, fs->pvs, errp)) {
        return NULL;
    }
    /* the appliance's own root holds these directories; "/" holds no
     * guest file system meanwhile */
    if (s->mount_seq == 0 && guestfs_mkmountpoint(s->g, "/qbak") < 0) {
        files_gerror(s, "mkmountpoint", errp);
        return NULL;
    }
    mp = g_strdup_printf("/qbak/%u", s->mount_seq++);
    if (guestfs_mkmountpoint(s->g, mp) < 0) {
        files_gerror(s, "mkmountpoint", errp);
        return NULL;
    }
    if (guestfs_mount_options(s->g, xfs ? "ro,nouuid" : "ro", fs->dev, mp) <
        0) {
        g_autofree char *what =
            g_strdup_printf("mount %s (%s)", fs->name, fs->type);
        files_gerror(s, what, errp);
        return NULL;
    }
    s->mounted++;
    if (g_strcmp0(fs->type, "btrfs") == 0) {
        s->btrfs_mounted = true;
    }
    return g_steal_pointer(&mp);
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
files_umount_at(struct files_session *s, const char *mp, GError **errp)
{
    if (guestfs_umount(s->g, mp) < 0) {
        return files_gerror(s, "umount", errp);
    }
    s->mounted--;
    return true;
}

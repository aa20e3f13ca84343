/* The way into restore points: libguestfs's appliance, with each chosen
 * point's top qcow2 layer added as a read-only drive (its chain follows by
 * the relative backing files).  Read-only drives get a throwaway overlay,
 * so a crash-consistent journal is replayed there and the repository stays
 * byte-identical; nothing is ever mounted with the journal ignored.
 *
 * Points of one disk carry the same LVM and file-system ids: the LVM
 * filter selects one point's physical volumes at a time, xfs is mounted
 * with nouuid, and a second btrfs copy needs a fresh appliance
 * (files_needs_relaunch()).  One file system is mounted at a time, at the
 * appliance's "/".
 */
#ifndef QBAK_AGENT_FILES_GUESTFS_H
#define QBAK_AGENT_FILES_GUESTFS_H

#include <glib.h>
#include <guestfs.h>
#include <stdbool.h>

#include "agent/files/catalog.h"
#include "agent/repo.h"

struct files_opts {
    const char *repo;
    const char *vm;
    const char *point;  /* one point (default: the newest) */
    const char *points; /* all, ID, FROM..TO (find, index) */
    const char *disk;
    const char *fs;
    int wait_ms;
    bool progress;
};

struct files_session {
    const struct files_opts *o;
    struct repo_vm *repo; /* REPO_LOCK_BROWSE: prune waits, backups go on */
    GPtrArray *all;       /* every committed point (owned) */
    GPtrArray *sel;       /* selected points, oldest first (borrowed) */
    char *disk;           /* NULL: every disk (index) */
    guestfs_h *g;
    GPtrArray *drives;  /* appliance device of each drive */
    char *lvm_filter;   /* PVs the LVM filter selects now, or NULL */
    bool btrfs_mounted; /* a btrfs was mounted in this launch */
    char **parts;       /* list_partitions, once per launch (or NULL) */
    GArray *vsizes;     /* int64_t virtual size of each drive, or -1 */
    guint mounted;      /* file systems mounted at files_mount_at() points */
    guint mount_seq;    /* mount points made by files_mount_at() */
    char *tmpdir;       /* our overlays until the launch, or NULL */
    int tmpdir_lock;    /* its owner file, locked (when tmpdir is set) */
    GPtrArray *overlays;
    unsigned launches;
    double launch_s;  /* time spent in appliance launches */
    double kmsg_seen; /* stamp of the kernel log's last line read */
};

/* A disk at a point: what one drive shows. */
struct files_target {
    struct restore_point *point; /* borrowed */
    const char *disk;            /* borrowed */
};

/* Opens the VM (browse lock), selects points and the disk.  many: the
 * points come from o->points (default all), else o->point (default the
 * newest).  Only points holding the disk count.  any_disk: without
 * --disk, every disk (s->disk NULL) instead of the only one. */
struct files_session *files_session_open(const struct files_opts *o, bool many,
                                         bool any_disk, GError **errp);

/* The disk file of point p, or NULL. */
const char *files_point_disk_file(const struct restore_point *p,
                                  const char *disk);
void files_session_free(struct files_session *s);

/* The point directory fd of p (close it). */
int files_point_fd(struct files_session *s, const struct restore_point *p,
                   GError **errp);

/* Entries of a walked file system that index leaves mounted: a bigger
 * one is unmounted at once, as its inodes would outgrow the appliance
 * memory set aside per drive. */
#define FILES_MOUNTED_ENTRIES 30000

/* A fresh directory for a launch's overlays, in the temporary
 * directory: its owner file stays locked (flock on *lock_fd) while this
 * process lives, so a directory left by a killed qbak is found and
 * removed by the next one (files_tmpdir_sweep(), run here first). */
char *files_tmpdir_make(int *lock_fd, GError **errp);
/* Removes dir (its overlays already gone) and drops the lock. */
void files_tmpdir_remove(const char *dir, int lock_fd);
/* Removes our overlay directories whose process is gone. */
void files_tmpdir_sweep(void);

/* Starts an appliance with one read-only drive per target (struct
 * files_target *, borrowed).  Ends an earlier one first. */
bool files_launch(struct files_session *s, GPtrArray *targets, GError **errp);
/* Starts an appliance with the one selected point's disk. */
bool files_launch_one(struct files_session *s, GError **errp);
void files_shutdown(struct files_session *s);

/* The file systems on drive i (struct files_fs *, dev and type set). */
GPtrArray *files_list_fs(struct files_session *s, guint drive, GError **errp);

/* The file system named name ("1", "VG/LV", "disk") on drive i without
 * listing the others (fast: no labels, sizes or other volumes), or NULL
 * with an error naming the --fs values. */
struct files_fs *files_named_fs(struct files_session *s, guint drive,
                                const char *name, GError **errp);

/* The file system --fs names (or the only one).  Borrowed from fss. */
struct files_fs *files_pick_fs(GPtrArray *fss, const char *want, GError **errp);

/* The guest's own view of an operating-system disk: inspection finds its
 * root and the mount points of its /etc/fstab, all mounted read-only under
 * "/".  Returns a file system named "os", or NULL: with errp set on a
 * failure, unset when no single operating system is found.  Slow (about
 * 20 s under TCG): only when no --fs is given, or --fs os. */
struct files_fs *files_mount_os(struct files_session *s, GError **errp);

/* Whether mounting fs needs a fresh appliance (a second btrfs copy). */
bool files_needs_relaunch(struct files_session *s, const struct files_fs *fs);

/* Mounts fs read-only at the appliance's "/" (journal replayed into the
 * overlay). */
bool files_mount(struct files_session *s, struct files_fs *fs, GError **errp);
/* Mounts fs read-only at a fresh directory of the appliance (while "/"
 * holds nothing): returned, and left mounted until the next LVM switch
 * or the shutdown, which saves an umount (0.4-0.9 s under TCG) per
 * point when indexing. */
char *files_mount_at(struct files_session *s, struct files_fs *fs,
                     GError **errp);
bool files_umount_at(struct files_session *s, const char *mp, GError **errp);

/* Every path under root (a resolved directory) with lstat data, sorted
 * by path; root itself is not listed.  Fails on anything the file
 * system cannot read (never a silently short listing); fstype (or NULL)
 * says whether directory link counts can check the listing. */
GArray *files_walk(struct files_session *s, const char *root,
                   const char *fstype, GError **errp);
/* The same for a file system mounted at mnt in the appliance (NULL: at
 * "/"): paths in the file system's terms, without mnt. */
GArray *files_walk_at(struct files_session *s, const char *mnt,
                      const char *root, const char *fstype, GError **errp);

/* Why lstat of apath (an appliance path) fails, in the file system's
 * words ("Structure needs cleaning"), without the appliance's path. */
char *files_lstat_reason(struct files_session *s, const char *apath);
/* Whether a directory's link count is 2 + its subdirectories on this
 * file system type (NULL: unknown, or several mounted together). */
bool files_nlink_counts_subdirs(const char *fstype);
/* What a directory whose link count is nlink but shows subdirs
 * subdirectories has to say. */
char *files_nlink_damage(const char *path, int64_t nlink, int64_t subdirs);

/* The path with its directories resolved inside the guest file system
 * (symlinks there never lead out of it) and its last component not
 * followed: "/" or "/a/b". */
char *files_resolve(struct files_session *s, const char *path, GError **errp);

/* *first: the first line the appliance kernel logged since the last
 * call (or the launch) that reports a damaged file system or a read
 * error, or NULL (first may be NULL: only moves past what is logged). */
bool files_kernel_errors(struct files_session *s, char **first, GError **errp);

/* Sets errp from the handle's last error, prefixed with what. */
bool files_gerror(struct files_session *s, const char *what, GError **errp);

/* ISO 8601 UTC of t. */
char *files_time_iso(int64_t t);

#endif

/* The repository: one directory per VM, one directory per committed restore
 * point, each holding a manifest and one qcow2 file per disk (README.md,
 * "The repository").  Everything is opened relative to directory fds with
 * O_NOFOLLOW, so a planted symlink cannot redirect a write.
 */
#ifndef QBAK_AGENT_REPO_H
#define QBAK_AGENT_REPO_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent/manifest.h"

struct repo_vm {
    char *repo_path;
    char *vm;
    int repo_fd;
    int vm_fd;
    int lock_fd;
    int browse_fd;
    char *vm_id; /* random, names this repository's bitmaps */
};

/* A committed point: its id and manifest (owned; the JSON document as
 * `manifest', checked against the schema as `info').  A point listed by
 * repo_scan_points whose manifest is missing or does not validate has
 * both NULL and `damage' saying why. */
struct restore_point {
    char *id;
    json_t *manifest;
    struct manifest *info;
    char *damage;
};

/* Checks that a name is safe as one path component we create. */
bool repo_name_valid(const char *name, const char *what, GError **errp);

/* Two flock(2) files per VM directory: .lock guards the chain (who may
 * add, change or remove points), .browse guards the layers that file-level
 * readers have open.  Locks die with their holder: a crashed qbak blocks
 * nobody. */
enum repo_lock {
    REPO_LOCK_NONE,
    REPO_LOCK_SHARED,    /* restore, verify: shared .lock (no backup, no
                            prune meanwhile; readers side by side) */
    REPO_LOCK_EXCLUSIVE, /* backup: exclusive .lock */
    REPO_LOCK_BROWSE,    /* file-level readers: shared .browse (backups go
                            on; prune waits) */
    REPO_LOCK_PRUNE,     /* prune: exclusive .lock and .browse */
};

/* Open (create) repo/vm and take its lock.  A conflicting lock fails with
 * QBAK_ERROR_BUSY at once (wait_ms 0) or after waiting up to wait_ms. */
struct repo_vm *repo_vm_open(const char *repo_path, const char *vm, bool create,
                             enum repo_lock lock, int wait_ms, GError **errp);
void repo_vm_close(struct repo_vm *r);

/* A point being removed by prune holds this marker file (agent/prune.h):
 * it is no longer listed, though later points may still read through its
 * files until prune (or recovery) has merged them. */
#define REPO_POINT_PRUNING "pruning"

/* Committed points, oldest first (a GPtrArray of struct restore_point *),
 * those whose manifest validates, none that prune is removing.  Use
 * repo_scan_points where a damaged point must not vanish silently. */
GPtrArray *repo_list_points(struct repo_vm *r, GError **errp);
/* Every point directory (a name as repo_new_point_id makes them), oldest
 * first, damaged ones included (see struct restore_point). */
GPtrArray *repo_scan_points(struct repo_vm *r, GError **errp);
/* Whether name has the form of a point id. */
bool repo_point_id_valid(const char *name);
void restore_point_free(struct restore_point *p);

/* The manifest's entry for disk, or NULL. Borrowed. */
json_t *restore_point_disk(const struct restore_point *p, const char *disk);

/* A new point id after `last` (NULL for none): UTC time plus a sequence
 * number, so names sort by time and never collide. */
char *repo_new_point_id(const char *last);

/* Create .partial-<id>; returns its fd. */
int repo_partial_create(struct repo_vm *r, const char *id, GError **errp);
/* Remove .partial-<id> and what is in it. */
void repo_partial_remove(struct repo_vm *r, const char *id);
/* Remove every .partial-* directory (crash leftovers). Returns count. */
unsigned repo_partial_cleanup(struct repo_vm *r);
/* The commit in two steps.  repo_commit_sync writes manifest (borrowed)
 * into the partial dir and fsyncs every file in it and the dir itself, all
 * at once (what a backup wrote there need not be fsynced before: this
 * makes it durable).  repo_commit_publish renames the dir to <id> and
 * fsyncs the VM dir: the commit point.  repo_commit does both. */
bool repo_commit_sync(struct repo_vm *r, int partial_fd, const char *id,
                      json_t *manifest, GError **errp);
bool repo_commit_publish(struct repo_vm *r, const char *id, GError **errp);
bool repo_commit(struct repo_vm *r, int partial_fd, const char *id,
                 json_t *manifest, GError **errp);

/* fsync fds[0..n) all at once (one io_uring batch; one after the other
 * without io_uring): the file system joins fsyncs that wait together into
 * one journal commit, where one after the other each waits for its own (a
 * small incremental's commit: six waits became two).  Fails, naming
 * what/names[i], with the first failure; none is retried. */
bool repo_fsync_all(const int *fds, const char *const *names, guint n,
                    const char *what, GError **errp);

/* Bytes the regular files of directory dirfd/name take on disk
 * (allocated blocks; 0 when it cannot be read). */
uint64_t repo_dir_bytes(int dirfd, const char *name);

/* Read a JSON file (bounded size) relative to dirfd. */
json_t *repo_read_json(int dirfd, const char *name, GError **errp);

/* ISO 8601 UTC of now. */
char *repo_time_now(void);

#endif

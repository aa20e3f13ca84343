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

#define MANIFEST_NAME "manifest.json"
#define MANIFEST_FORMAT 1

struct repo_vm {
    char *repo_path;
    char *vm;
    int repo_fd;
    int vm_fd;
    int lock_fd;
    int browse_fd;
    char *vm_id; /* random, names this repository's bitmaps */
};

/* A committed point: its manifest (owned) and id. */
struct restore_point {
    char *id;
    json_t *manifest;
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

/* Committed points, oldest first (a GPtrArray of struct restore_point *).
 * A directory whose manifest is missing or unreadable is not a point. */
GPtrArray *repo_list_points(struct repo_vm *r, GError **errp);
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
/* Write manifest (borrowed) into the partial dir, fsync it and the dir,
 * rename the dir to <id>, fsync the VM dir: the commit point. */
bool repo_commit(struct repo_vm *r, int partial_fd, const char *id,
                 json_t *manifest, GError **errp);

/* Read a JSON file (bounded size) relative to dirfd. */
json_t *repo_read_json(int dirfd, const char *name, GError **errp);

/* ISO 8601 UTC of now. */
char *repo_time_now(void);

#endif

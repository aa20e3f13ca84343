/* Inside prune: the point directories and the removal of one point
 * (prune_point.c), used by the policy side (prune.c). */
#ifndef QBAK_AGENT_PRUNE_INT_H
#define QBAK_AGENT_PRUNE_INT_H

#include "agent/prune.h"

#include <stdint.h>

/* A point directory, listed or delisted. */
struct prune_dir {
    char *id;
    json_t *manifest; /* owned */
    bool delisted;    /* <id>/pruning exists */
    bool protected;
    char *damaged; /* why, from damaged.json, or NULL */
    bool gone;     /* removed by this run */
    bool doomed;   /* to be removed by this run (listed until its turn) */
};

struct prune_ctx {
    struct repo_vm *r;
    GPtrArray *dirs; /* struct prune_dir *, oldest first */
    uint64_t merged_bytes;
    unsigned progress_calls;
    /* .pruned-* directories whose removal waits for the end of the run
     * (prune_finish_removals), and the bytes they hold. */
    GPtrArray *pruned;
    uint64_t pruned_bytes;
    /* The VM directory's fsync is owed (the journal's name): made with
     * the first marker's (prune_remove_point) or prune_sync_pending. */
    bool vm_sync_pending;
};

/* Every directory with a readable manifest naming it, oldest first. */
GPtrArray *prune_scan(struct repo_vm *r, GError **errp);
void prune_dir_free(struct prune_dir *d);

/* The disk's entry of a manifest, or NULL (borrowed). */
json_t *prune_manifest_disk(json_t *manifest, const char *disk);

/* The point whose layer of disk names p's layer file as its backing in
 * its manifest ("../<p>/<file>"), or NULL. */
struct prune_dir *prune_child(struct prune_ctx *c, const struct prune_dir *p,
                              const char *disk, const char *file);

/* The intent log: the points about to be removed, in order, with the
 * point each disk's layer goes into.  Written durably before the first
 * change; removed once all are gone. */
bool prune_journal_write(struct prune_ctx *c, GPtrArray *order, GError **errp);
bool prune_journal_remove(struct repo_vm *r, GError **errp);

/* Removes point p (listed or already delisted): delist, merge or delete
 * each disk's layer, remove the directory.  Idempotent: run again after a
 * crash at any step, it completes the work. */
bool prune_remove_point(struct prune_ctx *c, struct prune_dir *p,
                        GError **errp);

/* Makes the VM directory durable if its fsync is owed (see prune_ctx). */
bool prune_sync_pending(struct prune_ctx *c, GError **errp);

/* What a removed point's directory is renamed to: .pruned-<id>. */
#define PRUNED_PREFIX ".pruned-"

/* Removes .pruned-* directory name now, or at the end of the run
 * (prune_finish_removals) while the leftovers waiting so hold little. */
bool prune_defer_removal(struct prune_ctx *c, const char *name, GError **errp);

/* Removes the .pruned-* directories that prune_remove_point left for the
 * end of the run (not durably: one a crash leaves is a leftover that the
 * next run removes).  Called once nothing more is made durable. */
void prune_finish_removals(struct prune_ctx *c);

/* Step 3 of removing a point, for one disk: C's layer (with a group, the
 * doomed points between P and C too) folded into P's file, the merged
 * checksums made C's, P's file renamed over C's layer (prune_merge.c).
 * *untouched: a failure left P's file the image it was. */
bool prune_merge_layer(struct prune_ctx *c, struct prune_dir *p, int pfd,
                       const char *pfile, struct prune_dir *ch, int cfd,
                       const char *cfile, const char *disk, GPtrArray *group,
                       bool *untouched, GError **errp);

/* fsync of a directory fd; failures name `what`. */
bool prune_fsync_dir(int fd, const char *what, GError **errp);

/* Creates (an empty file) or removes dirfd/name, durably. */
bool prune_marker_set(int dirfd, const char *name, bool present, GError **errp);

/* Whether an interrupted prune left anything (a journal, a delisted
 * point, a .pruned-* directory): a look at names only, no manifest read. */
bool prune_work_pending(struct repo_vm *r);

/* Removes leftover .pruned-* directories; returns how many. */
unsigned prune_cleanup_removed(struct repo_vm *r);

#endif

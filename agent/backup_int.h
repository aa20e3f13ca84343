/* Internals shared by the backup state machine (backup.c) and its QEMU
 * job handling (backup_jobs.c). */
#ifndef QBAK_AGENT_BACKUP_INT_H
#define QBAK_AGENT_BACKUP_INT_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent/backup.h"
#include "agent/quiesce.h"
#include "agent/repo.h"
#include "agent/target.h"
#include "io/qcow2.h"
#include "io/ring.h"
#include "qmp/client.h"

struct disk {
    char *name; /* device id, or node name without one */
    char *node; /* format node backed up and holding the bitmap */
    char *drv;
    uint64_t size;
    bool standalone; /* a qcow2 image without backing: see start_transaction */
    json_t *bitmaps; /* from query-block, borrowed from `block` */

    bool full;
    char *reason;
    char *chain;
    char *bitmap;      /* this point's generation of the chain's bitmap */
    char *prev_bitmap; /* the previous point's, which an incremental copies */
    GPtrArray *stale_bitmaps; /* ours, to remove once committed */
    char *backing_rel;
    struct qcow2_reader *backing;

    char *file;
    char *job_id;
    char *nbd_node;
    struct backup_target *target;
    bool nbd_added;
    bool bitmap_added;
    bool job_started;
};

struct backup {
    const struct backup_opts *opts;
    struct ring ring;
    bool ring_ok;
    struct qmp_client *qmp;
    struct repo_vm *repo;
    GPtrArray *points;
    json_t *block; /* query-block */
    GPtrArray *disks;
    char *point;
    int partial_fd;
    bool partial_made;
    struct quiesce *quiesce;
    bool committed;
    gint64 start_us;
    json_t *settings;        /* vm.json (agent/vm/settings.h) */
    struct vmstate *vmstate; /* NULL without --memory */
    struct pull *pull;       /* pull mode's state (backup_pull.c), or NULL */
    bool use_pull;           /* the mode this run uses (choose_mode()) */
    char *mode_reason;       /* why, for the result and --verbose */
};

struct vm_settings_pending;

/* Planning (backup_plan.c).  Every writable, non-empty block device with
 * a guest device (--disk: only those), from the settings' query-block. */
bool backup_discover_disks(struct backup *b,
                           struct vm_settings_pending *settings, GError **errp);
/* Decide full or incremental for one disk (see the bitmap rules at the top
 * of backup.c): d->full and d->reason, its chain, bitmap and backing. */
void backup_plan_disk(struct backup *b, struct disk *d);
/* A full because QEMU's bitmaps are gone says why when QEMU is another
 * process than at the previous point (a restored VM: a new chain). */
void backup_explain_full(struct backup *b, struct disk *d,
                         const char *last_point);
void backup_disk_free(struct disk *d);

/* --verbose: the time since the start and the phase just done. */
void backup_trace(struct backup *b, const char *phase);

/* The data's progress line (agent/progress.h): on a terminal, or as
 * reports to `qbak run` (--progress-fd); NULL when neither is wanted. */
struct progress;
struct progress *backup_progress_new(struct backup *b);
/* Wait until every job is pending (all data received), or one failed. */
bool backup_jobs_wait_pending(struct backup *b, GError **errp);
/* Every job is still pending in a live QEMU: checked right before commit. */
bool backup_jobs_still_pending(struct backup *b, GError **errp);
/* Cancel (optional) our jobs, wait (bounded) until they concluded, dismiss
 * them. */
void backup_jobs_conclude(struct backup *b, bool cancel);
/* job-finalize after the commit (no bitmap changes: bitmap-mode=never),
 * then dismiss. */
void backup_jobs_finalize(struct backup *b, GPtrArray *warnings);

#endif

/* Pull mode: QEMU keeps the point in time (fleecing), qbak reads it.
 *
 * Per disk, QEMU gets a scratch qcow2 image on local storage, a
 * copy-before-write filter above the device's node that copies old data
 * there before a guest write overwrites it (on-cbw-error=break-snapshot,
 * cbw-timeout: a failing or slow scratch breaks the backup, never the
 * guest's write), and a snapshot-access node that reads the point in time.
 * QEMU's NBD server exports it, with the chain's bitmap as a meta context
 * for an incremental, and qbak reads it with libnbd (agent/pull_copy.c).
 * Everything in QEMU and every scratch file is listed in a marker in the
 * VM's directory before it is made, so recovery after a crash undoes it.
 */
#ifndef QBAK_AGENT_BACKUP_PULL_H
#define QBAK_AGENT_BACKUP_PULL_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "agent/repo.h"
#include "qmp/client.h"

struct backup;

/* Oldest QEMU pull mode runs on: copy-before-write's on-cbw-error and
 * cbw-timeout, and block-export-add bitmaps on another node, are 7.1's. */
#define BACKUP_PULL_MIN_QEMU 70100

/* --mode auto: pull on QEMU 7.1 or later without --memory and with
 * QEMU's NBD server free, else push (agent/backup_mode.c).  Sets
 * b->use_pull and b->mode_reason; fails only when QEMU does not answer. */
bool backup_choose_mode(struct backup *b, GError **errp);

/* The marker, scratch files and targets: qbak's own files, no QEMU call
 * (so it overlaps QEMU answering the settings' queries).  Called after
 * the disks are planned. */
bool backup_pull_prepare(struct backup *b, GError **errp);
/* The QEMU nodes (scratch, filter) of every disk; nothing changes for the
 * guest yet. */
bool backup_pull_add_nodes(struct backup *b, GError **errp);
/* The point in time: each device's writes go through its filter from now
 * on; an incremental's bitmap is copied for the export. */
bool backup_pull_point(struct backup *b, GError **errp);
/* Export the point over NBD and copy it into the targets. */
bool backup_pull_copy(struct backup *b, GError **errp);
/* Ask QEMU to undo everything, without waiting: the commit's fsyncs go on
 * meanwhile.  backup_pull_release() collects the answers. */
void backup_pull_release_start(struct backup *b);
/* Undo everything in QEMU (or wait for what release_start asked), remove
 * the scratch files and the marker.  Idempotent; problems become warnings
 * (NULL: dropped). */
void backup_pull_release(struct backup *b, GPtrArray *warnings);
void backup_pull_free(struct backup *b);
/* Adds "mode", "mode_reason", "scratch_dir" and "scratch_peak_bytes" to a
 * result. */
void backup_pull_result(struct backup *b, json_t *result);

/* What a crashed pull run left: in QEMU (through the marker) and in the
 * scratch directory.  Each action is appended to `done`. */
bool backup_pull_recover(struct qmp_client *qmp, struct repo_vm *r,
                         int timeout_ms, GPtrArray *done, GError **errp);

#endif

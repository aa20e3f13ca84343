/* Guest file system freeze around the point in time, through the QEMU
 * guest agent (issue: consistent guests).  The guest is never left frozen:
 * every path that may have frozen it thaws it, SIGINT/SIGTERM are held off
 * inside the freeze window, and a marker in the VM's repository directory
 * lets the next run thaw a guest that a killed run left frozen. */
#ifndef QBAK_AGENT_QUIESCE_H
#define QBAK_AGENT_QUIESCE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "agent/repo.h"
#include "io/ring.h"

enum quiesce_mode {
    QUIESCE_OFF,
    QUIESCE_AUTO,    /* freeze if the agent answers, else crash-consistent */
    QUIESCE_REQUIRE, /* fail before any job starts if the freeze fails */
};

struct quiesce;

struct quiesce *quiesce_new(struct ring *ring, struct repo_vm *repo,
                            enum quiesce_mode mode, const char *qga_path,
                            int timeout_ms);
void quiesce_free(struct quiesce *q);

/* A marker says a killed run may have left the guest frozen: thaw it
 * (through the agent socket recorded in the marker), then forget the
 * marker.  Appends what it did to `done`. */
bool quiesce_recover(struct ring *ring, struct repo_vm *repo, int timeout_ms,
                     GPtrArray *done, GError **errp);

/* Connect and resynchronise with the agent, check it is not frozen by
 * someone else.  false: REQUIRE mode and the agent is unusable (*errp);
 * in AUTO mode problems become a warning and the backup goes on
 * crash-consistent. */
bool quiesce_prepare(struct quiesce *q, GError **errp);

/* Freeze now (call last, just before the transaction).  Same policy as
 * quiesce_prepare; after a failed or timed-out freeze the guest has
 * already been thawed again. */
bool quiesce_freeze(struct quiesce *q, GError **errp);

/* Thaw if a freeze was requested (idempotent); confirms with
 * guest-fsfreeze-status. */
void quiesce_thaw(struct quiesce *q);

/* "filesystem" when the freeze covered the guest's file systems and the
 * thaw answered the same count, else "crash". */
const char *quiesce_consistency(const struct quiesce *q);
/* {"filesystems", "window_ms", "warning"}, or null when off. New ref. */
json_t *quiesce_json(const struct quiesce *q);
/* Warnings to print (borrowed; may be empty). */
GPtrArray *quiesce_warnings(const struct quiesce *q);

#endif

/* qbak prune, protect and unprotect: keep what a retention policy says,
 * and fold what goes into what stays, so that every kept point restores
 * exactly as before.
 *
 * A removed point P whose layer of a disk is the backing file of another
 * point C's layer is merged: C's layer is folded into P's file in place
 * (qcow2_merge_top: the cost is C's data, never the disk), then P's file
 * replaces C's layer by rename and C's manifest says what C now holds.
 * Points are removed oldest first, so a full and ten incrementals pruned
 * to the newest cost the incrementals' data, once each.  A removed layer
 * nothing kept builds on is just deleted.
 *
 * Every step is durable before the next, and a crash at any step leaves
 * state the next prune or backup completes (prune_recover):
 *   1. .prune.json in the VM directory lists the points to remove, in
 *      order, and where each disk's layer goes (the intent; its name is
 *      made durable in one batch with the first point's marker: recovery
 *      needs only the markers);
 *   then for each point P:
 *   2. <P>/pruning delists it (list and restore skip it; the chains of
 *      later points still read through its files); what recovery does is
 *      complete every delisted point, from the state of its files;
 *   3. per disk: merge into P's file (C reads the same at every instant),
 *      C's checksums replaced by the merged ones, P's file renamed over
 *      C's layer (whether C's layer still names P's file as its backing
 *      tells whether this happened), C's manifest replaced;
 *   4. the point directory renamed to .pruned-<P>, deleted at the end of
 *      the run, after its last fsync (blocks freed earlier would slow the
 *      journal commits of the steps still to come);
 *   and at the end:
 *   5. .prune.json removed.  Points of it not delisted yet when a crash
 *      came are untouched, and left to the next prune.
 */
#ifndef QBAK_AGENT_PRUNE_H
#define QBAK_AGENT_PRUNE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "agent/repo.h"
#include "agent/retention.h"

/* The intent log, in the VM directory. */
#define PRUNE_JOURNAL ".prune.json"
/* The markers prune honours (protected, damaged.json) are agent/damage.h's. */

struct prune_opts {
    const char *repo;
    const char *vm;
    struct retention_policy policy;
    bool dry_run;
    int wait_ms;
};

/* Applies the policy (or, with dry_run, says what it would do).
 * {"vm", "dry_run", "points": [{"point", "time", "keep", "reason",
 * "protected", "disks"?: [{"disk", "action", "into"?}]}], "kept",
 * "removed", "merged_bytes", "recovered", "duration_s"}. */
json_t *prune_run(const struct prune_opts *o, GError **errp);

/* Completes the removals a crashed or failed prune left (see above).
 * The caller holds the VM's exclusive lock; file-level readers are held
 * off here for the time it takes.  Sentences about what was done are
 * appended to done.  Fails (after doing what it can) when a removal
 * cannot be completed, e.g. damaged data. */
bool prune_recover(struct repo_vm *r, GPtrArray *done, GError **errp);

/* Creates (protect) or removes <point>/protected, durably.
 * {"vm", "point", "protected", "changed"}. */
json_t *prune_protect(const char *repo, const char *vm, const char *point,
                      bool protect, int wait_ms, GError **errp);

#endif

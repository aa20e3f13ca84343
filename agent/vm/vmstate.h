/* The guest's memory and device state at the disks' point in time, with
 * QEMU's background-snapshot migration (QEMU 6.0+, userfaultfd
 * write-protection): the vCPUs stop, the disk transaction runs, the
 * snapshot is armed, the VM runs again, and QEMU writes the RAM as it was
 * into <point>/memory.state alongside the backup jobs.
 *
 * Safety (RELIABILITY.md): a marker in the VM's directory
 * (.vmstate-pending) and a guardian process make sure a killed qbak never
 * leaves the guest paused nor a snapshot running: the guardian, a child
 * that waits on a pipe, takes over the monitor when qbak dies (its
 * connection closes with it), lets a snapshot already armed complete
 * (never cancels it: QEMU 7.2 removes the write protection only on
 * success, a cancelled snapshot leaves the guest hung), resumes the VM and
 * undoes the migration settings; the next run does the same from the
 * marker if the guardian died too.
 * The state file is preallocated before the vCPUs stop, so a full file
 * system fails the backup before anything happens in QEMU (a
 * background snapshot that fails on QEMU 7.2 leaves the guest
 * write-protected for good). */
#ifndef QBAK_AGENT_VM_VMSTATE_H
#define QBAK_AGENT_VM_VMSTATE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "agent/repo.h"
#include "qmp/client.h"

#define VMSTATE_FILE "memory.state"

enum vmstate_mode {
    VMSTATE_OFF,
    VMSTATE_ON,  /* a failed capture fails the backup */
    VMSTATE_TRY, /* a failed capture leaves the disks alone, said so */
};

struct vmstate;

/* A marker says a killed run may have left the VM paused or a snapshot
 * running: let it complete, resume the VM, undo our migration settings.
 * Appends what it did to done. */
bool vmstate_recover(struct qmp_client *qmp, struct repo_vm *repo,
                     int timeout_ms, GPtrArray *done, GError **errp);

struct vmstate *vmstate_new(struct qmp_client *qmp, struct repo_vm *repo,
                            int partial_fd, enum vmstate_mode mode,
                            const char *qmp_path, int timeout_ms);
/* Frees, after vmstate_cleanup. */
void vmstate_free(struct vmstate *v);

/* Before the freeze: refuses a VM in prelaunch, creates the state file
 * (0600) and preallocates it, passes it to QEMU, sets the migration
 * capabilities, writes the marker, starts the guardian.  In TRY mode a
 * failure becomes a warning and the capture is off (returns true). */
bool vmstate_prepare(struct vmstate *v, GError **errp);

/* Where the host cannot write-protect guest memory (background-snapshot
 * "not supported"), the fallback: stop, migrate into the file, and only
 * then the disks (their NBD nodes added in postmigrate: a node added
 * earlier is deactivated with the rest), the jobs paused before cont and
 * resumed after.  Called before the backup targets are attached; a no-op
 * otherwise (and for NULL). */
bool vmstate_save_first(struct vmstate *v, GError **errp);
/* The fallback has stopped the vCPUs: no guest agent can answer (no
 * freeze; the memory is saved with the disks anyway). */
bool vmstate_vcpus_stopped(const struct vmstate *v);

/* Right before the disk transaction: stop the vCPUs. */
bool vmstate_stop(struct vmstate *v, GError **errp);

/* Right after it (transaction_ok: whether it succeeded): start the
 * snapshot, wait until write tracking is armed, and give the VM back its
 * run state.  The VM runs again on every path. */
bool vmstate_start(struct vmstate *v, bool transaction_ok, GError **errp);

/* Once the disks' data is in: wait until the state is written, trim and
 * fsync the file. */
bool vmstate_finish(struct vmstate *v, GError **errp);

/* Every path: wait for a snapshot still running, resume a VM we stopped,
 * undo the capabilities, close the fd in QEMU, dismiss the guardian,
 * remove the marker.  Idempotent. */
void vmstate_cleanup(struct vmstate *v);

/* Whether the point holds a state. */
bool vmstate_captured(const struct vmstate *v);
/* {"file", "bytes", "capture_s", "downtime_ms", "method", "capabilities"
 * (what a restore sets before loading)}, or null when
 * the point holds no state.  New reference. */
json_t *vmstate_json(const struct vmstate *v);
/* Warnings to print (borrowed). */
GPtrArray *vmstate_warnings(const struct vmstate *v);

#endif

/* qbak restore --start: the whole VM back from a point.  Disks restored
 * as qcow2 images under a directory (restore_run per disk), or with
 * --live as thin overlays on the backup chain that QEMU streams into in
 * the background; the recorded command line rebuilt (agent/vm/cmdline.h)
 * and started; a point with memory loads its state (-incoming defer,
 * migrate-incoming from the file) and resumes where it was, a point
 * without memory (or --cold) boots cold.
 *
 * --live pins the point against prune: a background process (the "pin
 * holder", its pid in the result) holds the VM's REPO_LOCK_BROWSE lock
 * until QEMU has streamed every disk (the overlays then stand alone) or
 * exits; prune takes REPO_LOCK_PRUNE and so waits for it. */
#ifndef QBAK_AGENT_VM_RESTORE_VM_H
#define QBAK_AGENT_VM_RESTORE_VM_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

struct restore_vm_opts {
    const char *repo;
    const char *vm;
    const char *point; /* NULL: the newest */
    const char *dir;   /* NULL: ./<vm>-<point> */
    bool live;
    bool cold;
    bool dry_run;
    int wait_ms;
    int timeout_ms;
};

/* {"vm", "point", "pid", "qmp", "qga", "memory", "disks": [{"disk",
 * "file"}], "command": [...], "dir", "live", "pinned_by"}, or NULL with
 * *errp and nothing left running. */
json_t *restore_vm_run(const struct restore_vm_opts *o, GError **errp);

#endif

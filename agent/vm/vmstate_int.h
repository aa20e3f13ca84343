/* Internals shared by the memory capture (vmstate.c) and its guardian
 * and marker (vmstate_guard.c). */
#ifndef QBAK_AGENT_VM_VMSTATE_INT_H
#define QBAK_AGENT_VM_VMSTATE_INT_H

#include <sys/types.h>

#include "agent/vm/vmstate.h"

#define MARKER ".vmstate-pending"
#define FDNAME "qbak-vmstate"
/* Migration bandwidth while we capture: QEMU's default 128 MiB/s limit
 * applies even with the VM stopped. */
#define BANDWIDTH (1ull << 40)
/* Polling query-migrate until write tracking is armed. */
#define ARM_POLL_US 2000
/* Room for device state and the stream's page headers beyond the RAM. */
#define STATE_SLACK (64ull << 20)
/* How long a snapshot left behind is waited for (RAM is written at about
 * 40 MB/s under TCG: 25 s per GiB). */
#define WAIT_COMPLETE_S 1200

struct vmstate {
    struct qmp_client *qmp;
    struct repo_vm *repo;
    int partial_fd;
    enum vmstate_mode mode;
    char *qmp_path;
    int timeout_ms;

    bool active;       /* prepared and not given up */
    bool fd_passed;    /* our fd is in QEMU's monitor */
    bool caps_set;     /* our capability on (see cap_name) */
    bool stop_migrate; /* the fallback: stop, migrate, then the disks */
    bool saved_first;  /* the fallback's state is written */
    bool marker;       /* written */
    bool stopped;      /* we stopped the vCPUs and have not resumed them */
    bool migrating;    /* a snapshot of ours may run */
    bool done;         /* state complete and durable */
    bool was_running;  /* the VM's run state before we stopped it */
    json_int_t old_bandwidth;
    int state_fd;
    pid_t guardian;
    int guardian_fd; /* write end: a byte dismisses the guardian */
    gint64 stop_us, resume_us, start_us, end_us;
    uint64_t bytes;
    GPtrArray *warnings;
};

/* The marker (.vmstate-pending, durable) says a capture may be under way:
 * the next run finishes what a killed one left. */
bool vmstate_marker_write(struct vmstate *v, GError **errp);
void vmstate_marker_remove(int vm_fd);
/* The guardian: a child that waits on a pipe and, if qbak dies, takes over
 * the monitor, cancels the run's jobs, lets a snapshot complete, resumes
 * the VM.  Dismissed (and reaped) when qbak cleans up itself. */
bool vmstate_guardian_start(struct vmstate *v, GError **errp);
void vmstate_guardian_dismiss(struct vmstate *v);

#endif

/* qbak backup: one consistent point in time of a VM's disks. */
#ifndef QBAK_AGENT_BACKUP_H
#define QBAK_AGENT_BACKUP_H

#include <glib.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent/quiesce.h"
#include "agent/vm/vmstate.h"

enum backup_mode {
    BACKUP_MODE_AUTO,
    BACKUP_MODE_PUSH,
    BACKUP_MODE_PULL,
};

struct backup_opts {
    const char *qmp_path;
    const char *qga_path; /* NULL: no guest agent */
    enum quiesce_mode quiesce;
    const char *repo;
    const char *vm;
    char **disks; /* NULL: every writable disk with a device */
    bool full;
    uint64_t speed; /* bytes/s per job, 0: unlimited */
    unsigned cluster_bits;
    int timeout_ms;  /* per QMP call */
    int stall_ms;    /* a repository write older than this fails the backup */
    int wait_ms;     /* how long to wait for a busy VM lock (0: fail at once) */
    bool progress;   /* progress lines on stderr */
    int progress_fd; /* > 0: progress reports to this fd instead (run) */
    bool verbose;    /* each phase with its time on stderr */
    enum vmstate_mode memory; /* capture the guest's memory with the disks */
    /* Pull mode (agent/backup_pull.h): QEMU keeps the point in time in
     * scratch, qbak reads it; push: QEMU's backup job sends it to qbak.
     * Auto picks pull where it is safe (backup_choose_mode()). */
    enum backup_mode mode;
    const char *scratch_dir;
    uint64_t scratch_max; /* bytes for all disks' scratch, 0: unbounded */
    int nice; /* pull mode's copy runs at this nice value, 0: as started */
};

/* Set by the SIGINT/SIGTERM handler: the backup stops and cleans up. */
extern volatile sig_atomic_t backup_interrupted;

/* Returns the result object (see the README's --json) or NULL with *errp.
 * Nothing is listed unless every disk was backed up and committed. */
json_t *backup_run(const struct backup_opts *opts, GError **errp);

#endif

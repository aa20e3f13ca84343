/* qbak verify: re-read every stored cluster of the selected points' chains
 * and check it against its layer's checksums, and check each chain's
 * structure against the manifests (every backing layer present, sizes,
 * cluster size and format as recorded, metadata the qcow2 reader accepts).
 *
 * A point is good only when every layer of its chain is; damaged when any
 * is (the first bad cluster's guest offset is reported, and damaged.json
 * is written into the point); unverifiable when a layer has no checksums
 * (points from before checksums existed) and nothing is damaged.
 */
#ifndef QBAK_AGENT_VERIFY_H
#define QBAK_AGENT_VERIFY_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

struct verify_opts {
    const char *repo;
    const char *vm;    /* NULL: every VM in the repository */
    const char *point; /* NULL: every point */
    const char *disk;  /* NULL: every disk */
    bool progress;     /* a progress line per layer on stderr */
    int wait_ms;       /* how long to wait for a busy VM lock */
};

/* The findings, or NULL with errp set when verify could not run (a busy
 * lock, no such VM or point).  {"vms": [{"vm", "points": [{"point",
 * "state", "disks": [{"disk", "state", "offset", "reason", "layer"}]}]}],
 * "good", "damaged", "unverifiable", "busy", "bytes_read", "duration_s",
 * "checksum_cpu_s"}; state is "good", "damaged" or "unverifiable".
 * Without opts->vm, a VM whose lock is busy is listed as {"vm", "busy":
 * true, "points": []} and counted in "busy"; the others are verified. */
json_t *verify_run(const struct verify_opts *opts, GError **errp);

#endif

/* qbak run: back up every VM of the host's configuration that is due, then
 * prune it, each VM in child processes of its own (man qbak-run(1)). */
#ifndef QBAK_AGENT_HOST_RUN_H
#define QBAK_AGENT_HOST_RUN_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "agent/host/config.h"

struct host_run_opts {
    struct host_config *config;
    char **vms;       /* only these VMs (NULL: every VM of the config) */
    bool all;         /* back them up now, due or not */
    int jobs;         /* VMs at once */
    bool progress;    /* a live line on stderr */
    const char *self; /* the qbak binary the children run */
};

/* Up to how many VMs run at once by default: one per CPU, at least 2 (a
 * backup mostly waits on QEMU and the disk), at most 16. */
int host_run_default_jobs(void);

/* Returns the result (see the README's run --json), NULL with *errp only
 * when nothing could be attempted (an unknown --vm).  Each VM's outcome
 * is in the result; *all_ok says whether every due VM got its point and
 * was pruned. */
json_t *host_run(const struct host_run_opts *o, bool *all_ok, GError **errp);

#endif

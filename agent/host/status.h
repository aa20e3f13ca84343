/* qbak status: where each VM of the host stands against its RPO, for a
 * person, a monitoring check (the exit status) and Prometheus
 * (man qbak-status(1)). */
#ifndef QBAK_AGENT_HOST_STATUS_H
#define QBAK_AGENT_HOST_STATUS_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "agent/host/config.h"

/* Per VM: OK (newest point within the RPO, last attempt succeeded), LATE
 * (newest point older than the RPO), FAILING (the last attempt failed or
 * found the VM busy), NEVER (no point yet, and no failed attempt). */
#define HOST_STATE_OK "OK"
#define HOST_STATE_LATE "LATE"
#define HOST_STATE_FAILING "FAILING"
#define HOST_STATE_NEVER "NEVER"

/* The status of every VM of c (see the README's status --json); *all_ok
 * says whether every VM is OK. */
json_t *host_status(struct host_config *c, bool *all_ok);

/* Writes status (borrowed, from host_status) to path in node_exporter's
 * textfile-collector format: a temporary file in the same directory,
 * then rename, so the collector never reads half a file. */
bool host_metrics_write(json_t *status, const char *path, GError **errp);

#endif

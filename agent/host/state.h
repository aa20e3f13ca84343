/* What `run` leaves and `status` reads, per VM in the repository: the
 * newest committed point, and a record of the last attempt
 * (<repo>/<vm>/.last-run.json, written durably by `run`). */
#ifndef QBAK_AGENT_HOST_STATE_H
#define QBAK_AGENT_HOST_STATE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define HOST_RECORD_NAME ".last-run.json"

/* The newest committed point of repo/vm: *point (owned, NULL when there
 * is none), its time in Unix seconds, and how many points there are.
 * A VM directory that does not exist yet has no point (not an error). */
bool host_newest_point(const char *repo, const char *vm, char **point,
                       int64_t *time_s, unsigned *count, GError **errp);

/* The last attempt's record (owned), or NULL when there is none or it is
 * unreadable. */
json_t *host_record_read(const char *repo, const char *vm);

/* Writes rec (borrowed) as repo/vm/.last-run.json: a temporary file,
 * fsync, rename, fsync of the directory, so a crash leaves the old record
 * or the new one.  Creates repo/vm when needed. */
bool host_record_write(const char *repo, const char *vm, json_t *rec,
                       GError **errp);

/* Bytes the VM's directory takes on disk (allocated blocks). */
uint64_t host_repo_bytes(const char *repo, const char *vm);

/* Seconds since the epoch of an ISO 8601 time, or -1. */
int64_t host_parse_time(const char *iso);

#endif

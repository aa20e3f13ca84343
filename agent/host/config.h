/* The host's configuration: one GKeyFile naming every VM qbak backs up,
 * with [defaults] every [vm NAME] inherits (man qbak.conf(5)).
 *
 * A mistake is reported as "FILE:LINE: KEY: what is wrong" and nothing
 * is returned: `run` must not back up half a host from a file it only
 * half understood. */
#ifndef QBAK_AGENT_HOST_CONFIG_H
#define QBAK_AGENT_HOST_CONFIG_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#define HOST_CONFIG_DEFAULT "/etc/qbak/qbak.conf"

/* Retention rules, in prune's order; -1 when not set. */
enum host_keep {
    HOST_KEEP_LAST,
    HOST_KEEP_HOURLY,
    HOST_KEEP_DAILY,
    HOST_KEEP_WEEKLY,
    HOST_KEEP_MONTHLY,
    HOST_KEEP_YEARLY,
    HOST_KEEP_N
};

/* The names of the keep-* keys (and of prune's options without "--"). */
extern const char *const host_keep_names[HOST_KEEP_N];

/* One VM with [defaults] applied.  Strings are owned; NULL when unset. */
struct host_vm {
    char *name;
    char *repo;
    char *qmp;
    char *qga;
    char *quiesce;       /* auto, require or off */
    char *memory;        /* on, try or off (backup --memory) */
    char *mode;          /* auto, push or pull (backup --mode) */
    char *scratch;       /* pull mode's scratch directory */
    int64_t scratch_max; /* bytes, 0: unbounded */
    int nice;            /* pull mode's copy nice value; -1: backup's default */
    char **disks;        /* NULL: every disk */
    int64_t rpo_s;
    bool full;         /* every backup full (backup --full) */
    int64_t speed;     /* bytes/s, 0: unlimited */
    int64_t timeout_s; /* 0: backup's default */
    int64_t stall_s;   /* 0: backup's default */
    int64_t wait_s;    /* busy lock wait */
    int64_t keep[HOST_KEEP_N];
};

struct host_config {
    char *path;
    GPtrArray *vms; /* struct host_vm *, in file order */
};

/* Reads and checks path.  Every VM must end up with qmp, repo and rpo. */
struct host_config *host_config_load(const char *path, GError **errp);
void host_config_free(struct host_config *c);

/* The VM called name, or NULL. */
struct host_vm *host_config_find(struct host_config *c, const char *name);

/* "90s", "5m", "1h", "1d" (a bare number is seconds) into *secs. */
bool host_parse_duration(const char *s, int64_t *secs);
/* "200M", "4K", "1G", "1T" (powers of 1024; a bare number is bytes). */
bool host_parse_size(const char *s, int64_t *bytes);
/* Whether any keep-* rule is set. */
bool host_vm_has_retention(const struct host_vm *vm);

#endif

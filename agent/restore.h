/* qbak restore: one disk at one point, as a standalone raw or qcow2 image,
 * read through the chain with io_uring. */
#ifndef QBAK_AGENT_RESTORE_H
#define QBAK_AGENT_RESTORE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

struct restore_opts {
    const char *repo;
    const char *vm;
    const char *disk;
    const char *point; /* NULL: the newest point holding the disk */
    const char *output;
    bool qcow2;
    bool force;     /* replace an existing output file */
    bool no_verify; /* do not check clusters against their checksums */
    bool progress;
    int wait_ms; /* how long to wait for a busy VM lock (0: fail at once) */
};

json_t *restore_run(const struct restore_opts *opts, GError **errp);

#endif

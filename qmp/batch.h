/* Several QMP commands in one round trip (qmp_client_call_many), each
 * with a flag it sets on success, so that what was done can be undone
 * and what failed is named. */
#ifndef QBAK_QMP_BATCH_H
#define QBAK_QMP_BATCH_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "qmp/client.h"

struct qmp_batch {
    struct qmp_call *calls; /* NULL: none sent or being built */
    struct qmp_batch_flag {
        const char *what; /* names the call in errors (borrowed) */
        bool *flag;       /* set to value on success (NULL: none) */
        bool value;
    } * flags;
    size_t n, cap;
};

/* Room for cap calls. */
void qmp_batch_init(struct qmp_batch *bt, size_t cap);
/* Queues cmd (borrowed) with args (taken, may be NULL). */
void qmp_batch_add(struct qmp_batch *bt, const char *what, const char *cmd,
                   json_t *args, bool *flag, bool value);
/* Sends the batch without waiting (qmp_client_send_many). */
void qmp_batch_send(struct qmp_client *c, struct qmp_batch *bt, int timeout_ms);
/* Waits for a sent batch's replies, sets the flags and frees the batch.
 * The first failure goes to errp (NULL: none wanted) as "what: error",
 * every failure to warnings (NULL: none wanted).  False if any failed. */
bool qmp_batch_finish(struct qmp_client *c, struct qmp_batch *bt,
                      int timeout_ms, GPtrArray *warnings, GError **errp);
/* qmp_batch_send, then qmp_batch_finish. */
bool qmp_batch_run(struct qmp_client *c, struct qmp_batch *bt, int timeout_ms,
                   GPtrArray *warnings, GError **errp);

#endif

/* A batch of QMP commands with success flags: see batch.h. */
#include "qmp/batch.h"

void
qmp_batch_init(struct qmp_batch *bt, size_t cap)
{
    bt->calls = g_new0(struct qmp_call, cap);
    bt->flags = g_new0(struct qmp_batch_flag, cap);
    bt->n = 0;
    bt->cap = cap;
}

void
qmp_batch_add(struct qmp_batch *bt, const char *what, const char *cmd,
              json_t *args, bool *flag, bool value)
{
    g_assert(bt->n < bt->cap);
    bt->calls[bt->n].cmd = cmd;
    bt->calls[bt->n].args = args;
    bt->flags[bt->n] = (struct qmp_batch_flag){what, flag, value};
    bt->n++;
}

void
qmp_batch_send(struct qmp_client *c, struct qmp_batch *bt, int timeout_ms)
{
    qmp_client_send_many(c, bt->calls, bt->n, timeout_ms);
}

bool
qmp_batch_finish(struct qmp_client *c, struct qmp_batch *bt, int timeout_ms,
                 GPtrArray *warnings, GError **errp)
{
    bool ok = qmp_client_wait_many(c, bt->calls, bt->n, timeout_ms);

    for (size_t i = 0; i < bt->n; i++) {
        struct qmp_batch_flag *f = &bt->flags[i];
        GError *e = bt->calls[i].error;
        if (!e) {
            if (f->flag) {
                *f->flag = f->value;
            }
            continue;
        }
        if (warnings) {
            g_ptr_array_add(warnings,
                            g_strdup_printf("%s: %s", f->what, e->message));
        }
        if (errp && !*errp) {
            g_set_error(errp, e->domain, e->code, "%s: %s", f->what,
                        e->message);
        }
    }
    qmp_calls_clear(bt->calls, bt->n);
    g_free(bt->calls);
    g_free(bt->flags);
    bt->calls = NULL;
    bt->flags = NULL;
    return ok;
}

bool
qmp_batch_run(struct qmp_client *c, struct qmp_batch *bt, int timeout_ms,
              GPtrArray *warnings, GError **errp)
{
    qmp_batch_send(c, bt, timeout_ms);
    return qmp_batch_finish(c, bt, timeout_ms, warnings, errp);
}

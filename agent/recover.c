/* Recovery of a crashed run's leftovers: see recover.h. */
#include "agent/recover.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

char *
recover_qemu_prefix(const struct repo_vm *r)
{
    return g_strdup_printf("qbak-%.8s-", r->vm_id);
}

char *
recover_job_id(const struct repo_vm *r, const char *point, unsigned k)
{
    return g_strdup_printf("qbak-%.8s-%s-%u", r->vm_id, point, k);
}

char *
recover_node_name(const struct repo_vm *r, unsigned k)
{
    return g_strdup_printf("qbak-%.8s-%u", r->vm_id, k);
}

void
recover_crash_point(const char *name)
{
    const char *at = getenv("QBAK_CRASH_AT");
    size_t n = strlen(name);

    if (!at || strncmp(at, name, n) != 0) {
        return;
    }
    /* "<name>:stop" freezes us instead, so a test can kill QEMU first. */
    if (strcmp(at + n, ":stop") == 0) {
        kill(getpid(), SIGSTOP);
    } else if (at[n] == 0) {
        kill(getpid(), SIGKILL);
    }
}

/* The point a job of ours belongs to: "<prefix><point>-<k>". */
static char *
job_point(const char *id, const char *prefix)
{
    const char *p = id + strlen(prefix);
    const char *dash = strrchr(p, '-');

    return dash && dash > p ? g_strndup(p, (gsize)(dash - p)) : NULL;
}

static bool
point_committed(struct repo_vm *r, const char *point)
{
    g_autofree char *path = g_strdup_printf("%s/%s", point, MANIFEST_NAME);

    return repo_name_valid(point, "point", NULL) &&
           faccessat(r->vm_fd, path, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
}

static json_t *
our_jobs(struct qmp_client *qmp, const char *prefix, int timeout_ms,
         GError **errp)
{
    json_t *jobs = qmp_client_call(qmp, "query-jobs", NULL, timeout_ms, errp);
    json_t *ours, *j;
    size_t i;

    if (!jobs) {
        return NULL;
    }
    ours = json_array();
    json_array_foreach(jobs, i, j)
    {
        const char *id = json_string_value(json_object_get(j, "id"));
        if (id && g_str_has_prefix(id, prefix)) {
            json_array_append(ours, j);
        }
    }
    json_decref(jobs);
    return ours;
}

static const char *
job_status(json_t *j)
{
    const char *s = json_string_value(json_object_get(j, "status"));
    return s ? s : "";
}

bool
recover_qemu(struct qmp_client *qmp, struct repo_vm *r, int timeout_ms,
             GPtrArray *done, GError **errp)
{
    g_autofree char *prefix = recover_qemu_prefix(r);
    gint64 deadline;
    json_t *jobs, *j, *nodes = NULL, *n;
    size_t i;
    /* The jobs and the nodes in one round trip: with no job of ours (the
     * usual case) the nodes asked for with them are current. */
    struct qmp_call calls[2] = {
        {.cmd = "query-jobs"},
        {.cmd = "query-named-block-nodes",
         .args = json_pack("{s:b}", "flat", 1)},
    };

    qmp_client_call_many(qmp, calls, G_N_ELEMENTS(calls), timeout_ms);
    if (!calls[0].result) {
        g_propagate_error(errp, g_steal_pointer(&calls[0].error));
        qmp_calls_clear(calls, G_N_ELEMENTS(calls));
        return false;
    }
    jobs = json_array();
    json_array_foreach(calls[0].result, i, j)
    {
        const char *id = json_string_value(json_object_get(j, "id"));
        if (id && g_str_has_prefix(id, prefix)) {
            json_array_append(jobs, j);
        }
    }
    if (json_array_size(jobs) == 0) {
        if (!calls[1].result) {
            g_propagate_error(errp, g_steal_pointer(&calls[1].error));
            qmp_calls_clear(calls, G_N_ELEMENTS(calls));
            json_decref(jobs);
            return false;
        }
        nodes = g_steal_pointer(&calls[1].result);
    }
    qmp_calls_clear(calls, G_N_ELEMENTS(calls));
    json_array_foreach(jobs, i, j)
    {
        const char *id = json_string_value(json_object_get(j, "id"));
        const char *st = job_status(j);
        g_autofree char *point = job_point(id, prefix);
        bool committed = point && point_committed(r, point);
        const char *verb;

        if (!strcmp(st, "concluded") || !strcmp(st, "aborting") ||
            !strcmp(st, "null")) {
            continue;
        }
        /* A committed point's job is finished as a normal run would;
         * anything else is cancelled. Neither touches a bitmap. */
        verb =
            committed && !strcmp(st, "pending") ? "job-finalize" : "job-cancel";
        json_decref(qmp_client_call(qmp, verb, json_pack("{s:s}", "id", id),
                                    timeout_ms, NULL));
        g_ptr_array_add(
            done, g_strdup_printf(
                      "%s job %s left by an earlier run (%s, "
                      "point %s)",
                      !strcmp(verb, "job-finalize") ? "finalized" : "cancelled",
                      id, st, committed ? "committed" : "not committed"));
    }
    json_decref(jobs);

    /* Wait until they have all concluded, then dismiss them. */
    deadline = qmp_now_ms() + timeout_ms;
    while (!nodes) {
        bool busy = false;
        jobs = our_jobs(qmp, prefix, timeout_ms, errp);
        if (!jobs) {
            return false;
        }
        json_array_foreach(jobs, i, j)
        {
            if (!strcmp(job_status(j), "concluded")) {
                json_decref(qmp_client_call(
                    qmp, "job-dismiss",
                    json_pack("{s:O}", "id", json_object_get(j, "id")),
                    timeout_ms, NULL));
            } else {
                busy = true;
            }
        }
        json_decref(jobs);
        if (!busy) {
            break;
        }
        if (qmp_now_ms() > deadline) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "jobs of an earlier run did not conclude in time");
            return false;
        }
        qmp_client_wait_event(qmp, 200, NULL);
        while ((j = qmp_client_pop_event(qmp))) {
            json_decref(j);
        }
    }

    if (!nodes) {
        nodes =
            qmp_client_call(qmp, "query-named-block-nodes",
                            json_pack("{s:b}", "flat", 1), timeout_ms, errp);
    }
    if (!nodes) {
        return false;
    }
    json_array_foreach(nodes, i, n)
    {
        const char *name = json_string_value(json_object_get(n, "node-name"));
        g_autoptr(GError) err = NULL;
        json_t *ret;

        if (!name || !g_str_has_prefix(name, prefix)) {
            continue;
        }
        ret = qmp_client_call(qmp, "blockdev-del",
                              json_pack("{s:s}", "node-name", name), timeout_ms,
                              &err);
        g_ptr_array_add(done, ret ? g_strdup_printf("deleted NBD node %s left "
                                                    "by an earlier run",
                                                    name)
                                  : g_strdup_printf("could not delete NBD node "
                                                    "%s: %s",
                                                    name, err->message));
        json_decref(ret);
    }
    json_decref(nodes);
    return true;
}

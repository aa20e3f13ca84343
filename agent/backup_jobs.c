/* Our block jobs in QEMU: wait for them to reach PENDING (all data
 * received), check them before the commit, finalize after it, cancel on
 * failure, dismiss. */
#include "agent/backup_int.h"
#include "agent/progress.h"

#include <stdio.h>
#include <string.h>

#include "agent/recover.h"

#define JOB_POLL_MS 500

static json_t *
find_job(json_t *jobs, const char *id)
{
    size_t i;
    json_t *j;

    json_array_foreach(jobs, i, j)
    {
        if (g_strcmp0(json_string_value(json_object_get(j, "id")), id) == 0) {
            return j;
        }
    }
    return NULL;
}

static void
drop_events(struct backup *b)
{
    json_t *ev;
    while ((ev = qmp_client_pop_event(b->qmp))) {
        json_decref(ev);
    }
}

static void
show_progress(struct backup *b, struct progress *p, json_t *jobs)
{
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        json_t *j = find_job(jobs, d->job_id);

        progress_set(
            p, d->name,
            (uint64_t)json_integer_value(
                json_object_get(j, "current-progress")),
            (uint64_t)json_integer_value(json_object_get(j, "total-progress")));
    }
    progress_show(p);
}

static bool
msg_is_cancel(const char *msg)
{
    return !msg || strstr(msg, "cancel") || strstr(msg, "Cancel");
}

static bool
wait_pending(struct backup *b, struct progress *p, GError **errp)
{
    for (;;) {
        g_autoptr(GError) err = NULL;
        json_t *jobs;
        guint pending = 0;

        if (backup_interrupted) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INTR,
                        "interrupted by a signal");
            return false;
        }
        struct disk *failed = NULL;
        const char *failed_msg = NULL;

        jobs = qmp_client_call(b->qmp, "query-jobs", NULL, b->opts->timeout_ms,
                               errp);
        if (!jobs) {
            return false;
        }
        for (guint k = 0; k < b->disks->len; k++) {
            struct disk *d = b->disks->pdata[k];
            json_t *j = find_job(jobs, d->job_id);
            const char *st = json_string_value(json_object_get(j, "status"));
            const char *msg = json_string_value(json_object_get(j, "error"));
            const char *te;

            te = backup_target_error(d->target);
            if (te) {
                /* The repository failed: QEMU was told the writes
                 * succeeded (so no guest write fails), and the backup
                 * stops here; cancelling merges the bitmap back. */
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s", te);
                json_decref(jobs);
                return false;
            }
            if (g_strcmp0(st, "running") == 0) {
                recover_crash_point("running");
            }

            if (!j) {
                g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                            "%s: job %s vanished", d->name, d->job_id);
                json_decref(jobs);
                return false;
            }
            if (g_strcmp0(st, "pending") == 0) {
                pending++;
            } else if (g_strcmp0(st, "concluded") == 0 ||
                       g_strcmp0(st, "null") == 0) {
                /* In a grouped transaction one failure cancels the rest:
                 * name the disk whose job failed, not a casualty.  An
                 * aborting job is awaited: its error is set once it has
                 * concluded. */
                if (!failed ||
                    (msg_is_cancel(failed_msg) && !msg_is_cancel(msg))) {
                    failed = d;
                    failed_msg = msg;
                }
            }
        }
        if (failed) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                        "%s: backup job failed: %s", failed->name,
                        failed_msg ? failed_msg : "cancelled with the group");
            json_decref(jobs);
            return false;
        }
        show_progress(b, p, jobs);
        json_decref(jobs);
        if (pending == b->disks->len) {
            recover_crash_point("pending");
            return true;
        }
        /* JOB_STATUS_CHANGE wakes us early; the NBD data flows meanwhile. */
        if (!qmp_client_wait_event(b->qmp, JOB_POLL_MS, &err) && err) {
            g_propagate_error(errp, g_steal_pointer(&err));
            return false;
        }
        drop_events(b);
    }
}

struct progress *
backup_progress_new(struct backup *b)
{
    g_autofree char *label = g_strdup_printf("qbak: %s", b->opts->vm);

    return b->opts->progress_fd > 0 ? progress_new_fd(b->opts->progress_fd)
                                    : progress_new(label, b->opts->progress);
}

/* Wait until every job is pending (all data received), or one failed. */
bool
backup_jobs_wait_pending(struct backup *b, GError **errp)
{
    struct progress *p = backup_progress_new(b);
    bool ok = wait_pending(b, p, errp);

    progress_end(p, ok);
    return ok;
}

/* Every job still pending in a live QEMU: a point whose jobs can no longer
 * be finalized is not committed (the next run falls back to full). */
bool
backup_jobs_still_pending(struct backup *b, GError **errp)
{
    json_t *jobs =
        qmp_client_call(b->qmp, "query-jobs", NULL, b->opts->timeout_ms, errp);

    if (!jobs) {
        g_prefix_error(errp, "before commit: ");
        return false;
    }
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        json_t *j = find_job(jobs, d->job_id);
        if (g_strcmp0(json_string_value(json_object_get(j, "status")),
                      "pending") != 0) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                        "%s: job no longer pending before commit", d->name);
            json_decref(jobs);
            return false;
        }
    }
    json_decref(jobs);
    return true;
}

/* Wait (bounded) for our jobs to reach concluded, then dismiss them. */
void
backup_jobs_conclude(struct backup *b, bool cancel)
{
    gint64 deadline = qmp_now_ms() + b->opts->timeout_ms;

    for (guint k = 0; cancel && k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        json_t *r;
        if (d->job_started) {
            r = qmp_client_call(b->qmp, "job-cancel",
                                json_pack("{s:s}", "id", d->job_id),
                                b->opts->timeout_ms, NULL);
            json_decref(r);
        }
    }
    while (qmp_now_ms() < deadline) {
        json_t *jobs = qmp_client_call(b->qmp, "query-jobs", NULL,
                                       b->opts->timeout_ms, NULL);
        bool all = true;
        if (!jobs) {
            return;
        }
        for (guint k = 0; k < b->disks->len; k++) {
            struct disk *d = b->disks->pdata[k];
            json_t *j = find_job(jobs, d->job_id);
            if (d->job_started && j &&
                g_strcmp0(json_string_value(json_object_get(j, "status")),
                          "concluded") != 0) {
                all = false;
            }
        }
        json_decref(jobs);
        if (all) {
            break;
        }
        qmp_client_wait_event(b->qmp, 200, NULL);
        drop_events(b);
    }
    for (guint k = 0; k < b->disks->len; k++) {
        struct disk *d = b->disks->pdata[k];
        if (d->job_started) {
            json_decref(qmp_client_call(b->qmp, "job-dismiss",
                                        json_pack("{s:s}", "id", d->job_id),
                                        b->opts->timeout_ms, NULL));
            d->job_started = false;
        }
    }
}

/* After the commit: the jobs were started with bitmap-mode=never, so
 * finalizing changes no bitmap; it ends the jobs (and their hold on the
 * previous generation, which the caller then removes). */
void
backup_jobs_finalize(struct backup *b, GPtrArray *warnings)
{
    g_autoptr(GError) err = NULL;
    struct disk *first = b->disks->pdata[0];
    json_t *r = qmp_client_call(b->qmp, "job-finalize",
                                json_pack("{s:s}", "id", first->job_id),
                                b->opts->timeout_ms, &err);

    if (!r) {
        /* The point is committed; the bitmap merely stays a superset. */
        g_ptr_array_add(warnings, g_strdup_printf("%s", err->message));
    }
    json_decref(r);
    backup_jobs_conclude(b, false);
}

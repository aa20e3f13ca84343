/* Memory capture with background-snapshot, or stop and migrate: see
 * vmstate.h; the marker and guardian are in vmstate_guard.c. */
#include "agent/vm/vmstate.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/recover.h"
#include "agent/vm/vmstate_int.h"

struct vmstate *
vmstate_new(struct qmp_client *qmp, struct repo_vm *repo, int partial_fd,
            enum vmstate_mode mode, const char *qmp_path, int timeout_ms)
{
    struct vmstate *v = g_new0(struct vmstate, 1);

    v->qmp = qmp;
    v->repo = repo;
    v->partial_fd = partial_fd;
    v->mode = mode;
    v->qmp_path = g_canonicalize_filename(qmp_path, NULL);
    v->timeout_ms = timeout_ms;
    v->state_fd = -1;
    v->guardian_fd = -1;
    v->old_bandwidth = -1;
    v->warnings = g_ptr_array_new_with_free_func(g_free);
    return v;
}

void
vmstate_free(struct vmstate *v)
{
    if (!v) {
        return;
    }
    vmstate_cleanup(v);
    g_ptr_array_free(v->warnings, true);
    g_free(v->qmp_path);
    g_free(v);
}

static json_t *
call(struct vmstate *v, const char *cmd, json_t *args, GError **errp)
{
    return qmp_client_call(v->qmp, cmd, args, v->timeout_ms, errp);
}

static bool
call_ok(struct vmstate *v, const char *cmd, json_t *args, GError **errp)
{
    json_t *r = call(v, cmd, args, errp);
    json_decref(r);
    return r != NULL;
}

static const char *
run_status(json_t *st)
{
    const char *s = json_string_value(json_object_get(st, "status"));
    return s ? s : "";
}

/* ---- the marker ---------------------------------------------------- */

static uint64_t
ram_size(struct vmstate *v, GError **errp)
{
    json_auto_t *r = call(v, "query-memory-size-summary", NULL, errp);

    if (!r) {
        return 0;
    }
    return (uint64_t)json_integer_value(json_object_get(r, "base-memory")) +
           (uint64_t)json_integer_value(json_object_get(r, "plugged-memory"));
}

/* background-snapshot, or for the fallback dirty-bitmaps: without it a
 * completed migration writes out and drops the persistent bitmaps the
 * next incremental needs. */
static const char *
cap_name(const struct vmstate *v)
{
    return v->stop_migrate ? "dirty-bitmaps" : "background-snapshot";
}

static bool
set_caps(struct vmstate *v, bool on, GError **errp)
{
    return call_ok(v, "migrate-set-capabilities",
                   json_pack("{s:[{s:s, s:b}]}", "capabilities", "capability",
                             cap_name(v), "state", (int)on),
                   errp);
}

static bool
prepare(struct vmstate *v, GError **errp)
{
    json_auto_t *st = call(v, "query-status", NULL, errp);
    json_auto_t *mig = NULL, *params = NULL;
    uint64_t ram;
    const char *ms;
    int ret;

    if (!st) {
        return false;
    }
    /* A VM started with -S and never continued aborts the snapshot
     * thread ('prelaunch' -> 'paused' is not a valid transition). */
    if (!strcmp(run_status(st), "prelaunch") ||
        !strcmp(run_status(st), "inmigrate")) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "the VM has not started yet (%s): its memory cannot be "
                    "captured",
                    run_status(st));
        return false;
    }
    v->was_running = json_is_true(json_object_get(st, "running"));
    mig = call(v, "query-migrate", NULL, errp);
    if (!mig) {
        return false;
    }
    ms = json_string_value(json_object_get(mig, "status"));
    if (ms && (!strcmp(ms, "active") || !strcmp(ms, "setup") ||
               !strcmp(ms, "device") || !strcmp(ms, "cancelling"))) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_BUSY,
                    "a migration is running (%s)", ms);
        return false;
    }
    if (!(ram = ram_size(v, errp))) {
        return false;
    }
    v->state_fd =
        openat(v->partial_fd, VMSTATE_FILE,
               O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    /* 0600 whatever the umask: the state holds the guest's secrets. */
    if (v->state_fd < 0 || fchmod(v->state_fd, 0600) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", VMSTATE_FILE, g_strerror(errno));
        return false;
    }
    /* Space for the whole RAM before the vCPUs stop: a snapshot that fails
     * on a full file system would leave the guest hung (QEMU 7.2). */
    ret =
        fallocate(v->state_fd, 0, 0, (off_t)(ram + ram / 64 + STATE_SLACK)) < 0
            ? errno
            : 0;
    if (ret == EOPNOTSUPP) {
        g_ptr_array_add(v->warnings,
                        g_strdup("the repository's file system cannot "
                                 "preallocate the memory state: a full file "
                                 "system during the capture would fail it"));
    } else if (ret) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(ret),
                    "%s: no room for %" PRIu64 " MiB of guest memory: %s",
                    VMSTATE_FILE, ram >> 20, g_strerror(ret));
        return false;
    }
    params = call(v, "query-migrate-parameters", NULL, errp);
    if (!params) {
        return false;
    }
    v->old_bandwidth =
        json_integer_value(json_object_get(params, "max-bandwidth"));
    if (!vmstate_marker_write(v, errp) || !vmstate_guardian_start(v, errp)) {
        return false;
    }
    /* Test-only: QBAK_VMSTATE_METHOD=stop-migrate forces the fallback. */
    v->stop_migrate =
        g_strcmp0(getenv("QBAK_VMSTATE_METHOD"), "stop-migrate") == 0;
    if (!v->stop_migrate) {
        GError *err = NULL;
        if (set_caps(v, true, &err)) {
            v->caps_set = true;
        } else if (strstr(err->message, "not supported")) {
            /* The host cannot write-protect guest memory. */
            g_ptr_array_add(v->warnings,
                            g_strdup_printf("memory: %s: the VM stays paused "
                                            "while its memory is written",
                                            err->message));
            g_error_free(err);
            v->stop_migrate = true;
        } else {
            g_propagate_prefixed_error(errp, err, "background-snapshot: ");
            return false;
        }
    }
    if (v->stop_migrate) {
        if (!set_caps(v, true, errp)) {
            g_prefix_error(errp, "%s: ", cap_name(v));
            return false;
        }
        v->caps_set = true;
    }
    if (!call_ok(v, "migrate-set-parameters",
                 json_pack("{s:I}", "max-bandwidth", (json_int_t)BANDWIDTH),
                 errp)) {
        return false;
    }
    {
        json_t *r = qmp_client_call_fd(v->qmp, "getfd",
                                       json_pack("{s:s}", "fdname", FDNAME),
                                       v->state_fd, v->timeout_ms, errp);
        if (!r) {
            return false;
        }
        json_decref(r);
        v->fd_passed = true;
    }
    return true;
}

/* TRY mode: the backup goes on without the state. */
static void
give_up(struct vmstate *v, GError *err)
{
    g_ptr_array_add(v->warnings,
                    g_strdup_printf("memory not captured, the point holds the "
                                    "disks alone: %s",
                                    err->message));
    vmstate_cleanup(v);
    if (v->state_fd >= 0) {
        close(v->state_fd);
        v->state_fd = -1;
    }
    unlinkat(v->partial_fd, VMSTATE_FILE, 0);
    v->active = false;
}

/* A step of the capture failed with err (taken): with --memory=try the
 * backup goes on with the disks alone (give_up resumes the VM and says
 * so), otherwise the backup fails with it. */
static bool
settle(struct vmstate *v, GError *err, GError **errp)
{
    g_prefix_error(&err, "memory: ");
    if (v->mode == VMSTATE_TRY) {
        give_up(v, err);
        g_error_free(err);
        return true;
    }
    g_propagate_error(errp, err);
    return false;
}

bool
vmstate_prepare(struct vmstate *v, GError **errp)
{
    GError *err = NULL;

    v->active = true;
    if (prepare(v, &err)) {
        return true;
    }
    return settle(v, err, errp);
}

bool
vmstate_stop(struct vmstate *v, GError **errp)
{
    if (!v->active || v->stop_migrate) {
        return true; /* the fallback stopped the vCPUs already */
    }
    v->stop_us = g_get_monotonic_time();
    if (v->was_running) {
        /* stopped before the call: a timeout may still have stopped it */
        v->stopped = true;
        if (!call_ok(v, "stop", NULL, errp)) {
            return false;
        }
    }
    recover_crash_point("vm-stopped");
    return true;
}

/* Poll until the snapshot has started copying RAM: write tracking is
 * armed from then on. */
static bool
wait_armed(struct vmstate *v, GError **errp)
{
    gint64 deadline = qmp_now_ms() + v->timeout_ms;

    for (;;) {
        json_auto_t *m = call(v, "query-migrate", NULL, errp);
        const char *st;
        json_t *ram;

        if (!m) {
            return false;
        }
        st = json_string_value(json_object_get(m, "status"));
        ram = json_object_get(m, "ram");
        if (g_strcmp0(st, "failed") == 0 || g_strcmp0(st, "cancelled") == 0) {
            const char *desc =
                json_string_value(json_object_get(m, "error-desc"));
            g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                        "background snapshot %s: %s", st,
                        desc ? desc : "no reason given");
            return false;
        }
        if (g_strcmp0(st, "completed") == 0 ||
            json_integer_value(json_object_get(ram, "normal")) +
                    json_integer_value(json_object_get(ram, "duplicate")) >
                0) {
            return true;
        }
        if (qmp_now_ms() > deadline) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "background snapshot: not armed in time (%s)",
                        st ? st : "?");
            return false;
        }
        g_usleep(ARM_POLL_US);
    }
}

/* Give the VM back the run state it had: QEMU 7.2 resumes it by itself
 * once the snapshot is armed, newer QEMU leaves it paused. */
static bool
resume(struct vmstate *v, GError **errp)
{
    json_auto_t *st = call(v, "query-status", NULL, errp);
    bool running;

    if (!st) {
        return false;
    }
    running = json_is_true(json_object_get(st, "running"));
    if (v->was_running && !running) {
        if (!call_ok(v, "cont", NULL, errp)) {
            return false;
        }
    } else if (!v->was_running && running) {
        /* Paused by its owner before we came: paused again. */
        if (!call_ok(v, "stop", NULL, errp)) {
            return false;
        }
    }
    v->stopped = false;
    v->resume_us = g_get_monotonic_time();
    return true;
}

static bool wait_completed(struct vmstate *v, GError **errp);

bool
vmstate_vcpus_stopped(const struct vmstate *v)
{
    return v && v->active && v->stop_migrate && v->stopped;
}

/* The fallback (notes: 16 of 16 restores exact): stop, migrate into the
 * file, wait for postmigrate; the disks' transaction follows. */
static bool
save_first(struct vmstate *v, GError **errp)
{
    gint64 deadline = qmp_now_ms() + v->timeout_ms;
    json_t *r;

    v->stop_us = g_get_monotonic_time();
    if (v->was_running) {
        v->stopped = true;
        if (!call_ok(v, "stop", NULL, errp)) {
            return false;
        }
    }
    recover_crash_point("vm-stopped");
    v->start_us = g_get_monotonic_time();
    v->migrating = true;
    r = call(v, "migrate", json_pack("{s:s}", "uri", "fd:" FDNAME), errp);
    if (!r) {
        return false;
    }
    json_decref(r);
    v->fd_passed = false;
    if (!wait_completed(v, errp)) {
        return false;
    }
    v->migrating = false;
    v->end_us = g_get_monotonic_time();
    v->saved_first = true;
    /* QEMU reports completed a moment before the run state follows. */
    for (;;) {
        json_auto_t *st = call(v, "query-status", NULL, errp);
        if (!st) {
            return false;
        }
        if (strcmp(run_status(st), "postmigrate") == 0 || !v->was_running) {
            break;
        }
        if (qmp_now_ms() > deadline) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "the VM did not reach postmigrate (%s)",
                        run_status(st));
            return false;
        }
        g_usleep(ARM_POLL_US);
    }
    recover_crash_point("vm-saved");
    return true;
}

bool
vmstate_save_first(struct vmstate *v, GError **errp)
{
    GError *err = NULL;

    if (!v || !v->active || !v->stop_migrate) {
        return true;
    }
    if (save_first(v, &err)) {
        return true;
    }
    return settle(v, err, errp);
}

static bool
job_quiet(const char *st)
{
    return !st || !strcmp(st, "paused") || !strcmp(st, "pending") ||
           !strcmp(st, "concluded") || !strcmp(st, "null") ||
           !strcmp(st, "aborting");
}

/* Before cont re-activates the images, no job I/O may be in flight
 * (without this QEMU 7.2 crashed in qcow2_get_host_offset 4 times out of
 * 4): pause our jobs and wait until QEMU says each is paused (the
 * JOB_STATUS_CHANGE event alone is not enough, drains emit it briefly). */
static bool
pause_jobs(struct vmstate *v, bool pause, GError **errp)
{
    g_autofree char *prefix = recover_qemu_prefix(v->repo);
    gint64 deadline = qmp_now_ms() + v->timeout_ms;

    for (bool sent = false;;) {
        json_auto_t *jobs = call(v, "query-jobs", NULL, errp);
        bool quiet = true;
        size_t i;
        json_t *j;

        if (!jobs) {
            return false;
        }
        json_array_foreach(jobs, i, j)
        {
            const char *id = json_string_value(json_object_get(j, "id"));
            const char *st = json_string_value(json_object_get(j, "status"));
            if (!id || !g_str_has_prefix(id, prefix)) {
                continue;
            }
            if (!pause) {
                if (g_strcmp0(st, "paused") == 0) {
                    json_decref(call(v, "job-resume",
                                     json_pack("{s:s}", "id", id), NULL));
                }
                continue;
            }
            if (!sent) {
                json_decref(
                    call(v, "job-pause", json_pack("{s:s}", "id", id), NULL));
            }
            quiet &= job_quiet(st);
        }
        if (!pause || (sent && quiet)) {
            return true;
        }
        sent = true;
        if (qmp_now_ms() > deadline) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "backup jobs did not pause in time");
            return false;
        }
        g_usleep(ARM_POLL_US);
    }
}

static bool
start_after_save(struct vmstate *v, bool transaction_ok, GError **errp)
{
    bool ok = !transaction_ok || pause_jobs(v, true, errp);

    recover_crash_point("vm-transaction");
    /* Resumed whatever happened: a VM left paused is worse than a job
     * resumed with I/O in flight. */
    if (!resume(v, ok ? errp : NULL)) {
        return false;
    }
    if (transaction_ok) {
        pause_jobs(v, false, NULL);
    }
    return ok;
}

bool
vmstate_start(struct vmstate *v, bool transaction_ok, GError **errp)
{
    GError *err = NULL;
    json_t *r;

    if (!v->active) {
        return true;
    }
    if (v->stop_migrate) {
        if (start_after_save(v, transaction_ok, &err)) {
            return true;
        }
        g_propagate_prefixed_error(errp, err, "memory: ");
        return false;
    }
    if (!transaction_ok) {
        resume(v, NULL);
        return true;
    }
    recover_crash_point("vm-transaction");
    v->start_us = g_get_monotonic_time();
    v->migrating = true;
    r = call(v, "migrate", json_pack("{s:s}", "uri", "fd:" FDNAME), &err);
    if (r) {
        json_decref(r);
        v->fd_passed = false; /* the migration took it */
        if (wait_armed(v, &err)) {
            recover_crash_point("vm-armed");
        }
    }
    if (!resume(v, err ? NULL : &err) && !err) {
        g_set_error(&err, QMP_ERROR, QMP_ERROR_FAILED, "resume failed");
    }
    if (!err) {
        return true;
    }
    return settle(v, err, errp);
}

static bool
wait_completed(struct vmstate *v, GError **errp)
{
    for (;;) {
        json_auto_t *m = call(v, "query-migrate", NULL, errp);
        const char *st;

        if (!m) {
            return false;
        }
        st = json_string_value(json_object_get(m, "status"));
        if (g_strcmp0(st, "completed") == 0) {
            return true;
        }
        if (g_strcmp0(st, "failed") == 0 || g_strcmp0(st, "cancelled") == 0) {
            const char *desc =
                json_string_value(json_object_get(m, "error-desc"));
            g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED,
                        "background snapshot %s: %s", st,
                        desc ? desc : "no reason given");
            return false;
        }
        recover_crash_point("vm-writing");
        qmp_client_wait_event(v->qmp, 100, NULL);
        json_t *ev;
        while ((ev = qmp_client_pop_event(v->qmp))) {
            json_decref(ev);
        }
    }
}

static bool
finish(struct vmstate *v, GError **errp)
{
    off_t end;

    if (!wait_completed(v, errp)) {
        return false;
    }
    v->migrating = false;
    if (!v->saved_first) {
        v->end_us = g_get_monotonic_time();
    }
    /* QEMU wrote through our open file description: its offset is the
     * stream's end; the rest is preallocation. */
    end = lseek(v->state_fd, 0, SEEK_CUR);
    if (end <= 0 || ftruncate(v->state_fd, end) < 0 || fsync(v->state_fd) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", VMSTATE_FILE,
                    end <= 0 ? "QEMU wrote nothing" : g_strerror(errno));
        return false;
    }
    v->bytes = (uint64_t)end;
    return true;
}

bool
vmstate_finish(struct vmstate *v, GError **errp)
{
    GError *err = NULL;

    if (!v->active) {
        return true;
    }
    if (!finish(v, &err)) {
        return settle(v, err, errp);
    }
    v->done = true;
    vmstate_cleanup(v);
    return true;
}

void
vmstate_cleanup(struct vmstate *v)
{
    if (v->migrating) {
        /* Waited for, never cancelled: a cancelled snapshot leaves the
         * guest write-protected for good on QEMU 7.2. */
        for (int i = 0; i < WAIT_COMPLETE_S * 10; i++) {
            json_auto_t *m = call(v, "query-migrate", NULL, NULL);
            const char *st = json_string_value(json_object_get(m, "status"));
            if (!m || !st ||
                (strcmp(st, "active") && strcmp(st, "setup") &&
                 strcmp(st, "cancelling") && strcmp(st, "device"))) {
                break;
            }
            g_usleep(100000);
        }
        v->migrating = false;
    }
    if (v->stopped) {
        resume(v, NULL);
    }
    if (v->caps_set) {
        set_caps(v, false, NULL);
        if (v->old_bandwidth >= 0) {
            json_decref(call(
                v, "migrate-set-parameters",
                json_pack("{s:I}", "max-bandwidth", v->old_bandwidth), NULL));
        }
        v->caps_set = false;
    }
    if (v->fd_passed) {
        json_decref(
            call(v, "closefd", json_pack("{s:s}", "fdname", FDNAME), NULL));
        v->fd_passed = false;
    }
    vmstate_guardian_dismiss(v);
    if (v->marker) {
        vmstate_marker_remove(v->repo->vm_fd);
        v->marker = false;
    }
    if (v->state_fd >= 0 && !v->migrating) {
        close(v->state_fd);
        v->state_fd = -1;
    }
}

bool
vmstate_captured(const struct vmstate *v)
{
    return v && v->active && v->done;
}

json_t *
vmstate_json(const struct vmstate *v)
{
    if (!vmstate_captured(v)) {
        return json_null();
    }
    return json_pack("{s:s, s:I, s:f, s:f, s:s, s:[s]}", "file", VMSTATE_FILE,
                     "bytes", (json_int_t)v->bytes, "capture_s",
                     (double)(v->end_us - v->stop_us) / 1e6, "downtime_ms",
                     (double)(v->resume_us - v->stop_us) / 1000.0, "method",
                     v->stop_migrate ? "stop-migrate" : "background-snapshot",
                     "capabilities", cap_name(v));
}

GPtrArray *
vmstate_warnings(const struct vmstate *v)
{
    return v->warnings;
}

/* ---- recovery ------------------------------------------------------- */

bool
vmstate_recover(struct qmp_client *qmp, struct repo_vm *repo, int timeout_ms,
                GPtrArray *done, GError **errp)
{
    json_auto_t *m = repo_read_json(repo->vm_fd, MARKER, NULL);
    struct vmstate v = {.qmp = qmp,
                        .repo = repo,
                        .timeout_ms = timeout_ms,
                        .state_fd = -1,
                        .guardian_fd = -1};
    json_auto_t *st = NULL;
    const char *s;

    if (faccessat(repo->vm_fd, MARKER, F_OK, AT_SYMLINK_NOFOLLOW) != 0) {
        return true;
    }
    v.was_running = !m || json_is_true(json_object_get(m, "was_running"));
    v.old_bandwidth =
        m ? json_integer_value(json_object_get(m, "max_bandwidth")) : -1;
    v.migrating = true;
    v.caps_set = true;
    v.fd_passed = true;
    st = call(&v, "query-status", NULL, errp);
    if (!st) {
        return false;
    }
    s = run_status(st);
    /* Paused by the killed run (or by a migration it started). */
    v.stopped = v.was_running && strcmp(s, "running") != 0 &&
                strcmp(s, "prelaunch") != 0;
    vmstate_cleanup(&v);
    vmstate_marker_remove(repo->vm_fd);
    g_ptr_array_add(
        done, g_strdup_printf("finished a memory capture left by an earlier "
                              "run%s",
                              v.was_running && strcmp(s, "running")
                                  ? " and resumed the VM it left paused"
                                  : ""));
    return true;
}

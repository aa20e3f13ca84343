/* The memory capture's marker and guardian: see vmstate_int.h. */
#include "agent/vm/vmstate_int.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent/recover.h"
#include "agent/vm/qmp_sync.h"

bool
vmstate_marker_write(struct vmstate *v, GError **errp)
{
    json_auto_t *m =
        json_pack("{s:s, s:b, s:I}", "qmp", v->qmp_path, "was_running",
                  v->was_running, "max_bandwidth", v->old_bandwidth);
    g_autofree char *text = json_dumps(m, 0);
    size_t len = strlen(text);
    int fd =
        openat(v->repo->vm_fd, MARKER ".tmp",
               O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);

    if (fd < 0 || write(fd, text, len) != (ssize_t)len || fsync(fd) < 0 ||
        renameat(v->repo->vm_fd, MARKER ".tmp", v->repo->vm_fd, MARKER) < 0 ||
        fsync(v->repo->vm_fd) < 0) {
        int e = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(e), "%s: %s",
                    MARKER, g_strerror(e));
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    close(fd);
    v->marker = true;
    return true;
}

void
vmstate_marker_remove(int vm_fd)
{
    if (unlinkat(vm_fd, MARKER, 0) == 0) {
        fsync(vm_fd);
    }
}

/* ---- the guardian: a child that resumes the VM if qbak dies --------- */

static void
guard_undo(int fd, bool was_running, json_int_t bandwidth)
{
    json_t *r;
    const char *st;

    /* Never cancelled: QEMU 7.2 removes the write protection only when a
     * snapshot completes, a cancelled one leaves the guest hung.  QEMU
     * writes the (preallocated) file on its own: it completes. */
    for (int i = 0; i < WAIT_COMPLETE_S * 10; i++) {
        r = qmp_sync_call(fd, "query-migrate", NULL, 30000);
        st = json_string_value(
            json_object_get(json_object_get(r, "return"), "status"));
        bool busy = st && (!strcmp(st, "active") || !strcmp(st, "setup") ||
                           !strcmp(st, "cancelling") || !strcmp(st, "device"));
        json_decref(r);
        if (!r || !busy) {
            break;
        }
        usleep(100000);
    }
    r = qmp_sync_call(fd, "query-status", NULL, 30000);
    st = json_string_value(
        json_object_get(json_object_get(r, "return"), "status"));
    if (was_running && st && strcmp(st, "running") && strcmp(st, "prelaunch")) {
        json_decref(qmp_sync_call(fd, "cont", NULL, 30000));
    }
    json_decref(r);
    json_decref(qmp_sync_call(fd, "migrate-set-capabilities",
                              json_pack("{s:[{s:s, s:b}]}", "capabilities",
                                        "capability", "background-snapshot",
                                        "state", 0),
                              30000));
    if (bandwidth >= 0) {
        json_decref(qmp_sync_call(
            fd, "migrate-set-parameters",
            json_pack("{s:I}", "max-bandwidth", bandwidth), 30000));
    }
    json_decref(qmp_sync_call(fd, "closefd",
                              json_pack("{s:s}", "fdname", FDNAME), 30000));
}

/* The killed run's backup jobs, cancelled while the VM is still paused
 * (what the next run's recovery would do first), and its NBD nodes. */
static void
guard_cancel_jobs(int fd, const char *prefix)
{
    for (int i = 0; i < 600; i++) {
        json_auto_t *r = qmp_sync_call(fd, "query-jobs", NULL, 30000);
        json_t *jobs = json_object_get(r, "return");
        bool busy = false;
        size_t k;
        json_t *j;

        if (!json_is_array(jobs)) {
            return;
        }
        json_array_foreach(jobs, k, j)
        {
            const char *id = json_string_value(json_object_get(j, "id"));
            const char *st = json_string_value(json_object_get(j, "status"));
            if (!id || !st || !g_str_has_prefix(id, prefix)) {
                continue;
            }
            if (!strcmp(st, "concluded")) {
                json_decref(qmp_sync_call(fd, "job-dismiss",
                                          json_pack("{s:s}", "id", id), 30000));
                continue;
            }
            busy = true;
            if (strcmp(st, "aborting")) {
                json_decref(qmp_sync_call(fd, "job-cancel",
                                          json_pack("{s:s}", "id", id), 30000));
            }
        }
        if (!busy) {
            break;
        }
        usleep(100000);
    }
    json_auto_t *r = qmp_sync_call(fd, "query-named-block-nodes",
                                   json_pack("{s:b}", "flat", 1), 30000);
    size_t k;
    json_t *n;
    json_array_foreach(json_object_get(r, "return"), k, n)
    {
        const char *name = json_string_value(json_object_get(n, "node-name"));
        if (name && g_str_has_prefix(name, prefix)) {
            json_decref(qmp_sync_call(fd, "blockdev-del",
                                      json_pack("{s:s}", "node-name", name),
                                      30000));
        }
    }
}

G_GNUC_NORETURN static void
guardian_main(struct vmstate *v, int pipe_fd)
{
    char c;
    ssize_t n;
    int fd = -1;

    /* Not our parent's terminal's signals: only its death matters. */
    setsid();
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    do {
        n = read(pipe_fd, &c, 1);
    } while (n < 0 && errno == EINTR);
    if (n == 1) {
        _exit(0); /* dismissed: qbak cleaned up itself */
    }
    /* qbak died: its monitor connection closed with it, QEMU takes ours. */
    for (int i = 0; i < 300 && fd < 0; i++) {
        fd = qmp_sync_open(v->qmp_path, 30000);
        if (fd < 0) {
            usleep(100000);
        }
    }
    if (fd >= 0) {
        g_autofree char *prefix = recover_qemu_prefix(v->repo);
        guard_cancel_jobs(fd, prefix);
        guard_undo(fd, v->was_running, v->old_bandwidth);
        close(fd);
        vmstate_marker_remove(v->repo->vm_fd);
    }
    _exit(0);
}

bool
vmstate_guardian_start(struct vmstate *v, GError **errp)
{
    int p[2];
    pid_t pid;

    if (pipe2(p, O_CLOEXEC) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "pipe: %s", g_strerror(errno));
        return false;
    }
    pid = fork();
    if (pid < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "fork: %s", g_strerror(errno));
        close(p[0]);
        close(p[1]);
        return false;
    }
    if (pid == 0) {
        /* Keep only what the guardian uses: the pipe, the VM directory
         * (the marker) and the VM's lock, so the next run waits for the
         * guardian to finish. */
        for (int fd = 3; fd < 4096; fd++) {
            if (fd != p[0] && fd != v->repo->vm_fd &&
                (!getenv("XKEEP3") || fd != 3) && fd != v->repo->lock_fd) {
                close(fd);
            }
        }
        guardian_main(v, p[0]);
    }
    close(p[0]);
    v->guardian = pid;
    v->guardian_fd = p[1];
    return true;
}

void
vmstate_guardian_dismiss(struct vmstate *v)
{
    if (v->guardian_fd >= 0) {
        if (write(v->guardian_fd, "d", 1) < 0) {
            /* It died: nothing to dismiss. */
        }
        close(v->guardian_fd);
        v->guardian_fd = -1;
    }
    if (v->guardian > 0) {
        waitpid(v->guardian, NULL, 0);
        v->guardian = 0;
    }
}

/* ---- capture -------------------------------------------------------- */

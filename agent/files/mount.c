/* qbak mount and umount: one point as a read-only FUSE directory, served
 * by libguestfs's mount_local from a background process (as guestmount
 * does), which holds the VM's browse lock for as long as it serves: a
 * prune waits, backups go on.  Without allow_other only the user who
 * mounted can enter.  A pid file per mount point lets umount wait for the
 * server (and the appliance) to end. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/files/files.h"

static char *
pid_file_path(const char *real_mountpoint)
{
    g_autofree char *sum =
        g_compute_checksum_for_string(G_CHECKSUM_SHA256, real_mountpoint, -1);
    g_autofree char *dir =
        geteuid() == 0
            ? g_strdup("/run/qbak")
            : g_build_filename(g_get_user_runtime_dir(), "qbak", NULL);

    g_mkdir_with_parents(dir, 0700);
    sum[24] = 0;
    return g_strdup_printf("%s/mount-%s.pid", dir, sum);
}

static void
send_line(int fd, const char *line)
{
    size_t len = strlen(line), off = 0;
    while (off < len) {
        ssize_t n = write(fd, line + off, len - off);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        off += (size_t)n;
    }
}

/* The background server: reports "OK ..." or "ERR message" on fd, then
 * serves until unmounted. */
static G_GNUC_NORETURN void
serve(const struct files_opts *o, const char *mountpoint, bool allow_other,
      int fd)
{
    GPtrArray *fss = NULL;
    struct files_fs *fs = NULL;
    GError *err = NULL;
    struct files_session *s;
    g_autofree char *pidfile = pid_file_path(mountpoint);
    g_autofree char *line = NULL;
    /* ro twice: libguestfs refuses writes, and the kernel's mount says
     * read-only too (so tools and users see it as such). */
    struct guestfs_mount_local_argv a = {
        .bitmask = GUESTFS_MOUNT_LOCAL_READONLY_BITMASK |
                   GUESTFS_MOUNT_LOCAL_OPTIONS_BITMASK,
        .readonly = 1,
        .options = allow_other ? "ro,allow_other" : "ro",
    };
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);

    /* Detached: the caller's pipes close, its terminal is not ours. */
    setsid();
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_IGN);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
    }
    s = files_open_one(o, &fss, &fs, true, &err);
    if (s && guestfs_mount_local_argv(s->g, mountpoint, &a) < 0) {
        files_gerror(s, "mount_local", &err);
    }
    if (!s || err) {
        line = g_strdup_printf("ERR %s\n", err->message);
        send_line(fd, line);
        _exit(1);
    }
    line = g_strdup_printf("%d\n%s\n", (int)getpid(), mountpoint);
    g_file_set_contents(pidfile, line, -1, NULL);
    g_free(line);
    line = g_strdup_printf("OK %s\t%s\t%s\n",
                           ((struct restore_point *)s->sel->pdata[0])->id,
                           s->disk, fs->name);
    send_line(fd, line);
    close(fd);
    guestfs_mount_local_run(s->g);
    g_ptr_array_free(fss, true);
    files_session_free(s);
    unlink(pidfile);
    _exit(0);
}

json_t *
files_mount_point(const struct files_opts *o, const char *mountpoint,
                  bool allow_other, GError **errp)
{
    g_autofree char *real = NULL;
    g_autoptr(GString) reply = g_string_new(NULL);
    struct stat st;
    int p[2];
    pid_t pid;
    char buf[4096];
    ssize_t n;

    real = realpath(mountpoint, NULL);
    if (!real || stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: not a directory", mountpoint);
        return NULL;
    }
    if (pipe2(p, O_CLOEXEC) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "pipe: %s", g_strerror(errno));
        return NULL;
    }
    fflush(NULL);
    pid = fork();
    if (pid < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "fork: %s", g_strerror(errno));
        close(p[0]);
        close(p[1]);
        return NULL;
    }
    if (pid == 0) {
        close(p[0]);
        serve(o, real, allow_other, p[1]);
    }
    close(p[1]);
    while ((n = read(p[0], buf, sizeof(buf))) != 0) {
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            break;
        }
        g_string_append_len(reply, buf, n);
        if (strchr(reply->str, '\n')) {
            break;
        }
    }
    close(p[0]);
    if (!g_str_has_prefix(reply->str, "OK ")) {
        int status;
        waitpid(pid, &status, 0);
        g_strchomp(reply->str);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED, "%s",
                    g_str_has_prefix(reply->str, "ERR ")
                        ? reply->str + 4
                        : "the serving process ended before mounting");
        return NULL;
    }
    g_strchomp(reply->str);
    {
        g_auto(GStrv) f = g_strsplit(reply->str + 3, "\t", 3);
        if (g_strv_length(f) != 3) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                        "bad reply from the serving process");
            return NULL;
        }
        return json_pack("{s:s, s:s, s:s, s:s, s:i}", "point", f[0], "disk",
                         f[1], "fs", f[2], "mountpoint", real, "pid", (int)pid);
    }
}

static bool
run_fusermount(const char *mountpoint, GError **errp)
{
    static const char *const tools[] = {"fusermount3", "fusermount"};
    g_autofree char *out = NULL;

    for (size_t i = 0; i < G_N_ELEMENTS(tools); i++) {
        g_autofree char *path = g_find_program_in_path(tools[i]);
        const char *argv[] = {tools[i], "-u", mountpoint, NULL};
        gint status = 0;
        g_autofree char *err_text = NULL;

        if (!path) {
            continue;
        }
        argv[0] = path;
        if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL,
                          NULL, NULL, NULL, &err_text, &status, errp)) {
            return false;
        }
        if (g_spawn_check_wait_status(status, NULL)) {
            return true;
        }
        g_strchomp(err_text);
        g_set_error(errp, QBAK_ERROR,
                    strstr(err_text, "busy") ? QBAK_ERROR_BUSY
                                             : QBAK_ERROR_FAILED,
                    "%s", err_text);
        return false;
    }
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                "fusermount not found (install fuse3)");
    return false;
}

static bool
process_alive(pid_t pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/stat", (int)pid);
    g_autofree char *stat = NULL;
    char *close_paren;

    if (!g_file_get_contents(path, &stat, NULL, NULL)) {
        return false;
    }
    /* a zombie (our own child's) has ended its work */
    close_paren = strrchr(stat, ')');
    return close_paren && close_paren[1] == ' ' && close_paren[2] != 'Z';
}

json_t *
files_umount_point(const char *mountpoint, int wait_ms, GError **errp)
{
    g_autofree char *real = realpath(mountpoint, NULL);
    g_autofree char *pidfile = NULL;
    g_autofree char *text = NULL;
    pid_t pid = 0;
    gint64 deadline;

    if (!real) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND, "%s: %s",
                    mountpoint, g_strerror(errno));
        return NULL;
    }
    pidfile = pid_file_path(real);
    if (g_file_get_contents(pidfile, &text, NULL, NULL)) {
        g_auto(GStrv) lines = g_strsplit(text, "\n", 3);
        if (lines[0] && lines[1] && strcmp(lines[1], real) == 0) {
            pid = (pid_t)atoi(lines[0]);
        }
    }
    if (!run_fusermount(real, errp)) {
        g_prefix_error(errp, "%s: ", real);
        return NULL;
    }
    /* The server ends its appliance after the unmount; wait for it so
     * that the point's lock is free when we return. */
    deadline = g_get_monotonic_time() + (gint64)MAX(wait_ms, 120000) * 1000;
    while (pid > 0 && process_alive(pid)) {
        if (g_get_monotonic_time() > deadline) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                        "%s: unmounted, but the serving process %d has not "
                        "ended",
                        real, (int)pid);
            return NULL;
        }
        g_usleep(100 * 1000);
    }
    unlink(pidfile);
    return json_pack("{s:s, s:i}", "mountpoint", real, "pid", (int)pid);
}

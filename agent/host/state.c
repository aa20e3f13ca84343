/* Per-VM state that `run` and `status` share: see state.h. */
#include "agent/host/state.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/repo.h"

int64_t
host_parse_time(const char *iso)
{
    g_autoptr(GDateTime) t = NULL;

    if (!iso) {
        return -1;
    }
    t = g_date_time_new_from_iso8601(iso, NULL);
    return t ? g_date_time_to_unix(t) : -1;
}

bool
host_newest_point(const char *repo, const char *vm, char **point,
                  int64_t *time_s, unsigned *count, GError **errp)
{
    g_autofree char *dir = g_build_filename(repo, vm, NULL);
    struct repo_vm *r;
    GPtrArray *points;
    struct stat st;

    *point = NULL;
    *time_s = -1;
    *count = 0;
    if (stat(dir, &st) < 0 && errno == ENOENT) {
        return true;
    }
    /* No lock: a listing sees committed points only (the rename is the
     * commit), and must not wait for a running backup. */
    r = repo_vm_open(repo, vm, false, REPO_LOCK_NONE, 0, errp);
    if (!r) {
        return false;
    }
    points = repo_list_points(r, errp);
    repo_vm_close(r);
    if (!points) {
        return false;
    }
    *count = points->len;
    if (points->len) {
        struct restore_point *p = points->pdata[points->len - 1];

        *point = g_strdup(p->id);
        *time_s = host_parse_time(
            json_string_value(json_object_get(p->manifest, "time")));
    }
    g_ptr_array_free(points, true);
    return true;
}

json_t *
host_record_read(const char *repo, const char *vm)
{
    g_autofree char *dir = g_build_filename(repo, vm, NULL);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    json_t *j;

    if (fd < 0) {
        return NULL;
    }
    j = repo_read_json(fd, HOST_RECORD_NAME, NULL);
    close(fd);
    return j;
}

static bool
errno_error(GError **errp, const char *what, const char *path)
{
    int e = errno;

    g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(e), "%s: %s: %s",
                path, what, g_strerror(e));
    return false;
}

bool
host_record_write(const char *repo, const char *vm, json_t *rec, GError **errp)
{
    g_autofree char *dir = g_build_filename(repo, vm, NULL);
    g_autofree char *tmp =
        g_strdup_printf("%s.%d.tmp", HOST_RECORD_NAME, (int)getpid());
    g_autofree char *text =
        json_dumps(rec, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    size_t len = strlen(text);
    int dfd, fd;
    bool ok = false;

    if (!repo_name_valid(vm, "VM", errp)) {
        return false;
    }
    if (mkdir(repo, 0750) < 0 && errno != EEXIST) {
        return errno_error(errp, "mkdir", repo);
    }
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
        return errno_error(errp, "mkdir", dir);
    }
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        return errno_error(errp, "open", dir);
    }
    fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                0640);
    if (fd < 0) {
        errno_error(errp, "create", tmp);
        goto out;
    }
    if (write(fd, text, len) != (ssize_t)len || write(fd, "\n", 1) != 1) {
        errno_error(errp, "write", tmp);
    } else if (fsync(fd) < 0) {
        errno_error(errp, "fsync", tmp);
    } else if (renameat(dfd, tmp, dfd, HOST_RECORD_NAME) < 0) {
        errno_error(errp, "rename", tmp);
    } else if (fsync(dfd) < 0) {
        errno_error(errp, "fsync", dir);
    } else {
        ok = true;
    }
    close(fd);
    if (!ok) {
        unlinkat(dfd, tmp, 0);
    }
out:
    close(dfd);
    return ok;
}

static uint64_t du_total;

static int
du_add(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    if (flag == FTW_F || flag == FTW_D || flag == FTW_DP) {
        du_total += (uint64_t)st->st_blocks * 512;
    }
    return 0;
}

uint64_t
host_repo_bytes(const char *repo, const char *vm)
{
    g_autofree char *dir = g_build_filename(repo, vm, NULL);

    /* nftw's callback has no opaque pointer; qbak is single-threaded. */
    du_total = 0;
    nftw(dir, du_add, 16, FTW_PHYS);
    return du_total;
}

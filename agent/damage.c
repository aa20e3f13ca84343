/* Point markers: see damage.h. */
#include "agent/damage.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static bool
write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (n == 0) {
                errno = EIO;
            }
            return false;
        }
        buf += n;
        len -= (size_t)n;
    }
    return true;
}

bool
damage_mark(struct repo_vm *r, const char *point, const char *disk,
            int64_t offset, const char *reason, const char *found_by,
            GError **errp)
{
    g_autofree char *time = repo_time_now();
    g_autofree char *tmp = g_strdup_printf(".%s.%d", DAMAGE_NAME, getpid());
    json_t *j = json_pack("{s:s?, s:o, s:s, s:s, s:s}", "disk", disk, "offset",
                          offset >= 0 ? json_integer(offset) : json_null(),
                          "reason", reason, "found_by", found_by, "time", time);
    g_autofree char *text = json_dumps(j, JSON_INDENT(2));
    int dfd, fd = -1, err = 0;

    json_decref(j);
    dfd = openat(r->vm_fd, point,
                 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        err = errno;
        goto out;
    }
    unlinkat(dfd, tmp, 0); /* a crashed run's, under the same pid */
    fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                0640);
    if (fd < 0 || !write_all(fd, text, strlen(text)) ||
        !write_all(fd, "\n", 1) || fsync(fd) < 0 ||
        renameat(dfd, tmp, dfd, DAMAGE_NAME) < 0 || fsync(dfd) < 0) {
        err = errno;
        if (fd >= 0) {
            unlinkat(dfd, tmp, 0);
        }
    }
out:
    if (fd >= 0) {
        close(fd);
    }
    if (dfd >= 0) {
        close(dfd);
    }
    if (err) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s/%s/%s: %s", r->vm, point, DAMAGE_NAME, g_strerror(err));
        return false;
    }
    return true;
}

json_t *
damage_read(struct repo_vm *r, const char *point)
{
    g_autoptr(GError) err = NULL;
    json_t *j;
    int dfd = openat(r->vm_fd, point,
                     O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

    if (dfd < 0) {
        return NULL;
    }
    j = repo_read_json(dfd, DAMAGE_NAME, &err);
    close(dfd);
    if (!j && !g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
        j = json_pack("{s:n, s:n, s:s, s:n, s:n}", "disk", "offset", "reason",
                      "the damage marker itself is unreadable", "found_by",
                      "time");
    }
    return j;
}

bool
damage_point_protected(struct repo_vm *r, const char *point)
{
    g_autofree char *path = g_build_filename(point, PROTECTED_NAME, NULL);
    struct stat st;

    return fstatat(r->vm_fd, path, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

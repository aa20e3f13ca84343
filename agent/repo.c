/* Repository catalog: see repo.h. */
#include "agent/repo.h"

#include "agent/error.h"
#include "io/file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_MANIFEST_SIZE (4u << 20)
#define DIR_MODE 0750
#define FILE_MODE 0640

bool
repo_name_valid(const char *name, const char *what, GError **errp)
{
    size_t n = strlen(name);

    if (n == 0 || n > 128 || name[0] == '.' || name[0] == '-') {
        goto bad;
    }
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        if (!g_ascii_isalnum(ch) && ch != '_' && ch != '-' && ch != '.') {
            goto bad;
        }
    }
    return true;
bad:
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                "invalid %s name '%s' (letters, digits, '_', '-', '.'; not "
                "starting with '.' or '-')",
                what, name);
    return false;
}

/* A directory we keep data in must be ours (or root's) and not writable by
 * others: anyone who can write there can swap files under us. */
static bool
check_dir_safe(int fd, const char *path, GError **errp)
{
    struct stat st;

    if (fstat(fd, &st) < 0) {
        return qbak_errno(errp, errno, "%s", path);
    }
    if (!S_ISDIR(st.st_mode)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: not a directory", path);
        return false;
    }
    if ((st.st_mode & S_IWOTH) && !(st.st_mode & S_ISVTX)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: refusing a world-writable directory", path);
        return false;
    }
    if (st.st_uid != geteuid() && st.st_uid != 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: owned by uid %u, not by us", path,
                    (unsigned)st.st_uid);
        return false;
    }
    return true;
}

/* follow: the repository root is the user's choice and may be a symlink;
 * nothing inside it may be. */
static int
open_dir_at(int dirfd, const char *name, const char *path, bool create,
            bool follow, GError **errp)
{
    int fd;

    if (create && mkdirat(dirfd, name, DIR_MODE) < 0 && errno != EEXIST) {
        qbak_errno(errp, errno, "%s: mkdir", path);
        return -1;
    }
    fd = openat(dirfd, name,
                O_RDONLY | O_DIRECTORY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
    if (fd < 0) {
        if (errno == ELOOP || errno == ENOTDIR) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "%s: not a directory (a symlink is refused)", path);
        } else {
            qbak_errno(errp, errno, "%s", path);
        }
        return -1;
    }
    if (!check_dir_safe(fd, path, errp)) {
        close(fd);
        return -1;
    }
    return fd;
}

static char *
read_or_create_id(int vm_fd, GError **errp)
{
    char buf[64];
    ssize_t n;
    int fd;

    fd = openat(vm_fd, ".id", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        char id[17];
        g_snprintf(id, sizeof(id), "%08x%08x", g_random_int(), g_random_int());
        fd = openat(vm_fd, ".id.tmp",
                    O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                    FILE_MODE);
        if (fd < 0 || write(fd, id, 16) != 16 || fsync(fd) < 0 ||
            renameat(vm_fd, ".id.tmp", vm_fd, ".id") < 0) {
            qbak_errno(errp, errno, ".id");
            if (fd >= 0) {
                close(fd);
            }
            return NULL;
        }
        close(fd);
        fsync(vm_fd);
        return g_strdup(id);
    }
    if (fd < 0) {
        qbak_errno(errp, errno, ".id");
        return NULL;
    }
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n != 16) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    ".id: corrupt repository identity");
        return NULL;
    }
    buf[n] = 0;
    for (int i = 0; i < 16; i++) {
        if (!g_ascii_isxdigit(buf[i])) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        ".id: corrupt repository identity");
            return NULL;
        }
    }
    return g_strdup(buf);
}

/* Opens dir/name and flocks it (op: LOCK_SH or LOCK_EX), polling until
 * deadline (monotonic us) while another qbak holds a conflicting lock.
 * Returns the fd, or -1 with QBAK_ERROR_BUSY or a system error. */
static int
take_lock(int dirfd, const char *name, const char *vm_path, int op,
          gint64 deadline, GError **errp)
{
    int fd = openat(dirfd, name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
                    FILE_MODE);

    if (fd < 0) {
        qbak_errno(errp, errno, "%s/%s", vm_path, name);
        return -1;
    }
    while (flock(fd, op | LOCK_NB) < 0) {
        if (errno == EINTR) {
            continue;
        }
        if (errno != EWOULDBLOCK) {
            qbak_errno(errp, errno, "%s/%s", vm_path, name);
        } else if (g_get_monotonic_time() < deadline) {
            g_usleep(50 * 1000);
            continue;
        } else {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_BUSY,
                        "%s: busy: another qbak is working on this VM "
                        "(backup, prune, restore or a file-level reader "
                        "holds its lock); try again later",
                        vm_path);
        }
        close(fd);
        return -1;
    }
    return fd;
}

struct repo_vm *
repo_vm_open(const char *repo_path, const char *vm, bool create,
             enum repo_lock lock, int wait_ms, GError **errp)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)wait_ms * 1000;
    struct repo_vm *r;
    g_autofree char *vm_path = g_build_filename(repo_path, vm, NULL);

    if (!repo_name_valid(vm, "VM", errp)) {
        return NULL;
    }
    r = g_new0(struct repo_vm, 1);
    r->repo_fd = r->vm_fd = r->lock_fd = r->browse_fd = -1;
    r->repo_path = g_strdup(repo_path);
    r->vm = g_strdup(vm);
    if (create && mkdir(repo_path, DIR_MODE) < 0 && errno != EEXIST) {
        qbak_errno(errp, errno, "%s: mkdir", repo_path);
        goto fail;
    }
    r->repo_fd = open_dir_at(AT_FDCWD, repo_path, repo_path, false, true, errp);
    if (r->repo_fd < 0) {
        goto fail;
    }
    r->vm_fd = open_dir_at(r->repo_fd, vm, vm_path, create, false, errp);
    if (r->vm_fd < 0) {
        goto fail;
    }
    if (lock == REPO_LOCK_SHARED || lock == REPO_LOCK_EXCLUSIVE ||
        lock == REPO_LOCK_PRUNE) {
        r->lock_fd = take_lock(r->vm_fd, ".lock", vm_path,
                               lock == REPO_LOCK_SHARED ? LOCK_SH : LOCK_EX,
                               deadline, errp);
        if (r->lock_fd < 0) {
            goto fail;
        }
    }
    if (lock == REPO_LOCK_BROWSE || lock == REPO_LOCK_PRUNE) {
        r->browse_fd = take_lock(r->vm_fd, ".browse", vm_path,
                                 lock == REPO_LOCK_BROWSE ? LOCK_SH : LOCK_EX,
                                 deadline, errp);
        if (r->browse_fd < 0) {
            goto fail;
        }
    }
    if (create) {
        r->vm_id = read_or_create_id(r->vm_fd, errp);
        if (!r->vm_id) {
            g_prefix_error(errp, "%s/", vm_path);
            goto fail;
        }
    }
    return r;
fail:
    repo_vm_close(r);
    return NULL;
}

void
repo_vm_close(struct repo_vm *r)
{
    if (!r) {
        return;
    }
    if (r->lock_fd >= 0) {
        close(r->lock_fd);
    }
    if (r->browse_fd >= 0) {
        close(r->browse_fd);
    }
    if (r->vm_fd >= 0) {
        close(r->vm_fd);
    }
    if (r->repo_fd >= 0) {
        close(r->repo_fd);
    }
    g_free(r->repo_path);
    g_free(r->vm);
    g_free(r->vm_id);
    g_free(r);
}

json_t *
repo_read_json(int dirfd, const char *name, GError **errp)
{
    struct stat st;
    g_autofree char *buf = NULL;
    json_error_t jerr;
    json_t *j;
    ssize_t n;
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0) {
        qbak_errno(errp, errno, "%s", name);
        return NULL;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        st.st_size > MAX_MANIFEST_SIZE) {
        close(fd);
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: not a regular file of sane size", name);
        return NULL;
    }
    buf = g_malloc(st.st_size + 1);
    n = pread(fd, buf, st.st_size, 0);
    close(fd);
    if (n != st.st_size) {
        qbak_errno(errp, n < 0 ? errno : EIO, "%s: read", name);
        return NULL;
    }
    j = json_loadb(buf, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!j || !json_is_object(j)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s: %s", name,
                    j ? "not a JSON object" : jerr.text);
        json_decref(j);
        return NULL;
    }
    return j;
}

void
restore_point_free(struct restore_point *p)
{
    if (p) {
        g_free(p->id);
        json_decref(p->manifest);
        manifest_free(p->info);
        g_free(p->damage);
        g_free(p);
    }
}

json_t *
restore_point_disk(const struct restore_point *p, const char *disk)
{
    size_t i;
    json_t *d;

    json_array_foreach(json_object_get(p->manifest, "disks"), i, d)
    {
        if (g_strcmp0(json_string_value(json_object_get(d, "disk")), disk) ==
            0) {
            return d;
        }
    }
    return NULL;
}

static gint
point_cmp(gconstpointer a, gconstpointer b)
{
    const struct restore_point *pa = *(struct restore_point *const *)a;
    const struct restore_point *pb = *(struct restore_point *const *)b;
    return strcmp(pa->id, pb->id);
}

bool
repo_point_id_valid(const char *name)
{
    /* 20261124T221500Z-0001 */
    static const char form[] = "ddddddddTddddddZ-dddd";

    if (strlen(name) != sizeof(form) - 1) {
        return false;
    }
    for (size_t i = 0; form[i]; i++) {
        if (form[i] == 'd' ? !g_ascii_isdigit(name[i]) : name[i] != form[i]) {
            return false;
        }
    }
    return true;
}

static GPtrArray *
scan_points(struct repo_vm *r, bool damaged_too, GError **errp)
{
    GPtrArray *points =
        g_ptr_array_new_with_free_func((GDestroyNotify)restore_point_free);
    DIR *d = file_opendir(r->vm_fd);
    struct dirent *de;

    if (!d) {
        qbak_errno(errp, errno, "%s/%s", r->repo_path, r->vm);
        g_ptr_array_free(points, true);
        return NULL;
    }
    while ((de = readdir(d))) {
        g_autoptr(GError) err = NULL;
        struct manifest *m = NULL;
        struct restore_point *p;
        int pfd;

        /* .partial-*, .lock, .id and anything not named like a point */
        if (!repo_point_id_valid(de->d_name) ||
            (de->d_type != DT_DIR && de->d_type != DT_UNKNOWN)) {
            continue;
        }
        pfd = openat(r->vm_fd, de->d_name,
                     O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (pfd < 0) {
            continue;
        }
        if (faccessat(pfd, REPO_POINT_PRUNING, F_OK, AT_SYMLINK_NOFOLLOW) ==
            0) {
            close(pfd); /* being pruned: no longer a point */
            continue;
        }
        m = manifest_read(pfd, r->vm, de->d_name, &err);
        close(pfd);
        if (!m && !damaged_too) {
            continue;
        }
        p = g_new0(struct restore_point, 1);
        p->id = g_strdup(de->d_name);
        if (m) {
            p->info = m;
            p->manifest = json_incref(m->json);
        } else {
            p->damage = g_strdup(err->message);
        }
        g_ptr_array_add(points, p);
    }
    closedir(d);
    g_ptr_array_sort(points, point_cmp);
    return points;
}

GPtrArray *
repo_list_points(struct repo_vm *r, GError **errp)
{
    return scan_points(r, false, errp);
}

GPtrArray *
repo_scan_points(struct repo_vm *r, GError **errp)
{
    return scan_points(r, true, errp);
}

char *
repo_time_now(void)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();
    return g_date_time_format(now, "%Y-%m-%dT%H:%M:%SZ");
}

char *
repo_new_point_id(const char *last)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();
    g_autofree char *stamp = g_date_time_format(now, "%Y%m%dT%H%M%SZ");
    unsigned seq = 1;
    const char *dash = last ? strrchr(last, '-') : NULL;

    if (dash) {
        seq = (unsigned)strtoul(dash + 1, NULL, 10) + 1;
    }
    /* If the clock went back, keep ids sorting after the last one. */
    if (last && strncmp(stamp, last, strlen(stamp)) < 0) {
        g_free(stamp);
        stamp = g_strndup(last, dash ? (gsize)(dash - last) : strlen(last));
    }
    return g_strdup_printf("%s-%04u", stamp, seq % 10000);
}

int
repo_partial_create(struct repo_vm *r, const char *id, GError **errp)
{
    g_autofree char *name = g_strdup_printf(".partial-%s", id);
    int fd;

    if (mkdirat(r->vm_fd, name, DIR_MODE) < 0) {
        qbak_errno(errp, errno, "%s/%s/%s", r->repo_path, r->vm, name);
        return -1;
    }
    fd =
        openat(r->vm_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        qbak_errno(errp, errno, "%s/%s/%s", r->repo_path, r->vm, name);
    }
    return fd;
}

static void
remove_dir_at(int parent_fd, const char *name)
{
    int fd = openat(parent_fd, name,
                    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d;
    struct dirent *de;

    if (fd < 0) {
        unlinkat(parent_fd, name, 0);
        return;
    }
    d = fdopendir(fd);
    if (!d) {
        close(fd);
        return;
    }
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            unlinkat(fd, de->d_name, 0);
        }
    }
    closedir(d);
    unlinkat(parent_fd, name, AT_REMOVEDIR);
}

void
repo_partial_remove(struct repo_vm *r, const char *id)
{
    g_autofree char *name = g_strdup_printf(".partial-%s", id);
    remove_dir_at(r->vm_fd, name);
    fsync(r->vm_fd);
}

unsigned
repo_partial_cleanup(struct repo_vm *r)
{
    DIR *d = file_opendir(r->vm_fd);
    struct dirent *de;
    GPtrArray *names = g_ptr_array_new_with_free_func(g_free);
    unsigned n;

    if (!d) {
        g_ptr_array_free(names, true);
        return 0;
    }
    while ((de = readdir(d))) {
        if (g_str_has_prefix(de->d_name, ".partial-")) {
            g_ptr_array_add(names, g_strdup(de->d_name));
        }
    }
    closedir(d);
    for (guint i = 0; i < names->len; i++) {
        remove_dir_at(r->vm_fd, names->pdata[i]);
    }
    n = names->len;
    g_ptr_array_free(names, true);
    if (n) {
        fsync(r->vm_fd);
    }
    return n;
}

#define SYNC_BATCH 64
/* See repo.h. */
bool
repo_fsync_all(const int *fds, const char *const *names, guint n,
               const char *what, GError **errp)
{
    struct io_uring ring;
    int first_err = 0;
    const char *failed = NULL;

    if (n == 0) {
        return true;
    }
    if (n == 1 || io_uring_queue_init(SYNC_BATCH, &ring, 0) < 0) {
        /* One alone, or no io_uring here: one after the other. */
        for (guint i = 0; i < n && !failed; i++) {
            if (fsync(fds[i]) < 0) {
                first_err = errno;
                failed = names[i];
            }
        }
    } else {
        for (guint i = 0; i < n; i += SYNC_BATCH) {
            guint k = MIN(n - i, SYNC_BATCH), got = 0;
            for (guint j = 0; j < k; j++) {
                struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
                io_uring_prep_fsync(sqe, fds[i + j], 0);
                io_uring_sqe_set_data64(sqe, i + j);
            }
            io_uring_submit(&ring);
            while (got < k) {
                struct io_uring_cqe *cqe;
                int r = io_uring_wait_cqe(&ring, &cqe);
                if (r == -EINTR) {
                    continue;
                }
                if (r < 0) {
                    /* Cannot tell which finished: fail, nothing may
                     * count on them. */
                    first_err = first_err ? first_err : -r;
                    failed = failed ? failed : ".";
                    break;
                }
                if (cqe->res < 0 && !failed) {
                    first_err = -cqe->res;
                    failed = names[io_uring_cqe_get_data64(cqe)];
                }
                io_uring_cqe_seen(&ring, cqe);
                got++;
            }
            if (got < k) {
                break;
            }
        }
        io_uring_queue_exit(&ring);
    }
    if (failed) {
        return qbak_errno(errp, first_err, "%s/%s: fsync", what, failed);
    }
    return true;
}

/* fsync every regular file of dir_fd and dir_fd itself, all at once
 * (repo_fsync_all).  The first failure is the error; none is retried. */
static bool
sync_dir_files(int dir_fd, const char *what, GError **errp)
{
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GArray) fds = g_array_new(false, false, sizeof(int));
    struct dirent *de;
    DIR *d = file_opendir(dir_fd);
    bool ok = true;

    if (!d) {
        return qbak_errno(errp, errno, "%s: list", what);
    }
    /* [0]: the directory itself */
    g_ptr_array_add(names, g_strdup("."));
    while ((de = readdir(d))) {
        struct stat st;
        if (de->d_type != DT_REG &&
            (de->d_type != DT_UNKNOWN ||
             fstatat(dir_fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
             !S_ISREG(st.st_mode))) {
            continue;
        }
        g_ptr_array_add(names, g_strdup(de->d_name));
    }
    closedir(d);
    g_array_append_val(fds, dir_fd); /* [0]: the directory (borrowed) */
    for (guint i = 1; i < names->len; i++) {
        int fd =
            openat(dir_fd, names->pdata[i], O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            ok = qbak_errno(errp, err, "%s/%s: open", what,
                            (char *)names->pdata[i]);
            goto out;
        }
        g_array_append_val(fds, fd);
    }
    ok =
        repo_fsync_all((const int *)(void *)fds->data,
                       (const char *const *)names->pdata, fds->len, what, errp);
out:
    for (guint i = 1; i < fds->len; i++) {
        close(g_array_index(fds, int, i));
    }
    return ok;
}

bool
repo_commit_sync(struct repo_vm *r, int partial_fd, const char *id,
                 json_t *manifest, GError **errp)
{
    g_autofree char *text =
        json_dumps(manifest, JSON_INDENT(2) | JSON_SORT_KEYS);
    g_autofree char *partial = g_strdup_printf(".partial-%s", id);
    size_t len = strlen(text), off = 0;
    int fd =
        openat(partial_fd, MANIFEST_NAME,
               O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, FILE_MODE);

    if (fd < 0) {
        return qbak_errno(errp, errno, "%s: create", MANIFEST_NAME);
    }
    while (off < len) {
        ssize_t n = write(fd, text + off, len - off);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            close(fd);
            return qbak_errno(errp, err, "%s: write", MANIFEST_NAME);
        }
        off += (size_t)n;
    }
    if (write(fd, "\n", 1) != 1) {
        int err = errno;
        close(fd);
        return qbak_errno(errp, err, "%s: write", MANIFEST_NAME);
    }
    close(fd);
    return sync_dir_files(partial_fd, partial, errp);
}

bool
repo_commit_publish(struct repo_vm *r, const char *id, GError **errp)
{
    g_autofree char *partial = g_strdup_printf(".partial-%s", id);

    if (renameat(r->vm_fd, partial, r->vm_fd, id) < 0) {
        return qbak_errno(errp, errno, "%s: rename to %s", partial, id);
    }
    /* The rename is the commit only once the directory entry is durable. */
    if (fsync(r->vm_fd) < 0) {
        return qbak_errno(errp, errno, "%s/%s: fsync", r->repo_path, r->vm);
    }
    return true;
}

bool
repo_commit(struct repo_vm *r, int partial_fd, const char *id, json_t *manifest,
            GError **errp)
{
    return repo_commit_sync(r, partial_fd, id, manifest, errp) &&
           repo_commit_publish(r, id, errp);
}

/* See repo.h. */
uint64_t
repo_dir_bytes(int dirfd, const char *name)
{
    int fd =
        openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *de;
    uint64_t bytes = 0;

    if (!d) {
        if (fd >= 0) {
            close(fd);
        }
        return 0;
    }
    while ((de = readdir(d))) {
        struct stat st;

        if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            S_ISREG(st.st_mode)) {
            bytes += (uint64_t)st.st_blocks * 512;
        }
    }
    closedir(d);
    return bytes;
}

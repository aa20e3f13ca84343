/* The directory of a launch's throwaway overlays (see guestfs.h).
 *
 * It lives from the overlays' writing to the end of the appliance's
 * launch (11-15 s under TCG), so a qbak killed then leaves it behind.
 * Each holds an owner file locked (flock) for as long as the process
 * lives; the kernel drops the lock when the process dies, however it
 * dies, so the next qbak that makes one removes every such directory
 * whose lock it can take.  Only our own directories (our uid, the
 * name's pattern, no symlinks followed) and only the names we write
 * there are removed; anything else stays.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/files/guestfs.h"
#include "io/file.h"

#define PREFIX "qbak-files-"
#define OWNER ".owner"
/* A directory without an owner file is one being made right now (the
 * moment between mkdtemp and the owner file) or one from an older qbak:
 * removed once this old. */
#define UNOWNED_STALE_S 3600

/* Whether name is one of ours in a stale directory: the owner file, or
 * "overlay<N>.qcow2". */
static bool
our_file(const char *name)
{
    const char *p;

    if (strcmp(name, OWNER) == 0) {
        return true;
    }
    if (!g_str_has_prefix(name, "overlay")) {
        return false;
    }
    p = name + strlen("overlay");
    if (!g_ascii_isdigit(*p)) {
        return false;
    }
    while (g_ascii_isdigit(*p)) {
        p++;
    }
    return strcmp(p, ".qcow2") == 0;
}

/* Removes the stale directory name of tmpfd (held: dfd, locked owner or
 * none). */
static void
remove_stale(int tmpfd, const char *name, int dfd)
{
    DIR *d = file_opendir(dfd);
    struct dirent *e;

    if (!d) {
        return;
    }
    while ((e = readdir(d))) {
        if (our_file(e->d_name)) {
            unlinkat(dfd, e->d_name, 0);
        }
    }
    closedir(d);
    /* fails, harmlessly, if anything else is there */
    unlinkat(tmpfd, name, AT_REMOVEDIR);
}

/* One entry of the temporary directory: removed if it is ours and
 * stale. */
static void
sweep_one(int tmpfd, const char *name)
{
    struct stat st;
    int dfd, ofd;

    if (!g_str_has_prefix(name, PREFIX) || strlen(name) != strlen(PREFIX) + 6 ||
        fstatat(tmpfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
        !S_ISDIR(st.st_mode) || st.st_uid != geteuid()) {
        return;
    }
    dfd = openat(tmpfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        return;
    }
    ofd = openat(dfd, OWNER, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (ofd < 0) {
        if (errno == ENOENT && st.st_mtime + UNOWNED_STALE_S <
                                   g_get_real_time() / G_USEC_PER_SEC) {
            remove_stale(tmpfd, name, dfd);
        }
    } else if (flock(ofd, LOCK_EX | LOCK_NB) == 0) {
        /* its process is gone: nobody else can take the lock while we
         * hold it, so nobody else removes it at the same time */
        remove_stale(tmpfd, name, dfd);
    }
    if (ofd >= 0) {
        close(ofd);
    }
    close(dfd);
}

void
files_tmpdir_sweep(void)
{
    int tmpfd = open(g_get_tmp_dir(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d;
    struct dirent *e;

    if (tmpfd < 0) {
        return;
    }
    d = file_opendir(tmpfd);
    if (d) {
        while ((e = readdir(d))) {
            sweep_one(tmpfd, e->d_name);
        }
        closedir(d);
    }
    close(tmpfd);
}

char *
files_tmpdir_make(int *lock_fd, GError **errp)
{
    g_autofree char *dir = NULL;
    g_autofree char *owner = NULL;
    int fd;

    files_tmpdir_sweep();
    dir = g_dir_make_tmp(PREFIX "XXXXXX", errp);
    if (!dir) {
        return NULL;
    }
    owner = g_build_filename(dir, OWNER, NULL);
    fd = open(owner, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0 || flock(fd, LOCK_EX) < 0) {
        int e = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(e), "%s: %s",
                    owner, g_strerror(e));
        if (fd >= 0) {
            close(fd);
        }
        unlink(owner);
        rmdir(dir);
        return NULL;
    }
    *lock_fd = fd;
    return g_steal_pointer(&dir);
}

void
files_tmpdir_remove(const char *dir, int lock_fd)
{
    g_autofree char *owner = g_build_filename(dir, OWNER, NULL);

    /* unlinked while still locked: no sweeper can mistake it for stale */
    unlink(owner);
    rmdir(dir);
    close(lock_fd);
}

/* QEMU's image locks: see image_lock.h. */
#include "io/image_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>

/* QEMU's lock bytes: a held permission, a permission not shared. */
#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
/* Permission bits QEMU has used (its BLK_PERM_MAX has been 4 or 5):
 * probing a wider range costs nothing and outlives a new one. */
#define LOCK_PERM_BITS 64

#define PERM_CONSISTENT_READ 0
#define PERM_WRITE 1
#define PERM_WRITE_UNCHANGED 2
#define PERM_RESIZE 3

static bool
lock_fail(GError **errp, int err, const char *what)
{
    g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                "image lock (%s): %s", what, g_strerror(err));
    return false;
}

/* Whether another open file holds a lock on [start, start + len). */
static bool
probe(int fd, off_t start, off_t len, bool *held, GError **errp)
{
    struct flock fl = {
        .l_type = F_WRLCK,
        .l_whence = SEEK_SET,
        .l_start = start,
        .l_len = len,
    };

    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return lock_fail(errp, errno, "probe");
    }
    *held = fl.l_type != F_UNLCK;
    return true;
}

static bool
set(int fd, short type, off_t byte, GError **errp)
{
    struct flock fl = {
        .l_type = type,
        .l_whence = SEEK_SET,
        .l_start = byte,
        .l_len = 1,
    };

    if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
        return lock_fail(errp, errno, "set");
    }
    return true;
}

bool
image_lock_in_use(int fd, bool *in_use, GError **errp)
{
    bool perm, shared;

    if (!probe(fd, LOCK_PERM_BASE, LOCK_PERM_BITS, &perm, errp) ||
        !probe(fd, LOCK_SHARED_BASE, LOCK_PERM_BITS, &shared, errp)) {
        return false;
    }
    *in_use = perm || shared;
    return true;
}

bool
image_lock_writer(int fd, bool *busy, GError **errp)
{
    static const off_t held[] = {
        LOCK_PERM_BASE + PERM_CONSISTENT_READ,
        LOCK_PERM_BASE + PERM_WRITE,
        LOCK_SHARED_BASE + PERM_WRITE,
        LOCK_SHARED_BASE + PERM_RESIZE,
    };
    /* Others writing or resizing, or forbidding writes. */
    static const off_t conflicts[] = {
        LOCK_PERM_BASE + PERM_WRITE,
        LOCK_PERM_BASE + PERM_WRITE_UNCHANGED,
        LOCK_PERM_BASE + PERM_RESIZE,
        LOCK_SHARED_BASE + PERM_WRITE,
    };

    bool ok = true;

    *busy = false;
    /* Held first, then probed, as QEMU does: of two openers racing, at
     * least one sees the other. */
    for (size_t i = 0; ok && i < G_N_ELEMENTS(held); i++) {
        ok = set(fd, F_RDLCK, held[i], errp);
    }
    for (size_t i = 0; ok && !*busy && i < G_N_ELEMENTS(conflicts); i++) {
        ok = probe(fd, conflicts[i], 1, busy, errp);
    }
    if (ok && !*busy) {
        return true;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(held); i++) {
        struct flock fl = {.l_type = F_UNLCK,
                           .l_whence = SEEK_SET,
                           .l_start = held[i],
                           .l_len = 1};
        fcntl(fd, F_OFD_SETLK, &fl);
    }
    return ok;
}

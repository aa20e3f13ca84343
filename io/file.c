/* Small file helpers: see file.h. */
#include "io/file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int
file_reopen_direct(int fd, int access_mode)
{
    char path[32];

    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return open(path, access_mode | O_DIRECT | O_CLOEXEC);
}

/* See file.h. */
DIR *
file_opendir(int fd)
{
    int dfd = dup(fd);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;

    if (!d) {
        int err = errno;
        if (dfd >= 0) {
            close(dfd);
        }
        errno = err;
        return NULL;
    }
    /* A duplicate shares fd's offset: an earlier reader may have moved it. */
    rewinddir(d);
    return d;
}

/* Small file helpers shared by io/ and agent/. */
#ifndef QBAK_IO_FILE_H
#define QBAK_IO_FILE_H

#include <dirent.h>
#include <stdbool.h>
#include <stdint.h>

/* Alignment of buffer address, file offset and length that qbak asks of
 * O_DIRECT I/O: the largest logical block size in common use, so it holds
 * on 512-byte and 4 KiB devices alike. */
#define FILE_DIRECT_ALIGN 4096u

/* fd's file opened once more, with O_DIRECT and access_mode (O_RDONLY or
 * O_WRONLY), through /proc/self/fd: the same inode, whatever happened to
 * its name since.  -1 when the file system refuses O_DIRECT (or /proc is
 * missing, or no fd is left): the caller then keeps to fd. */
int file_reopen_direct(int fd, int access_mode);

/* The entries of directory fd from the start, read through a duplicate
 * of fd (closedir() leaves fd open); NULL with errno set. */
DIR *file_opendir(int fd);

/* direct_fd (or -1) when buf, off and len suit O_DIRECT, else fd. */
static inline int
file_pick_fd(int fd, int direct_fd, const void *buf, uint64_t off, uint64_t len)
{
    bool aligned =
        (((uintptr_t)buf | off | len) & (FILE_DIRECT_ALIGN - 1)) == 0;

    return direct_fd >= 0 && aligned ? direct_fd : fd;
}

#endif

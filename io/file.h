/* Small file helpers shared by io/ and agent/. */
#ifndef QBAK_IO_FILE_H
#define QBAK_IO_FILE_H

#include <stdbool.h>
#include <stdint.h>

/* Alignment of buffer address, file offset and length that qbak asks of
 * O_DIRECT I/O: the largest logical block size in common use, so it holds
 * on 512-byte and 4 KiB devices alike. */
#define FILE_DIRECT_ALIGN 4096u

/* fd's file opened once more, with O_DIRECT and access_mode (O_RDONLY or
 * O_WRONLY), through /proc/self/fd: the same inode, whatever happened to
 * its name since.  -errno when the file system refuses O_DIRECT (or /proc
 * is missing): the caller then keeps to fd. */
int file_reopen_direct(int fd, int access_mode);

/* buf, off and len suit O_DIRECT (FILE_DIRECT_ALIGN). */
static inline bool
file_direct_aligned(const void *buf, uint64_t off, uint64_t len)
{
    return (((uintptr_t)buf | off | len) & (FILE_DIRECT_ALIGN - 1)) == 0;
}

#endif

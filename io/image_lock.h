/* QEMU's image locks, seen from outside QEMU.
 *
 * QEMU (and qemu-img, qemu-nbd, qemu-storage-daemon) lock the image files
 * they open with OFD byte-range read locks: byte 100 + p for each
 * permission p the user holds (0 consistent read, 1 write, 2 write
 * unchanged, 3 resize) and byte 200 + p for each it will not share.  A
 * running QEMU reading a file as a backing file holds 100, 201 and 203.
 * qbak takes the same locks where it writes an image other programs may
 * open (prune's merges), so that a QEMU and qbak exclude each other the
 * way two QEMUs do, and checks for them before it removes an image. */
#ifndef QBAK_IO_IMAGE_LOCK_H
#define QBAK_IO_IMAGE_LOCK_H

#include <glib.h>
#include <stdbool.h>

/* *in_use: another open file of fd's image holds any of QEMU's locks. */
bool image_lock_in_use(int fd, bool *in_use, GError **errp);

/* Takes the locks of a writer that lets others read but not write, as
 * qemu-img does on an image it changes; *busy (and no locks kept) when
 * another holder forbids writing or writes itself.  The locks go with
 * fd's open file (close releases them). */
bool image_lock_writer(int fd, bool *busy, GError **errp);

#endif

/* A backup target: the NBD export QEMU pushes one disk to, written as one
 * qcow2 layer in the partial point directory through io_uring. */
#ifndef QBAK_AGENT_TARGET_H
#define QBAK_AGENT_TARGET_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "io/nbd.h"
#include "io/qcow2.h"
#include "io/ring.h"

struct backup_target;

/* Creates `file` in dir_fd (O_EXCL) and serves it over a new socketpair:
 * *client_fd is the other end, for the NBD client (QEMU), and the caller's
 * to close once it has handed it on.  client_fd NULL: no server (pull
 * mode, below).
 * backing_file/backing: see qcow2_writer_new (backing borrowed). */
struct backup_target *backup_target_new(struct ring *ring, int dir_fd,
                                        const char *file, const char *disk,
                                        uint64_t size, unsigned cluster_bits,
                                        const char *backing_file,
                                        struct qcow2_reader *backing,
                                        int *client_fd, GError **errp);
/* Stops serving, waits for in-flight I/O, closes the file. */
void backup_target_free(struct backup_target *t);

/* From now on, if a write stays in flight longer than limit_us,
 * answer every request still held (guest writes wait on them through
 * copy-before-write), fail the target, and do no more I/O.  Checked four
 * times a second off the ring, whatever else qbak is waiting for. */
void backup_target_set_watchdog(struct backup_target *t, gint64 limit_us);

/* The first error of the data path (NBD protocol, write, fsync), or NULL. */
const char *backup_target_error(struct backup_target *t);
/* The NBD client has sent its first bytes. */
bool backup_target_connected(const struct backup_target *t);
/* The NBD client has gone and all I/O has completed. */
bool backup_target_finished(const struct backup_target *t);

/* Complete the qcow2 file, then write its checksum file (<file>.sums,
 * io/qcow2_sums.h) beside it; neither is fsynced here: the point's commit
 * (repo_commit_sync) fsyncs them with the rest of the point.  Fails if any
 * earlier write failed. */
bool backup_target_commit(struct backup_target *t, GError **errp);

/* Pull mode (client_fd NULL in backup_target_new): no NBD server; the
 * caller maps its data through the layer's writer, writes the extents to
 * the file itself, and reports each completed write with
 * backup_target_wrote() (write-back and page-cache recycling as above). */
struct qcow2_writer *backup_target_writer(struct backup_target *t);
int backup_target_fd(const struct backup_target *t);
void backup_target_wrote(struct backup_target *t, uint64_t host_off,
                         size_t len);
/* Fail the target (the first message is kept), as a failed write would. */
void backup_target_fail(struct backup_target *t, const char *msg);

uint64_t backup_target_file_size(const struct backup_target *t);
uint64_t backup_target_data_bytes(const struct backup_target *t);

#endif

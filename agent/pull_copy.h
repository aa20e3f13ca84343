/* Pull mode's data path: one disk's point in time, read from QEMU's NBD
 * export with libnbd and written as one qcow2 layer through io_uring.
 *
 * Block status walks the disk ahead of the reads (base:allocation, and the
 * chain's dirty bitmap for an incremental): zero ranges become zero
 * clusters (an incremental) or nothing (a full), ranges an incremental
 * need not carry are skipped, and the rest is read in large requests, many
 * in flight, rounded out to whole clusters so that the layer's writer maps
 * each read to one or a few extents written straight from the read
 * buffer.
 */
#ifndef QBAK_AGENT_PULL_COPY_H
#define QBAK_AGENT_PULL_COPY_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent/target.h"
#include "io/nbd_client.h"
#include "io/ring.h"

struct pull_copy;

/* bitmap_context: the NBD meta context of the dirty bitmap, for an
 * incremental; NULL for a full (everything that is not zero is read).
 * c and t are borrowed. */
struct pull_copy *pull_copy_new(struct ring *ring, struct nbd_client *c,
                                struct backup_target *t, uint64_t size,
                                unsigned cluster_bits,
                                const char *bitmap_context, gint64 stall_us);
/* Waits for its I/O in flight, then frees. */
void pull_copy_free(struct pull_copy *pc);

/* Issue what can be issued now; call after every ring_run_once(). */
void pull_copy_step(struct pull_copy *pc);
/* --speed: at most bytes_per_s of reads a second (0: no limit). */
void pull_copy_set_speed(struct pull_copy *pc, uint64_t bytes_per_s);
/* How long until the pace lets the next read go (0: now); the caller's
 * loop waits at most that long before the next pull_copy_step(). */
int pull_copy_wait_ms(const struct pull_copy *pc);
/* Everything copied (false after an error). */
bool pull_copy_done(const struct pull_copy *pc);
/* The first error, or NULL. */
const char *pull_copy_error(const struct pull_copy *pc);

uint64_t pull_copy_bytes_read(const struct pull_copy *pc);
/* Progress as QEMU's backup jobs report it in push mode: the bytes read
 * of those to read (a full's data, an incremental's dirty clusters).
 * pull_copy_count() makes the total exact early, with a second walk of
 * block status ahead of the copy; without it the total is known only as
 * the copy's own walk goes.  pull_copy_progress() is false while the
 * count has had no answer yet (the total is still the disk's size). */
void pull_copy_count(struct pull_copy *pc);
bool pull_copy_progress(const struct pull_copy *pc, uint64_t *done,
                        uint64_t *total);

#endif

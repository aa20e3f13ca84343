/* One thread, one io_uring: sockets and file I/O complete on the same ring.
 *
 * Every in-flight operation embeds a struct ring_op; user_data points at it
 * and op->done_fn runs when its completion is reaped.  The caller keeps the
 * op and any buffer alive until done_fn has run.
 *
 * Errors follow liburing: -errno in return values and in res, never errno.
 */
#ifndef QBAK_IO_RING_H
#define QBAK_IO_RING_H

#include <liburing.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef container_of
#define container_of(ptr, type, member)                                        \
    ((type *)((char *)(ptr)-offsetof(type, member)))
#endif

struct ring_op;
typedef void (*ring_done_fn)(struct ring_op *op, int res);

struct ring_op {
    ring_done_fn done_fn;
};

struct ring {
    struct io_uring uring;
    unsigned inflight; /* ops submitted whose completion is not reaped */
};

int ring_init(struct ring *r, unsigned entries);
void ring_fini(struct ring *r);

/* A free SQE; when the submission queue is full, pending SQEs are submitted
 * first, so this never returns NULL. */
struct io_uring_sqe *ring_get_sqe(struct ring *r);
/* Tie a prepared SQE to op (counts it in flight). */
void ring_queue(struct ring *r, struct io_uring_sqe *sqe, struct ring_op *op);

/* Submit what is queued, wait up to timeout_ms (-1: forever) for at least
 * one completion and run the done_fn of every completion available.
 * Returns the number of completions run, 0 on timeout, or -errno. */
int ring_run_once(struct ring *r, int timeout_ms);

/* Run until every op in flight has completed (shutdown, error paths). */
void ring_drain(struct ring *r);

/* A write or read of a whole range: short transfers are continued and
 * -EAGAIN/-EINTR resubmitted; done_fn gets 0 or -errno once. */
struct ring_rw {
    struct ring_op op;
    void (*done_fn)(struct ring_rw *rw, int err);
    struct ring *ring;
    int fd;
    bool is_write;
    uint8_t *buf;
    size_t len;
    size_t done;
    uint64_t off;
    void *opaque;                   /* the caller's */
    struct __kernel_timespec delay; /* test only: a stalled write */
};

void ring_rw_start(struct ring *r, struct ring_rw *rw, int fd, bool is_write,
                   void *buf, size_t len, uint64_t off);

/* Fault injection for tests (an io_uring shim that fails the Nth
 * operation): QBAK_FAULT_FILE_WRITE=N[:err] makes the Nth file
 * write completion fail with -err (err: EIO (default), ENOSPC or a number),
 * or be short when err is "short".  QBAK_FAULT_FSYNC=N[:err] does the same
 * to the Nth data fsync, through ring_fault_fsync().  QBAK_FAULT_STALL_WRITE
 * =N[:secs] holds every file write from the Nth on back secs seconds
 * (default 10), as a stalled repository would.  Unset in normal runs; read once
 * at ring_init(). */

/* 0, or the -errno the current data fsync must fail with (test only). */
int ring_fault_fsync(void);

#endif

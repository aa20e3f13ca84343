/* io_uring loop: see ring.h. */
#include "io/ring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Test-only fault injection (see ring.h): fail the Nth operation. */
struct fault {
    long nth;
    long count;
    int err; /* 0: a short transfer */
};

static struct fault fault_write, fault_fsync, fault_stall;

static void
fault_parse(struct fault *f, const char *var)
{
    const char *s = getenv(var);
    char *end;

    memset(f, 0, sizeof(*f));
    if (!s || !*s) {
        return;
    }
    f->nth = strtol(s, &end, 10);
    f->err = EIO;
    if (*end == ':') {
        if (strcmp(end + 1, "short") == 0) {
            f->err = 0;
        } else if (strcmp(end + 1, "ENOSPC") == 0) {
            f->err = ENOSPC;
        } else if (strcmp(end + 1, "EIO") != 0) {
            f->err = atoi(end + 1);
        }
    }
}

static bool
fault_hit(struct fault *f)
{
    return f->nth > 0 && ++f->count == f->nth;
}

static void
fault_init(void)
{
    fault_parse(&fault_write, "QBAK_FAULT_FILE_WRITE");
    fault_parse(&fault_fsync, "QBAK_FAULT_FSYNC");
    fault_parse(&fault_stall, "QBAK_FAULT_STALL_WRITE");
    if (fault_stall.nth && fault_stall.err == EIO) {
        fault_stall.err = 10; /* here: seconds, default 10 */
    }
}

int
ring_fault_fsync(void)
{
    return fault_hit(&fault_fsync) ? -(fault_fsync.err ? fault_fsync.err : EIO)
                                   : 0;
}

int
ring_init(struct ring *r, unsigned entries)
{
    struct io_uring_params p;

    memset(r, 0, sizeof(*r));
    memset(&p, 0, sizeof(p));
    fault_init();
    return io_uring_queue_init_params(entries, &r->uring, &p);
}

void
ring_fini(struct ring *r)
{
    ring_drain(r);
    io_uring_queue_exit(&r->uring);
}

struct io_uring_sqe *
ring_get_sqe(struct ring *r)
{
    struct io_uring_sqe *sqe;

    while (!(sqe = io_uring_get_sqe(&r->uring))) {
        /* The kernel copies SQEs at submit time: submitting frees slots. */
        io_uring_submit(&r->uring);
    }
    return sqe;
}

void
ring_queue(struct ring *r, struct io_uring_sqe *sqe, struct ring_op *op)
{
    io_uring_sqe_set_data(sqe, op);
    r->inflight++;
}

int
ring_run_once(struct ring *r, int timeout_ms)
{
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    unsigned head, n = 0;
    int ret;

    if (timeout_ms < 0) {
        ret = io_uring_submit_and_wait(&r->uring, 1);
        if (ret >= 0) {
            ret = 0;
        }
    } else {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long long)(timeout_ms % 1000) * 1000000;
        ret = io_uring_submit_and_wait_timeout(&r->uring, &cqe, 1, &ts, NULL);
    }
    if (ret < 0 && ret != -ETIME && ret != -EINTR) {
        return ret;
    }
    io_uring_for_each_cqe(&r->uring, head, cqe)
    {
        struct ring_op *op = io_uring_cqe_get_data(cqe);
        int res = cqe->res;

        io_uring_cq_advance(&r->uring, 1);
        if (!op) {
            continue; /* a cancel request nobody waits for */
        }
        n++;
        r->inflight--;
        op->done_fn(op, res);
        /* done_fn may have queued more work; the CQ head moved under us is
         * fine: io_uring_for_each_cqe re-reads the tail each step. */
    }
    return (int)n;
}

void
ring_drain(struct ring *r)
{
    while (r->inflight > 0) {
        if (ring_run_once(r, -1) < 0) {
            break;
        }
    }
}

static void ring_rw_submit(struct ring_rw *rw);

static void
ring_rw_done(struct ring_op *op, int res)
{
    struct ring_rw *rw = (struct ring_rw *)op;

    if (rw->is_write && res > 0 && fault_hit(&fault_write)) {
        if (fault_write.err == 0 && res > 1) {
            res /= 2; /* a short write: must be continued, not lost */
        } else if (fault_write.err) {
            res = -fault_write.err;
        }
    }
    if (res == -EAGAIN || res == -EINTR) {
        ring_rw_submit(rw);
        return;
    }
    if (res < 0) {
        rw->done_fn(rw, res);
        return;
    }
    if (res == 0) {
        /* A write that makes no progress, or a read at EOF. */
        rw->done_fn(rw, rw->is_write ? -EIO : -ENODATA);
        return;
    }
    rw->done += (size_t)res;
    if (rw->done < rw->len) {
        ring_rw_submit(rw);
        return;
    }
    rw->done_fn(rw, 0);
}

static void
ring_rw_submit(struct ring_rw *rw)
{
    struct io_uring_sqe *sqe = ring_get_sqe(rw->ring);

    if (rw->is_write) {
        io_uring_prep_write(sqe, rw->fd, rw->buf + rw->done,
                            (unsigned)(rw->len - rw->done), rw->off + rw->done);
    } else {
        io_uring_prep_read(sqe, rw->fd, rw->buf + rw->done,
                           (unsigned)(rw->len - rw->done), rw->off + rw->done);
    }
    ring_queue(rw->ring, sqe, &rw->op);
}

static void
ring_rw_delay_done(struct ring_op *op, int res)
{
    struct ring_rw *rw = (struct ring_rw *)op;

    (void)res; /* -ETIME: the delay is over */
    rw->op.done_fn = ring_rw_done;
    ring_rw_submit(rw);
}

void
ring_rw_start(struct ring *r, struct ring_rw *rw, int fd, bool is_write,
              void *buf, size_t len, uint64_t off)
{
    rw->op.done_fn = ring_rw_done;
    rw->ring = r;
    rw->fd = fd;
    rw->is_write = is_write;
    rw->buf = buf;
    rw->len = len;
    rw->done = 0;
    rw->off = off;
    /* A stalled disk stalls every write from the Nth on. */
    if (is_write && fault_stall.nth > 0 &&
        ++fault_stall.count >= fault_stall.nth) {
        struct io_uring_sqe *sqe = ring_get_sqe(r);

        rw->delay.tv_sec = fault_stall.err;
        rw->delay.tv_nsec = 0;
        rw->op.done_fn = ring_rw_delay_done;
        io_uring_prep_timeout(sqe, &rw->delay, 0, 0);
        ring_queue(r, sqe, &rw->op);
        return;
    }
    ring_rw_submit(rw);
}

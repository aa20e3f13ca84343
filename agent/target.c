/* NBD backend writing one qcow2 layer: see target.h. */
#include "agent/target.h"

#include "io/qcow2_sums.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define NBD_SLOTS 16
#define NBD_MAX_BLOCK (1u << 20)
/* Start writeback after this many bytes (small enough that a 1 %
 * incremental benefits too), so the fsync at commit finds the data mostly
 * on disk already: the transfer and the disk overlap. */
#define WRITEBACK_BYTES (8u << 20)
/* Data this far behind the newest write has been written back (write-back
 * starts every WRITEBACK_BYTES) and is dropped from the page cache, at
 * least RECYCLE_BYTES at a time; each range is offered twice, since pages
 * still under write-back stay.  The kernel then hands those pages out again
 * for the next writes: fresh page-cache pages cost more to fill than the
 * copy itself on many hosts (the benchmark's full: about a tenth to a
 * quarter faster, a third less CPU in qbak and QEMU), and a backup no
 * longer pushes the host's other cached data out.  Dropping only ever
 * drops clean pages and takes no write-back error from the fsync at
 * commit. */
#define RECYCLE_LAG (32u << 20)
#define RECYCLE_BYTES (8u << 20)
/* Send buffer of QEMU's end of the socket.  The kernel's default (about 208
 * KiB) holds three 64 KiB requests: QEMU then blocks on the socket with
 * most of its 16 request slots idle, and both sides wake each other for
 * every request or two.  With room for all 16 in flight, qbak finds
 * several requests waiting at each wake-up (a 10 % incremental of the
 * benchmark's disk: 0.72 s instead of 0.87 s, with less CPU on both
 * sides).  The kernel doubles the value. */
#define CLIENT_SNDBUF (2 << 20)

/* Per request slot: the extent writes of one NBD WRITE. */
struct target_req {
    struct backup_target *t;
    struct nbd_request *req;
    struct ring_rw *rw;
    struct qcow2_extent *ext;
    size_t max_ext;
    unsigned pending;
    bool writing;      /* extent writes in flight */
    gint64 started_us; /* when its I/O was submitted, for the watchdog */
};

struct backup_target {
    struct ring *ring;
    int fd;
    int dir_fd; /* the partial point directory, borrowed */
    char *file;
    char *disk;
    struct qcow2_writer *writer;
    struct nbd_export exp;
    struct nbd_backend backend;
    struct nbd_server *server;
    struct target_req reqs[NBD_SLOTS];
    unsigned writes_inflight;
    uint64_t dirty_bytes; /* written since writeback was last started */
    struct ring_op writeback_op;
    bool writeback_pending;
    uint64_t written_end;  /* end of the furthest data write completed */
    uint64_t recycled_end; /* [0, recycled_end) was offered for dropping */
    struct ring_op recycle_op;
    bool recycle_pending;
    bool abandoned;  /* the repository stalled: requests answered, no I/O */
    gint64 stall_us; /* watchdog limit, 0: off */
    struct ring_op tick_op;
    struct __kernel_timespec tick_ts;
    bool tick_pending;
    bool closing;
    long requests;
    long drop_at; /* test only: QBAK_FAULT_NBD_DROP=N */
    char *error;
};

static void
target_fail(struct backup_target *t, const char *what, int err)
{
    if (!t->error) {
        t->error =
            g_strdup_printf("%s: %s: %s", t->disk, what, g_strerror(err));
    }
}

static void tick_done(struct ring_op *op, int res);

/* Reply to the request of tr, once.  After the watchdog has answered for
 * it, tr->req is NULL and late completions reply nothing. */
static void
req_complete(struct target_req *tr, uint32_t err)
{
    struct nbd_request *req = tr->req;

    if (!req) {
        return;
    }
    tr->req = NULL;
    nbd_conn_request_done(req, err);
}

static void
writeback_done(struct ring_op *op, int res)
{
    struct backup_target *t =
        container_of(op, struct backup_target, writeback_op);

    /* Only a hint: durability comes from the fsync at commit, which also
     * reports any write-back error. */
    (void)res;
    t->writeback_pending = false;
}

static void
start_writeback(struct backup_target *t)
{
    struct io_uring_sqe *sqe;

    if (t->dirty_bytes < WRITEBACK_BYTES || t->writeback_pending) {
        return;
    }
    t->dirty_bytes = 0;
    t->writeback_pending = true;
    sqe = ring_get_sqe(t->ring);
    io_uring_prep_sync_file_range(sqe, t->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    ring_queue(t->ring, sqe, &t->writeback_op);
}

static void
recycle_done(struct ring_op *op, int res)
{
    struct backup_target *t =
        container_of(op, struct backup_target, recycle_op);

    (void)res; /* a hint: pages still dirty or busy just stay */
    t->recycle_pending = false;
}

static void
start_recycle(struct backup_target *t)
{
    struct io_uring_sqe *sqe;
    uint64_t end, start;

    if (t->recycle_pending || t->written_end < RECYCLE_LAG) {
        return;
    }
    end = t->written_end - RECYCLE_LAG;
    if (end < t->recycled_end + RECYCLE_BYTES) {
        return;
    }
    start = t->recycled_end > RECYCLE_LAG ? t->recycled_end - RECYCLE_LAG : 0;
    t->recycled_end = end;
    t->recycle_pending = true;
    sqe = ring_get_sqe(t->ring);
    io_uring_prep_fadvise(sqe, t->fd, start, (off_t)(end - start),
                          POSIX_FADV_DONTNEED);
    ring_queue(t->ring, sqe, &t->recycle_op);
}

static void
extent_done(struct ring_rw *rw, int err)
{
    struct target_req *tr = rw->opaque;
    struct backup_target *t = tr->t;

    if (err < 0) {
        /* QEMU is told the write succeeded: an error would reach the
         * guest through copy-before-write (and ENOSPC would pause the
         * VM).  The backup is failed instead, and never committed. */
        target_fail(t, "write", -err);
    }
    t->dirty_bytes += rw->len;
    start_writeback(t);
    t->written_end = MAX(t->written_end, rw->off + rw->len);
    start_recycle(t);
    if (--tr->pending > 0) {
        return;
    }
    t->writes_inflight--;
    tr->writing = false;
    req_complete(tr, 0); /* nothing if the watchdog answered already */
}

/* All-zero payloads become zero clusters instead of data: QEMU copies a
 * cluster written with zero bytes as data. */
static bool
is_zero(const uint8_t *p, size_t len)
{
    static const uint8_t zero[16];

    if (len < sizeof(zero)) {
        return memcmp(p, zero, len) == 0;
    }
    /* The first 16 bytes are zero, and every byte equals the one 16 before
     * it: one pass, no zero buffer of len bytes. */
    return memcmp(p, zero, sizeof(zero)) == 0 &&
           memcmp(p, p + sizeof(zero), len - sizeof(zero)) == 0;
}

static void
handle_write(struct backup_target *t, struct target_req *tr)
{
    struct nbd_request *req = tr->req;
    g_autoptr(GError) err = NULL;
    size_t n = 0;

    if (is_zero(req->buf, req->len)) {
        if (!qcow2_writer_zero(t->writer, req->offset, req->len, &err) &&
            !t->error) {
            t->error = g_strdup_printf("%s: %s", t->disk, err->message);
        }
        req_complete(tr, 0);
        return;
    }
    if (!qcow2_writer_write(t->writer, req->offset, req->buf, req->len, tr->ext,
                            &n, &err)) {
        if (!t->error) {
            t->error = g_strdup_printf("%s: %s", t->disk, err->message);
        }
        req_complete(tr, 0);
        return;
    }
    if (n == 0) {
        /* All of it went into partial clusters held by the writer. */
        req_complete(tr, 0);
        return;
    }
    tr->pending = (unsigned)n;
    tr->writing = true;
    tr->started_us = g_get_monotonic_time();
    t->writes_inflight++;
    for (size_t i = 0; i < n; i++) {
        uint8_t *buf = (uint8_t *)req->buf + tr->ext[i].buf_offset;
        tr->rw[i].done_fn = extent_done;
        tr->rw[i].opaque = tr;
        ring_rw_start(t->ring, &tr->rw[i], t->fd, true, buf, tr->ext[i].len,
                      tr->ext[i].host_offset);
    }
}

static void
request(void *opaque, struct nbd_request *req)
{
    struct backup_target *t = opaque;
    struct target_req *tr = &t->reqs[req->slot];
    g_autoptr(GError) err = NULL;
    bool ok = true;

    tr->req = req;
    if (++t->requests == t->drop_at) {
        /* Test hook: the connection breaks under a request in flight. */
        nbd_server_shutdown(t->server);
    }
    if (t->error && req->type != NBD_CMD_READ) {
        /* The backup has failed: drop the data, keep the guest going. */
        req_complete(tr, 0);
        return;
    }
    switch (req->type) {
    case NBD_CMD_WRITE:
        handle_write(t, tr);
        return;
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_TRIM:
        /* TRIM too: an unallocated cluster in an incremental layer would
         * show the old data of the backing file. */
        ok = qcow2_writer_zero(t->writer, req->offset, req->len, &err);
        break;
    case NBD_CMD_READ:
        ok =
            qcow2_writer_read(t->writer, req->offset, req->buf, req->len, &err);
        if (!ok) {
            /* A READ cannot be answered with made-up data. */
            req_complete(tr, NBD_EIO);
            return;
        }
        break;
    }
    if (!ok && !t->error) {
        t->error = g_strdup_printf("%s: %s", t->disk, err->message);
    }
    req_complete(tr, 0);
}

/* Beyond net.core.wmem_max only with CAP_NET_ADMIN (SO_SNDBUFFORCE); the
 * capped SO_SNDBUF otherwise.  Only speed depends on it. */
static void
set_client_sndbuf(int fd)
{
    int size = CLIENT_SNDBUF;

    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    }
}

struct backup_target *
backup_target_new(struct ring *ring, int dir_fd, const char *file,
                  const char *disk, uint64_t size, unsigned cluster_bits,
                  const char *backing_file, struct qcow2_reader *backing,
                  int *client_fd, GError **errp)
{
    struct backup_target *t = g_new0(struct backup_target, 1);
    bool created = false;
    int sv[2];

    t->ring = ring;
    t->writeback_op.done_fn = writeback_done;
    t->recycle_op.done_fn = recycle_done;
    t->tick_op.done_fn = tick_done;
    t->disk = g_strdup(disk);
    t->dir_fd = dir_fd;
    t->file = g_strdup(file);
    t->drop_at =
        getenv("QBAK_FAULT_NBD_DROP") ? atol(getenv("QBAK_FAULT_NBD_DROP")) : 0;
    t->fd = openat(dir_fd, file,
                   O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (t->fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: create %s: %s", disk, file, g_strerror(errno));
        goto fail;
    }
    created = true;
    t->writer = qcow2_writer_new(t->fd, size, cluster_bits, backing_file,
                                 backing, errp);
    if (!t->writer) {
        g_prefix_error(errp, "%s: ", disk);
        goto fail;
    }
    for (unsigned i = 0; i < NBD_SLOTS; i++) {
        struct target_req *tr = &t->reqs[i];
        tr->t = t;
        tr->max_ext = qcow2_writer_max_extents(t->writer, NBD_MAX_BLOCK);
        tr->ext = g_new0(struct qcow2_extent, tr->max_ext);
        tr->rw = g_new0(struct ring_rw, tr->max_ext);
    }
    if (!client_fd) {
        return t; /* pull mode: the caller feeds the writer */
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: socketpair: %s", disk, g_strerror(errno));
        goto fail;
    }
    set_client_sndbuf(sv[1]);
    t->exp.name = t->disk;
    t->exp.size = size;
    t->exp.min_block = 1;
    t->exp.pref_block = 1u << cluster_bits;
    t->exp.max_block = NBD_MAX_BLOCK;
    /* The layer is worth nothing until the commit fsyncs it: a FLUSH would
     * only make every guest flush (passed on to the target by QEMU's
     * copy-before-write) wait for an fsync of the backup file. */
    t->exp.no_flush = true;
    t->backend.request_fn = request;
    t->backend.opaque = t;
    t->server = nbd_server_new(ring, sv[0], &t->exp, &t->backend, NBD_SLOTS);
    *client_fd = sv[1];
    return t;
fail:
    backup_target_free(t);
    if (created) {
        unlinkat(dir_fd, file, 0);
    }
    return NULL;
}

void
backup_target_free(struct backup_target *t)
{
    if (!t) {
        return;
    }
    /* I/O the watchdog gave up on still reads the slot buffers, which
     * the server owns: wait for it before the server goes. */
    t->closing = true;
    if (t->tick_pending) {
        struct io_uring_sqe *sqe = ring_get_sqe(t->ring);
        io_uring_prep_timeout_remove(sqe, (__u64)(uintptr_t)&t->tick_op, 0);
        io_uring_sqe_set_data(sqe, NULL);
    }
    while (t->tick_pending && ring_run_once(t->ring, -1) >= 0) {
    }
    if (t->server) {
        nbd_server_shutdown(t->server);
    }
    while ((t->writes_inflight > 0 || t->writeback_pending ||
            t->recycle_pending) &&
           ring_run_once(t->ring, -1) >= 0) {
    }
    if (t->server) {
        nbd_server_free(t->server);
    }
    for (unsigned i = 0; i < NBD_SLOTS; i++) {
        g_free(t->reqs[i].ext);
        g_free(t->reqs[i].rw);
    }
    qcow2_writer_free(t->writer);
    if (t->fd >= 0) {
        close(t->fd);
    }
    g_free(t->error);
    g_free(t->disk);
    g_free(t->file);
    g_free(t);
}

static bool watchdog_check(struct backup_target *t, gint64 limit_us);

/* The watchdog runs off a ring timer, not the QMP loop: QEMU's monitor may
 * itself be waiting for the very write that stalled. */
static void
arm_tick(struct backup_target *t)
{
    struct io_uring_sqe *sqe = ring_get_sqe(t->ring);

    t->tick_ts.tv_sec = 0;
    t->tick_ts.tv_nsec = 250 * 1000 * 1000;
    io_uring_prep_timeout(sqe, &t->tick_ts, 0, 0);
    ring_queue(t->ring, sqe, &t->tick_op);
    t->tick_pending = true;
}

static void
tick_done(struct ring_op *op, int res)
{
    struct backup_target *t = container_of(op, struct backup_target, tick_op);

    (void)res;
    t->tick_pending = false;
    if (t->closing) {
        return;
    }
    watchdog_check(t, t->stall_us);
    arm_tick(t);
}

void
backup_target_set_watchdog(struct backup_target *t, gint64 limit_us)
{
    t->stall_us = limit_us;
    if (limit_us > 0 && !t->tick_pending) {
        arm_tick(t);
    }
}

static bool
watchdog_check(struct backup_target *t, gint64 limit_us)
{
    gint64 now = g_get_monotonic_time();
    bool stalled = false;

    if (t->abandoned) {
        return false;
    }
    for (unsigned i = 0; i < NBD_SLOTS; i++) {
        struct target_req *tr = &t->reqs[i];
        stalled |= tr->writing && now - tr->started_us > limit_us;
    }
    if (!stalled) {
        return false;
    }
    /* Guest writes wait on these replies (copy-before-write): answer them
     * all now; the I/O finishes in its own time, its data unused. */
    t->abandoned = true;
    if (!t->error) {
        t->error = g_strdup_printf("%s: repository stalled: a write took more "
                                   "than %.0f s",
                                   t->disk, (double)limit_us / 1e6);
    }
    for (unsigned i = 0; i < NBD_SLOTS; i++) {
        req_complete(&t->reqs[i], 0);
    }
    return true;
}

const char *
backup_target_error(struct backup_target *t)
{
    /* Every message names its disk, the server's too. */
    if (!t->error && t->server && nbd_server_error(t->server)) {
        t->error =
            g_strdup_printf("%s: %s", t->disk, nbd_server_error(t->server));
    }
    return t->error;
}

bool
backup_target_connected(const struct backup_target *t)
{
    return t->server && nbd_server_connected(t->server);
}

bool
backup_target_finished(const struct backup_target *t)
{
    return !t->server || nbd_server_finished(t->server);
}

bool
backup_target_commit(struct backup_target *t, GError **errp)
{
    g_autofree char *sums = NULL;
    int err;

    if (t->error) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s", t->error);
        return false;
    }
    if (t->writes_inflight > 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: writes still in flight at commit", t->disk);
        return false;
    }
    if (!qcow2_writer_finish(t->writer, errp)) {
        g_prefix_error(errp, "%s: ", t->disk);
        return false;
    }
    /* The layer and its checksums are made durable by the point's commit
     * (repo_commit_sync), with every other file of the point at once;
     * the test hook fails this layer's fsync here. */
    err = ring_fault_fsync();
    if (err < 0) {
        target_fail(t, "fsync", -err);
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-err), "%s",
                    t->error);
        return false;
    }
    sums = g_strconcat(t->file, QCOW2_SUMS_SUFFIX, NULL);
    if (!qcow2_sums_write_sync(t->dir_fd, sums, qcow2_writer_sums(t->writer),
                               false, errp)) {
        g_prefix_error(errp, "%s: ", t->disk);
        return false;
    }
    return true;
}

uint64_t
backup_target_file_size(const struct backup_target *t)
{
    return qcow2_writer_file_size(t->writer);
}

uint64_t
backup_target_data_bytes(const struct backup_target *t)
{
    return qcow2_writer_data_bytes(t->writer);
}

/* Pull mode: see target.h. */
struct qcow2_writer *
backup_target_writer(struct backup_target *t)
{
    return t->writer;
}

int
backup_target_fd(const struct backup_target *t)
{
    return t->fd;
}

void
backup_target_wrote(struct backup_target *t, uint64_t host_off, size_t len)
{
    t->dirty_bytes += len;
    start_writeback(t);
    t->written_end = MAX(t->written_end, host_off + len);
    start_recycle(t);
}

void
backup_target_fail(struct backup_target *t, const char *msg)
{
    if (!t->error) {
        t->error = g_strdup_printf("%s: %s", t->disk, msg);
    }
}

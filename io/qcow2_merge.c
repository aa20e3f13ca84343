/* Folding the top layer(s) of a chain into the image below them: see
 * qcow2_merge_top and qcow2_merge_layers in qcow2.h.
 *
 * Why the chain reads the same at every instant: the parent's clusters
 * that change are exactly those the top layers cover (data or zero), and
 * those layers, untouched, still answer for them; clusters appended to
 * the parent are referenced only by tables the new header points at.  So
 * until that header is written the chain reads as before, and after it
 * the parent alone reads as the chain did.  The merged checksums come from
 * the two layers' checksum files, which the merge does not touch, so a
 * merge run again after a crash gives the same ones.  Nothing here fsyncs a
 * directory or renames: the caller decides when the merged image takes
 * the top layer's place. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "io/qcow2.h"
#include "io/qcow2_sums.h"

/* Data moved per read and write. */
#define MERGE_CHUNK (UINT64_C(4) << 20)

/* The layers to fold, newest first, that the kernel is asked to read
 * ahead while the parent's tables load, up to this many bytes in all
 * (the rest is read as the merge goes: bounded, so a huge merge does not
 * push the page cache out for nothing). */
#define MERGE_PREFETCH (UINT64_C(128) << 20)

static bool
sync_fd(int fd, const char *name, GError **errp)
{
    if (fdatasync(fd) < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: fdatasync: %s", name, g_strerror(err));
        return false;
    }
    return true;
}

static bool
pread_full(int fd, uint8_t *buf, size_t len, uint64_t off, const char *name,
           GError **errp)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, (off_t)off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: reading at %" PRIu64 ": %s", name, off,
                        g_strerror(err));
            return false;
        }
        if (n == 0) {
            /* The file ends inside a cluster: QEMU reads zeroes there. */
            memset(buf, 0, len);
            return true;
        }
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

/* Test-only fault injection, in io/ring.c's manner:
 * QBAK_FAULT_MERGE_WRITE=N[:err] makes the Nth data write of the merges of
 * this process fail with err (EIO (default), ENOSPC or a number). */
static int
fault_merge_write(void)
{
    static long nth = -1, count;
    static int err;

    if (nth < 0) {
        const char *s = getenv("QBAK_FAULT_MERGE_WRITE");
        char *end = NULL;

        nth = s && *s ? strtol(s, &end, 10) : 0;
        err = EIO;
        if (end && *end == ':') {
            err = strcmp(end + 1, "ENOSPC") == 0 ? ENOSPC
                  : strcmp(end + 1, "EIO") == 0  ? EIO
                                                 : atoi(end + 1);
        }
    }
    return nth > 0 && ++count == nth ? err : 0;
}

/* A piece of the top layer's data: guest offset, host offset in the top
 * layer's file, guest length (at most MERGE_CHUNK). */
struct data_run {
    uint64_t guest, host, len;
    unsigned depth; /* the layer it is read from */
};

/* Pieces joined into one write at most (IOV_MAX is 1024). */
#define MERGE_IOV 256

/* Data runs gathered before they are read in host order: 24 bytes each,
 * so a batch costs at most 1.5 MiB whatever the disk's size. */
#define MERGE_BATCH_RUNS 65536

struct merge {
    struct qcow2_reader *chain;
    struct qcow2_writer *w;
    int parent_fd;
    uint8_t *buf;
    struct qcow2_extent *ext;
    struct qcow2_merge_stats *stats;
    qcow2_merge_progress_fn *progress_fn;
    void *opaque;
    struct data_run *runs;
    size_t n_runs;
    unsigned into;   /* the depth of the image written into */
    bool check_only; /* the first pass: read and check, write nothing */
    /* Extents of a span that follow each other in the parent's file go
     * out as one write, wherever they lie in m->buf (the merge appends
     * the clusters it does not write in place one after the other, so
     * most do): n_iov pieces, pending_len bytes at pending_host, not
     * written yet. */
    struct iovec iov[MERGE_IOV];
    int n_iov;
    uint64_t pending_host, pending_len;
    uint64_t unflushed; /* bytes written since writeback was last started */
    /* Writeback is started from the ring's worker, so that the merge
     * never waits for the disk's queue (a sync_file_range call does once
     * the queue is full): at most one at a time in flight. */
    struct io_uring ring;
    bool have_ring;
    bool wb_inflight;
};

/* Writeback of the merged data is started every this many bytes written,
 * so that the disk writes while the merge reads on: left to the final
 * fdatasync, all of it would be written only once everything is read. */
#define MERGE_WRITEBACK (UINT64_C(8) << 20)

/* Whether the writeback started last is done (reaps its completion). */
static bool
writeback_done(struct merge *m, bool wait)
{
    struct io_uring_cqe *cqe;

    while (m->wb_inflight) {
        int r = wait ? io_uring_wait_cqe(&m->ring, &cqe)
                     : io_uring_peek_cqe(&m->ring, &cqe);

        if (r == -EINTR) {
            continue;
        }
        if (r < 0) {
            return r != -EAGAIN; /* -EAGAIN: not yet */
        }
        /* Its result does not matter: the fdatasync that follows the
         * writes reports any error writing them out. */
        io_uring_cqe_seen(&m->ring, cqe);
        m->wb_inflight = false;
    }
    return true;
}

/* Starts writing out what the merge wrote so far, unless that is under
 * way already.  sync_file_range only starts writing pages out earlier
 * than the kernel would: the merge's order of durability is the
 * fdatasyncs' alone (qcow2_merge_layers), so it changes nothing about a
 * crash.  Best effort: without it the final fdatasync writes it all, only
 * once everything is read. */
static void
start_writeback(struct merge *m)
{
    struct io_uring_sqe *sqe;

    if (!m->have_ring) {
        m->unflushed = 0;
        (void)sync_file_range(m->parent_fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        return;
    }
    if (!writeback_done(m, false) || m->wb_inflight ||
        (sqe = io_uring_get_sqe(&m->ring)) == NULL) {
        return; /* tried again after the next write */
    }
    m->unflushed = 0;
    io_uring_prep_sync_file_range(sqe, m->parent_fd, 0, 0,
                                  SYNC_FILE_RANGE_WRITE);
    if (io_uring_submit(&m->ring) == 1) {
        m->wb_inflight = true;
    }
}

/* The pending write issued (if any), and writeback started once enough
 * is written. */
static bool
flush_pending(struct merge *m, GError **errp)
{
    struct iovec *iov = m->iov;
    int n = m->n_iov;
    uint64_t off = m->pending_host, len = m->pending_len;

    m->n_iov = 0;
    m->pending_len = 0;
    while (n > 0) {
        ssize_t done = pwritev(m->parent_fd, iov, n, (off_t)off);

        if (done < 0 && errno == EINTR) {
            continue;
        }
        if (done <= 0) {
            int err = done < 0 ? errno : ENOSPC;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: writing at %" PRIu64 ": %s",
                        qcow2_reader_layer_name(m->chain, m->into), off,
                        g_strerror(err));
            return false;
        }
        off += (uint64_t)done;
        /* A short write: on from where it stopped. */
        while (n > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    m->unflushed += len;
    if (m->unflushed >= MERGE_WRITEBACK) {
        start_writeback(m);
    }
    return true;
}

/* Queues len bytes of buf (valid until the span's end) for the parent at
 * host, joined to the pending write when it follows it in the file.  A
 * fault injected counts extents, as it did before they were joined. */
static bool
queue_write(struct merge *m, const uint8_t *buf, uint64_t len, uint64_t host,
            GError **errp)
{
    int fault = fault_merge_write();

    if (fault) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(fault),
                    "%s: writing at %" PRIu64 ": %s",
                    qcow2_reader_layer_name(m->chain, m->into), host,
                    g_strerror(fault));
        return false;
    }
    if (m->n_iov > 0 && m->n_iov < MERGE_IOV &&
        host == m->pending_host + m->pending_len) {
        struct iovec *last = &m->iov[m->n_iov - 1];

        if ((const uint8_t *)last->iov_base + last->iov_len == buf) {
            last->iov_len += (size_t)len;
        } else {
            m->iov[m->n_iov++] = (struct iovec){(void *)buf, (size_t)len};
        }
        m->pending_len += len;
        return true;
    }
    if (!flush_pending(m, errp)) {
        return false;
    }
    m->iov[0] = (struct iovec){(void *)buf, (size_t)len};
    m->n_iov = 1;
    m->pending_host = host;
    m->pending_len = len;
    return true;
}

/* Host bytes a run occupies: whole clusters (the last cluster of a disk
 * whose size is not a multiple is read past the disk's end too, so that it
 * is checked whole). */
static uint64_t
run_host_len(const struct merge *m, const struct data_run *r)
{
    uint64_t cluster = UINT64_C(1)
                       << qcow2_reader_layer_cluster_bits(m->chain, 0);

    return (r->len + cluster - 1) & ~(cluster - 1);
}

/* Reading layer by layer, each in host order. */
static int
run_cmp_host(const void *a, const void *b)
{
    const struct data_run *x = a, *y = b;

    if (x->depth != y->depth) {
        return x->depth < y->depth ? -1 : 1;
    }
    return x->host < y->host ? -1 : x->host > y->host;
}

/* Checks and writes into the parent the runs of a span read into
 * m->buf (runs[0] at buf offset 0, the rest following in host order). */
static bool
merge_span(struct merge *m, const struct data_run *runs, size_t n,
           GError **errp)
{
    struct qcow2_reader *chain = m->chain;
    unsigned bits = qcow2_reader_layer_cluster_bits(chain, 0);
    uint64_t cluster = UINT64_C(1) << bits;
    uint64_t pos = 0;
    bool wrote = false;

    for (size_t i = 0; i < n; i++) {
        const struct data_run *r = &runs[i];
        uint8_t *buf = m->buf + pos;
        uint64_t whole = run_host_len(m, r);
        uint64_t k = 0;

        for (k = 0; k < whole; k += cluster) {
            if (!qcow2_reader_check_cluster(
                    chain, r->depth, (r->guest + k) >> bits, buf + k, errp)) {
                m->stats->damaged_depth = (int)r->depth;
                return false;
            }
        }
        /* The first pass writes what lands where the old image reads
         * nothing (nothing sees it before the new header), the second
         * what goes over the old image's data in place.  Pieces of whole
         * clusters, alike all along. */
        for (k = 0; k < r->len;) {
            bool in_place = qcow2_writer_in_place(m->w, r->guest + k);
            uint64_t end = k + cluster;
            size_t n_ext = 0;

            while (end < r->len &&
                   qcow2_writer_in_place(m->w, r->guest + end) == in_place) {
                end += cluster;
            }
            end = MIN(end, r->len);
            if (in_place == m->check_only) {
                k = end;
                continue;
            }
            if (!qcow2_writer_write(m->w, r->guest + k, buf + k,
                                    (size_t)(end - k), m->ext, &n_ext, errp)) {
                return false;
            }
            m->stats->parent_changed |= in_place;
            for (size_t e = 0; e < n_ext; e++) {
                const struct qcow2_extent *x = &m->ext[e];

                if (!queue_write(m, buf + k + x->buf_offset, x->len,
                                 x->host_offset, errp)) {
                    return false;
                }
            }
            m->stats->data_bytes += end - k;
            wrote = true;
            k = end;
        }
        pos += whole;
    }
    /* m->buf is read over next. */
    if (!flush_pending(m, errp)) {
        return false;
    }
    if (m->progress_fn != NULL && wrote) {
        m->progress_fn(m->opaque, m->stats->data_bytes);
    }
    return true;
}

/* The gathered runs, read in host order: a layer written by a backup holds
 * its clusters in the order they arrived, not in guest order, so reading
 * in guest order would cost a seek per cluster.  Host-adjacent runs are
 * read together, up to MERGE_CHUNK at a time. */
static bool
merge_batch(struct merge *m, GError **errp)
{
    size_t i = 0;

    qsort(m->runs, m->n_runs, sizeof(m->runs[0]), run_cmp_host);
    while (i < m->n_runs) {
        unsigned depth = m->runs[i].depth;
        int top_fd = qcow2_reader_layer_fd(m->chain, depth);
        const char *top_name = qcow2_reader_layer_name(m->chain, depth);
        uint64_t span = run_host_len(m, &m->runs[i]);
        size_t j = i + 1;

        while (j < m->n_runs && m->runs[j].depth == depth &&
               m->runs[j].host == m->runs[i].host + span &&
               span + run_host_len(m, &m->runs[j]) <= MERGE_CHUNK) {
            span += run_host_len(m, &m->runs[j]);
            j++;
        }
        if (!pread_full(top_fd, m->buf, (size_t)span, m->runs[i].host, top_name,
                        errp) ||
            !merge_span(m, &m->runs[i], j - i, errp)) {
            return false;
        }
        i = j;
    }
    m->n_runs = 0;
    return true;
}

static bool add_pieces(struct merge *m, unsigned depth, uint64_t off,
                       const struct qcow2_layer_run *run, GError **errp);

/* Adds a data run of a layer to read: all of it in the first pass (every
 * cluster is checked), only the pieces to write in place in the second. */
static bool
add_data_run(struct merge *m, unsigned depth, uint64_t off,
             const struct qcow2_layer_run *run, GError **errp)
{
    uint64_t cluster = UINT64_C(1)
                       << qcow2_reader_layer_cluster_bits(m->chain, 0);

    if (!m->check_only) {
        /* The second pass reads again only the pieces written in place
         * (the rest was written by the first). */
        for (uint64_t k = 0; k < run->len;) {
            uint64_t end = k;
            struct qcow2_layer_run piece;

            while (end < run->len && !qcow2_writer_in_place(m->w, off + end)) {
                end += cluster;
            }
            k = MIN(end, run->len);
            while (end < run->len && qcow2_writer_in_place(m->w, off + end)) {
                end += cluster;
            }
            end = MIN(end, run->len);
            if (end > k) {
                piece = (struct qcow2_layer_run){run->kind,
                                                 run->host_offset + k, end - k};
                if (!add_pieces(m, depth, off + k, &piece, errp)) {
                    return false;
                }
            }
            k = end;
        }
        return true;
    }
    return add_pieces(m, depth, off, run, errp);
}

/* Adds a run in pieces of at most MERGE_CHUNK (runs start on a cluster
 * boundary, so every piece does). */
static bool
add_pieces(struct merge *m, unsigned depth, uint64_t off,
           const struct qcow2_layer_run *run, GError **errp)
{
    for (uint64_t done = 0; done < run->len; done += MERGE_CHUNK) {
        if (m->n_runs == MERGE_BATCH_RUNS && !merge_batch(m, errp)) {
            return false;
        }
        m->runs[m->n_runs++] =
            (struct data_run){off + done, run->host_offset + done,
                              MIN(MERGE_CHUNK, run->len - done), depth};
    }
    return true;
}

/* At guest offset off: the newest of layers 0..n-1 that has the bytes
 * (data or zero), in *run and *depth, the run cut where a newer layer
 * starts to have bytes; or UNALLOCATED in all n for run->len bytes. */
static bool
newest_run(struct qcow2_reader *chain, unsigned n, uint64_t off,
           uint64_t max_len, struct qcow2_layer_run *run, unsigned *depth,
           GError **errp)
{
    for (unsigned d = 0; d < n; d++) {
        if (!qcow2_reader_layer_map(chain, d, off, max_len, run, errp)) {
            return false;
        }
        *depth = d;
        if (run->kind != QCOW2_LAYER_UNALLOCATED) {
            return true;
        }
        max_len = run->len; /* layers below answer only inside this gap */
    }
    return true;
}

/* The checksums of layer n with layers n-1..0 over them, or NULL when one
 * of them has none. */
static struct qcow2_sums *
merged_sums_of(struct qcow2_reader *chain, unsigned n)
{
    const struct qcow2_sums *base = qcow2_reader_layer_sums(chain, n, NULL);
    struct qcow2_sums *acc = NULL;

    for (unsigned d = 0; d <= n; d++) {
        if (qcow2_reader_layer_sums(chain, d, NULL) == NULL) {
            return NULL;
        }
    }
    for (unsigned d = n; d-- > 0;) {
        struct qcow2_sums *next = qcow2_sums_overlay(
            acc ? acc : base, qcow2_reader_layer_sums(chain, d, NULL));
        qcow2_sums_free(acc);
        acc = next;
    }
    return acc;
}

struct qcow2_sums *
qcow2_merge_sums(struct qcow2_reader *chain, unsigned n)
{
    return merged_sums_of(chain, n);
}

/* One pass over the guest disk: newest data wins, each guest cluster
 * taken once, from the newest of the n layers that has it. */
static bool
merge_walk(struct merge *m, uint64_t size, GError **errp)
{
    uint64_t off = 0;

    while (off < size) {
        struct qcow2_layer_run run = {0};
        unsigned depth = 0;

        if (!newest_run(m->chain, m->into, off, size - off, &run, &depth,
                        errp)) {
            return false;
        }
        /* The parent's tables where the merge goes, and only there, read
         * before in_place is asked about them. */
        if (run.kind != QCOW2_LAYER_UNALLOCATED &&
            !qcow2_writer_load_tables(m->w, off, run.len, errp)) {
            return false;
        }
        if (run.kind == QCOW2_LAYER_DATA) {
            if (!add_data_run(m, depth, off, &run, errp)) {
                return false;
            }
        } else if (run.kind == QCOW2_LAYER_ZERO && !m->check_only) {
            m->stats->parent_changed = true; /* it may write zeroes */
            if (!qcow2_writer_zero(m->w, off, run.len, errp)) {
                return false;
            }
            m->stats->zero_bytes += run.len;
        }
        off += run.len;
    }
    return merge_batch(m, errp);
}

bool
qcow2_merge_top(struct qcow2_reader *chain, int parent_fd,
                struct qcow2_sums **merged_sums,
                struct qcow2_merge_stats *stats,
                qcow2_merge_progress_fn *progress_fn, void *opaque,
                GError **errp)
{
    return qcow2_merge_layers(chain, 1, parent_fd, merged_sums, stats,
                              progress_fn, opaque, errp);
}

bool
qcow2_merge_layers(struct qcow2_reader *chain, unsigned n, int parent_fd,
                   struct qcow2_sums **merged_sums,
                   struct qcow2_merge_stats *stats,
                   qcow2_merge_progress_fn *progress_fn, void *opaque,
                   GError **errp)
{
    struct qcow2_writer *w = NULL;
    g_autofree uint8_t *buf = NULL;
    g_autofree struct qcow2_extent *ext = NULL;
    g_autofree struct data_run *runs = NULL;
    struct merge m;
    const char *top_name = qcow2_reader_layer_name(chain, 0);
    const char *into_name;
    uint64_t size;
    bool ok = false;

    if (merged_sums != NULL) {
        *merged_sums = NULL;
    }
    memset(stats, 0, sizeof(*stats));
    stats->damaged_depth = -1;
    if (n == 0 || qcow2_reader_chain_depth(chain) < n + 1) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: no backing image %u layers down to merge into",
                    top_name, n);
        return false;
    }
    into_name = qcow2_reader_layer_name(chain, n);
    size = qcow2_reader_layer_virtual_size(chain, 0);
    for (unsigned d = 1; d <= n; d++) {
        if (size != qcow2_reader_layer_virtual_size(chain, d) ||
            qcow2_reader_layer_cluster_bits(chain, 0) !=
                qcow2_reader_layer_cluster_bits(chain, d)) {
            /* Not damage: two sound images that do not fit together. */
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "%s: its backing image %s differs in size or cluster "
                        "size",
                        qcow2_reader_layer_name(chain, d - 1),
                        qcow2_reader_layer_name(chain, d));
            return false;
        }
    }
    for (uint64_t d = 0, left = 0; d < n && left < MERGE_PREFETCH; d++) {
        uint64_t len =
            MIN(MERGE_PREFETCH - left, qcow2_reader_layer_file_size(chain, d));

        (void)posix_fadvise(qcow2_reader_layer_fd(chain, (unsigned)d), 0,
                            (off_t)len, POSIX_FADV_WILLNEED);
        left += len;
    }
    w = qcow2_writer_reopen(parent_fd, chain, n, errp);
    if (w == NULL) {
        return false;
    }
    buf = g_malloc(MERGE_CHUNK);
    ext = g_new(struct qcow2_extent, qcow2_writer_max_extents(w, MERGE_CHUNK));
    runs = g_new(struct data_run, MERGE_BATCH_RUNS);
    m = (struct merge){.chain = chain,
                       .w = w,
                       .parent_fd = parent_fd,
                       .buf = buf,
                       .ext = ext,
                       .stats = stats,
                       .progress_fn = progress_fn,
                       .opaque = opaque,
                       .runs = runs,
                       .into = n};
    /* Every cluster is checked before the first is written over in the
     * parent: damage found half way would leave the parent changed where
     * it is written in place.  The second pass reads what the first left
     * in the page cache (for all but huge merges), so the price is a
     * second checksum, not a second read from the disk. */
    m.have_ring = io_uring_queue_init(2, &m.ring, 0) == 0;
    m.check_only = true;
    if (!merge_walk(&m, size, errp)) {
        goto out;
    }
    m.check_only = false;
    if (!merge_walk(&m, size, errp)) {
        goto out;
    }
    /* Data and tables durable before the header points at them, the
     * header durable before the caller moves the file into place. */
    if (!qcow2_writer_finish_tables(w, errp) ||
        !sync_fd(parent_fd, into_name, errp)) {
        goto out;
    }
    stats->parent_changed = true; /* the header, from here on */
    if (!qcow2_writer_write_header(w, errp) ||
        !sync_fd(parent_fd, into_name, errp)) {
        goto out;
    }
    qcow2_writer_punch_free(w);
    if (merged_sums != NULL) {
        *merged_sums = merged_sums_of(chain, n);
    }
    ok = true;
out:
    if (!ok) {
        g_prefix_error(errp, "merging %s into %s: ", top_name, into_name);
    }
    if (m.have_ring) {
        writeback_done(&m, true);
        io_uring_queue_exit(&m.ring);
    }
    qcow2_writer_free(w);
    return ok;
}

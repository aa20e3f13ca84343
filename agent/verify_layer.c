/* Checking one layer of a chain against its checksums: see verify_int.h.
 *
 * The layer's data clusters are taken in guest order, a window at a time,
 * and read in host order, consecutive host ranges gathered into reads of
 * up to BUF_SIZE, NBUF of them in flight through io_uring with O_DIRECT:
 * the disk sees large sequential requests, the page cache is left alone,
 * and checksumming (XXH3, several GB/s per core) overlaps the reads.
 */
#include "agent/verify_int.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/file.h"
#include "io/qcow2_sums.h"

#define NBUF 8
#define BUF_SIZE (4u << 20)
/* Data clusters sorted by host offset at a time (see read_window). */
#define WINDOW_BYTES (UINT64_C(256) << 20)
#define PROGRESS_US 500000

struct layer_check;

struct verify_buf {
    struct layer_check *lc;
    struct ring_rw rw;
    uint8_t *data;
    uint64_t host_off;
    size_t len;
    uint64_t *clusters; /* guest cluster of each cluster read */
    size_t n;
    bool busy;
};

struct verify_pool {
    uint8_t *data[NBUF];
    uint64_t *clusters[NBUF];
};

struct verify_pool *
verify_pool_new(void)
{
    struct verify_pool *pool = g_new0(struct verify_pool, 1);

    for (unsigned i = 0; i < NBUF; i++) {
        pool->data[i] = g_aligned_alloc(1, BUF_SIZE, FILE_DIRECT_ALIGN);
        /* room for the smallest clusters */
        pool->clusters[i] = g_new(uint64_t, BUF_SIZE >> QCOW2_MIN_CLUSTER_BITS);
    }
    return pool;
}

void
verify_pool_free(struct verify_pool *pool)
{
    if (!pool) {
        return;
    }
    for (unsigned i = 0; i < NBUF; i++) {
        g_aligned_free(pool->data[i]);
        g_free(pool->clusters[i]);
    }
    g_free(pool);
}

struct layer_check {
    struct ring *ring;
    struct qcow2_reader *r;
    unsigned depth;
    unsigned bits;
    size_t cs;
    int fd, direct_fd;
    struct verify_buf bufs[NBUF];
    struct verify_stats *st;
    struct verify_finding *f;
    bool stop;
    uint64_t done, total;
};

void
verify_finding_set(struct verify_finding *f, enum verify_state state,
                   int64_t offset, const char *fmt, ...)
{
    va_list ap;

    g_free(f->reason);
    f->state = state;
    f->offset = offset;
    va_start(ap, fmt);
    f->reason = g_strdup_vprintf(fmt, ap);
    va_end(ap);
}

/* The first bad cluster in guest order wins: completions come in any
 * order, but every read submitted before the one that failed covers lower
 * guest offsets, and all of them are checked before the layer is done. */
static void
found_damage(struct layer_check *lc, int64_t off, const char *reason)
{
    if (lc->f->state != VERIFY_DAMAGED || off < lc->f->offset) {
        verify_finding_set(lc->f, VERIFY_DAMAGED, off, "%s", reason);
    }
    lc->stop = true;
}

static double
cpu_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void
read_done(struct ring_rw *rw, int err)
{
    struct verify_buf *b = rw->opaque;
    struct layer_check *lc = b->lc;
    double t0;

    b->busy = false;
    if (err < 0) {
        uint64_t first = b->clusters[0];
        for (size_t i = 1; i < b->n; i++) {
            first = MIN(first, b->clusters[i]);
        }
        g_autofree char *msg = g_strdup_printf(
            "%s: read at %" PRIu64 ": %s",
            qcow2_reader_layer_name(lc->r, lc->depth), b->host_off,
            err == -ENODATA ? "the file ends early (truncated)"
                            : g_strerror(-err));
        found_damage(lc, (int64_t)(first << lc->bits), msg);
        return;
    }
    lc->st->bytes_read += b->len;
    lc->done += b->len;
    t0 = cpu_now();
    for (size_t i = 0; i < b->n; i++) {
        g_autoptr(GError) e = NULL;
        if (!qcow2_reader_check_cluster(lc->r, lc->depth, b->clusters[i],
                                        b->data + i * lc->cs, &e)) {
            /* no break: the buffer is in host order, found_damage
             * keeps the lowest guest offset */
            found_damage(lc, (int64_t)(b->clusters[i] << lc->bits), e->message);
        }
    }
    lc->st->checksum_cpu_s += cpu_now() - t0;
}

static void
submit(struct layer_check *lc, struct verify_buf **bp)
{
    struct verify_buf *b = *bp;
    int fd;

    if (!b) {
        return;
    }
    *bp = NULL;
    if (b->n == 0) {
        b->busy = false;
        return;
    }
    fd = file_pick_fd(lc->fd, lc->direct_fd, b->data, b->host_off, b->len);
    b->rw.done_fn = read_done;
    b->rw.opaque = b;
    ring_rw_start(lc->ring, &b->rw, fd, false, b->data, b->len, b->host_off);
}

static struct verify_buf *
get_buf(struct layer_check *lc)
{
    for (;;) {
        for (unsigned i = 0; i < NBUF; i++) {
            struct verify_buf *b = &lc->bufs[i];
            if (!b->busy) {
                b->busy = true;
                b->n = 0;
                b->len = 0;
                return b;
            }
        }
        ring_run_once(lc->ring, -1);
    }
}

static void
progress(struct layer_check *lc, const char *label, gint64 start, bool last)
{
    double secs = (double)(g_get_monotonic_time() - start) / 1e6;
    double rate = secs > 0 ? (double)lc->done / secs : 0;
    double left =
        rate > 0 ? (double)(lc->total - MIN(lc->done, lc->total)) / rate : 0;

    fprintf(stderr,
            "\r\033[Kqbak: verify %s: %.0f of %.0f MiB, %.0f MiB/s, %.0f s "
            "left%s",
            label, (double)lc->done / 1048576.0, (double)lc->total / 1048576.0,
            rate / 1048576.0, left, last ? "\n" : "");
}

/* Bytes of data clusters in the layer (for progress), or false with the
 * damage recorded when the layer's tables do not map. */
static bool
count_data(struct layer_check *lc, uint64_t size)
{
    for (uint64_t off = 0; off < size;) {
        g_autoptr(GError) e = NULL;
        struct qcow2_layer_run run;

        if (!qcow2_reader_layer_map(lc->r, lc->depth, off, size - off, &run,
                                    &e)) {
            found_damage(lc, (int64_t)off, e->message);
            return false;
        }
        if (run.kind == QCOW2_LAYER_DATA) {
            lc->total += run.len;
        }
        off += run.len;
    }
    return true;
}

/* Every entry of the checksums must name a cluster the layer holds, as
 * data or zero as recorded (called when the counts disagree). */
static void
find_orphan_sum(struct layer_check *lc, const struct qcow2_sums *sums)
{
    for (size_t i = 0; i < qcow2_sums_count(sums); i++) {
        const struct qcow2_sum *e = qcow2_sums_at(sums, i);
        uint64_t off = e->cluster << lc->bits;
        struct qcow2_layer_run run;

        if (!qcow2_reader_layer_map(lc->r, lc->depth, off, 1, &run, NULL) ||
            run.kind != (e->zero ? QCOW2_LAYER_ZERO : QCOW2_LAYER_DATA)) {
            g_autofree char *msg = g_strdup_printf(
                "%s: guest offset %" PRIu64
                ": the checksums record a %s cluster the layer does not hold",
                qcow2_reader_layer_name(lc->r, lc->depth), off,
                e->zero ? "zero" : "data");
            found_damage(lc, (int64_t)off, msg);
            return;
        }
    }
}

/* Every cluster of a zero run of the layer must lie in a zero run of the
 * checksums (which merge adjacent runs, so one entry may cover several of
 * the layer's runs and the other way round). */
static void
check_zero_run(struct layer_check *lc, const struct qcow2_sums *sums,
               const struct qcow2_layer_run *run, uint64_t off,
               uint64_t *matched)
{
    uint64_t c = off >> lc->bits;
    uint64_t end = (off + run->len + lc->cs - 1) >> lc->bits;

    while (c < end) {
        const struct qcow2_sum *e = qcow2_sums_find(sums, c);
        uint64_t upto;

        if (!e || !e->zero) {
            g_autofree char *msg =
                g_strdup_printf("%s: guest offset %" PRIu64
                                ": a zero cluster the checksums record %s",
                                qcow2_reader_layer_name(lc->r, lc->depth),
                                c << lc->bits, e ? "as data" : "not at all");
            found_damage(lc, (int64_t)(c << lc->bits), msg);
            return;
        }
        upto = MIN(end, e->cluster + e->count);
        *matched += upto - c;
        c = upto;
    }
}

/* Clusters the checksums cover: each must have been matched by one the
 * layer holds. */
static uint64_t
sums_clusters(const struct qcow2_sums *sums)
{
    uint64_t n = 0;

    for (size_t i = 0; i < qcow2_sums_count(sums); i++) {
        const struct qcow2_sum *e = qcow2_sums_at(sums, i);
        n += e->zero ? e->count : 1;
    }
    return n;
}

struct pending {
    uint64_t host;
    uint64_t cluster;
};

static int
pending_cmp(const void *a, const void *b)
{
    const struct pending *pa = a, *pb = b;

    return pa->host < pb->host ? -1 : pa->host > pb->host;
}

/* Reads a window of data clusters in host order, consecutive host ranges
 * sharing a read.  QEMU's backup job pushes up to 16 requests at once and
 * they land in arrival order, so guest order is host order only roughly:
 * sorted, a window gives large reads where guest order gave one or two
 * clusters each.  Every read of a window is submitted (even after damage
 * was found) so that the first bad cluster in guest order is known:
 * windows go in guest order. */
static void
read_window(struct layer_check *lc, struct pending *p, size_t n)
{
    struct verify_buf *b = NULL;

    qsort(p, n, sizeof(*p), pending_cmp);
    for (size_t i = 0; i < n; i++) {
        if (b &&
            (b->host_off + b->len != p[i].host || b->len + lc->cs > BUF_SIZE)) {
            submit(lc, &b);
        }
        if (!b) {
            b = get_buf(lc);
            b->host_off = p[i].host;
        }
        b->clusters[b->n++] = p[i].cluster;
        b->len += lc->cs;
    }
    submit(lc, &b);
}

static void
walk_layer(struct layer_check *lc, const struct qcow2_sums *sums, uint64_t size,
           const char *label, bool show)
{
    size_t window = WINDOW_BYTES >> lc->bits, np = 0;
    g_autofree struct pending *p = g_new(struct pending, window);
    uint64_t matched = 0;
    gint64 start = g_get_monotonic_time(), last = 0;

    for (uint64_t off = 0; off < size && !lc->stop;) {
        g_autoptr(GError) e = NULL;
        struct qcow2_layer_run run;
        uint64_t n;

        if (!qcow2_reader_layer_map(lc->r, lc->depth, off, size - off, &run,
                                    &e)) {
            found_damage(lc, (int64_t)off, e->message);
            break;
        }
        if (run.kind == QCOW2_LAYER_ZERO) {
            check_zero_run(lc, sums, &run, off, &matched);
        }
        n = run.kind == QCOW2_LAYER_DATA ? (run.len + lc->cs - 1) >> lc->bits
                                         : 0;
        for (uint64_t i = 0; i < n; i++) {
            p[np].host = run.host_offset + (i << lc->bits);
            p[np].cluster = (off >> lc->bits) + i;
            if (++np == window) {
                read_window(lc, p, np);
                np = 0;
            }
        }
        matched += n;
        off += run.len;
        if (show && g_get_monotonic_time() - last > PROGRESS_US) {
            last = g_get_monotonic_time();
            progress(lc, label, start, false);
        }
    }
    if (!lc->stop) {
        read_window(lc, p, np);
    }
    ring_drain(lc->ring);
    if (show) {
        progress(lc, label, start, true);
    }
    if (!lc->stop && matched != sums_clusters(sums)) {
        find_orphan_sum(lc, sums);
    }
}

void
verify_layer(struct verify_pool *pool, struct ring *ring,
             struct qcow2_reader *r, unsigned depth, bool expect_sums,
             const char *label, bool show, struct verify_stats *st,
             struct verify_finding *f)
{
    struct layer_check lc = {
        .ring = ring, .r = r, .depth = depth, .st = st, .f = f};
    const char *why = NULL;
    const struct qcow2_sums *sums = qcow2_reader_layer_sums(r, depth, &why);
    const char *name = qcow2_reader_layer_name(r, depth);
    uint64_t size = qcow2_reader_layer_virtual_size(r, depth);

    if (!sums) {
        if (expect_sums) {
            verify_finding_set(f, VERIFY_DAMAGED, -1,
                               "checksums recorded but unusable: %s",
                               why ? why : name);
        } else {
            verify_finding_set(f, VERIFY_UNVERIFIABLE, -1,
                               "%s has no checksums (written before qbak "
                               "kept them)",
                               name);
        }
        return;
    }
    lc.bits = qcow2_reader_cluster_bits(r);
    lc.cs = (size_t)1 << lc.bits;
    if (qcow2_sums_cluster_bits(sums) != lc.bits ||
        qcow2_sums_virtual_size(sums) != size) {
        verify_finding_set(f, VERIFY_DAMAGED, -1,
                           "%s: the checksum file is for another image "
                           "(cluster or virtual size differs)",
                           name);
        return;
    }
    if (!count_data(&lc, size)) {
        return;
    }
    lc.fd = qcow2_reader_layer_fd(r, depth);
    lc.direct_fd = file_reopen_direct(lc.fd, O_RDONLY);
    for (unsigned i = 0; i < NBUF; i++) {
        lc.bufs[i].lc = &lc;
        lc.bufs[i].data = pool->data[i];
        lc.bufs[i].clusters = pool->clusters[i];
    }
    walk_layer(&lc, sums, size, label, show);
    if (lc.direct_fd >= 0) {
        close(lc.direct_fd);
    }
}

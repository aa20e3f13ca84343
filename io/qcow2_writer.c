/* qcow2 writer: one backup layer, append-only.
 *
 * The mapping lives in memory until qcow2_writer_finish(): L2 tables are
 * allocated the first time a guest cluster in their reach is touched, so
 * memory follows the touched part of the disk, not its virtual size.
 * Host clusters are handed out in arrival order from cluster 1 and never
 * reused; a data cluster that is later zeroed as a whole is just no
 * longer referenced, and refcounts are derived at finish from what is
 * referenced, so such a cluster ends with refcount 0 (no leak for
 * qemu-img check, only a hole's worth of wasted space).
 *
 * Partial clusters (a write or zero covering part of a cluster that has no
 * host cluster yet) are buffered with the ranges they cover.  The bytes
 * they do not cover are the layer's base: zero if the cluster is a zero
 * cluster here or the image has no backing file, the backing chain's bytes
 * otherwise.  A buffer is written out as a data cluster once covered, at
 * finish, or when too many are outstanding (oldest first): filling from the
 * base early gives the same bytes as filling late, because the backing
 * chain is immutable, so the bound costs I/O, never correctness.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "io/qcow2.h"
#include "io/qcow2_format.h"
#include "io/qcow2_sums.h"
#include "io/qcow2_writer_int.h"

/* Header, backing format extension (8 + "qcow2" padded to 8), end marker. */
#define HEADER_BYTES_WITH_BACKING (QCOW2_V3_HEADER_LEN + 16 + 8)
#define HEADER_BYTES_STANDALONE (QCOW2_V3_HEADER_LEN + 8)

/* Outstanding partial clusters before the oldest is written out. */
#define MAX_PARTIAL_CLUSTERS 4096
#define MAX_PARTIAL_BYTES (UINT64_C(256) << 20)

struct l2_table qcow2_all_zero_table;

struct cover_range {
    uint32_t start, end; /* [start, end) within the cluster */
};

struct partial {
    uint64_t cluster; /* guest cluster index; also the hash key */
    uint8_t *data;    /* cluster_size bytes; uncovered bytes are zero */
    GArray *ranges;   /* sorted, disjoint, non-adjacent struct cover_range */
    GList link;       /* in qcow2_writer.partial_order */
};

bool
qcow2w_pwrite(struct qcow2_writer *w, const void *buf, size_t len, uint64_t off,
              const char *what, GError **errp)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pwrite(w->fd, p, len, (off_t)off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : ENOSPC;
            /* The file no longer says what the mapping says: every later
             * call fails rather than finish an image with a hole in it. */
            w->failed = true;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "qcow2: writing %s at %" PRIu64 ": %s", what, off,
                        g_strerror(err));
            return false;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

static bool
writer_usable(const struct qcow2_writer *w, GError **errp)
{
    if (w->failed) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_IO,
                    "qcow2: writer failed earlier");
        return false;
    }
    if (w->finished || w->tables_done) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: writer already finished");
        return false;
    }
    return true;
}

/* A host cluster for new data or a table: the next at the end of the
 * file, or for a reopened image one its refcounts say is free. */
static bool
alloc_host_cluster(struct qcow2_writer *w, uint64_t *host, GError **errp)
{
    if (w->ro != NULL) {
        if (!qcow2_reopen_alloc(w, host, errp)) {
            w->failed = true;
            return false;
        }
        return true;
    }
    *host = w->next_host_cluster++ << w->cluster_bits;
    return true;
}

static void
set_hash(struct qcow2_writer *w, uint64_t host, uint64_t hash)
{
    guint idx = (guint)(host >> w->cluster_bits);

    if (w->no_sums) {
        return; /* nor an array as long as the reopened file */
    }

    if (w->host_hash->len <= idx) {
        g_array_set_size(w->host_hash, idx + 1);
    }
    g_array_index(w->host_hash, uint64_t, idx) = hash;
}

static void
mark_stale(struct qcow2_writer *w, uint64_t host)
{
    uint64_t idx = host >> w->cluster_bits;

    g_array_append_val(w->stale, idx);
}

/* The hash of a cluster of which buf holds the first len bytes, the rest
 * being zero (the last cluster of a disk whose size is not a multiple). */
static uint64_t
hash_cluster(struct qcow2_writer *w, const void *buf, size_t len)
{
    if (w->no_sums) {
        return 0; /* never read: a merge takes its checksums elsewhere */
    }
    if (len == w->cluster_size) {
        return qcow2_sums_hash(buf, len);
    }
    g_autofree uint8_t *whole = g_malloc0(w->cluster_size);
    memcpy(whole, buf, len);
    return qcow2_sums_hash(whole, (size_t)w->cluster_size);
}

/* Guest bytes of cluster c (less than a cluster only at the end). */
static uint64_t
cluster_valid_len(const struct qcow2_writer *w, uint64_t c)
{
    uint64_t start = c << w->cluster_bits;

    return MIN(w->cluster_size, w->virtual_size - start);
}

/* Valid entries in the L2 table at L1 index i. */
uint64_t
qcow2w_table_valid_entries(const struct qcow2_writer *w, uint64_t i)
{
    uint64_t first = i << w->l2_bits;

    return MIN(UINT64_C(1) << w->l2_bits, w->n_clusters - first);
}

static uint64_t
l2_get(const struct qcow2_writer *w, uint64_t c)
{
    const struct l2_table *t = w->l1[c >> w->l2_bits];

    if (t == NULL) {
        return ENTRY_UNSET;
    }
    if (t == L2_ALL_ZERO) {
        return ENTRY_ZERO;
    }
    return t->e[c & ((UINT64_C(1) << w->l2_bits) - 1)];
}

static struct l2_table *
l2_materialize(struct qcow2_writer *w, uint64_t i)
{
    struct l2_table *t = w->l1[i];
    uint64_t entries = UINT64_C(1) << w->l2_bits;

    if (t != NULL && t != L2_ALL_ZERO) {
        return t;
    }
    struct l2_table *n = g_malloc0(sizeof(*n) + entries * sizeof(n->e[0]));
    if (t == L2_ALL_ZERO) {
        uint64_t valid = qcow2w_table_valid_entries(w, i);
        for (uint64_t k = 0; k < valid; k++) {
            n->e[k] = ENTRY_ZERO;
        }
        n->n_zero = (uint32_t)valid;
    }
    w->l1[i] = n;
    return n;
}

static void
orphan(struct qcow2_writer *w, uint64_t host)
{
    uint64_t idx = host >> w->cluster_bits;

    g_array_append_val(w->orphans, idx);
}

/* A table that only says "zero" is replaced by the shared marker. */
static void
l2_maybe_compact(struct qcow2_writer *w, uint64_t i)
{
    struct l2_table *t = w->l1[i];

    if (t != NULL && t != L2_ALL_ZERO && t->n_partial == 0 &&
        t->n_zero == qcow2w_table_valid_entries(w, i)) {
        g_free(t);
        w->l1[i] = L2_ALL_ZERO;
    }
}

static void
l2_set(struct qcow2_writer *w, uint64_t c, uint64_t value)
{
    uint64_t i = c >> w->l2_bits;

    if (value == ENTRY_ZERO && w->l1[i] == L2_ALL_ZERO) {
        return;
    }
    struct l2_table *t = l2_materialize(w, i);
    uint64_t *e = &t->e[c & ((UINT64_C(1) << w->l2_bits) - 1)];

    if (*e != value) {
        if (*e == ENTRY_ZERO) {
            t->n_zero--;
        } else if (*e != ENTRY_UNSET) {
            orphan(w, *e);
        }
        if (value == ENTRY_ZERO) {
            t->n_zero++;
        }
        *e = value;
        if (w->ro != NULL) {
            qcow2_reopen_table_changed(w, i);
        }
    }
    /* Also when unchanged: a partial buffer dropped just before may have
     * been all that kept the table. */
    l2_maybe_compact(w, i);
}

static struct partial *
partial_lookup(struct qcow2_writer *w, uint64_t c)
{
    return g_hash_table_lookup(w->partials, &c);
}

static void
partial_drop(struct qcow2_writer *w, struct partial *p)
{
    uint64_t i = p->cluster >> w->l2_bits;

    g_queue_unlink(&w->partial_order, &p->link);
    g_hash_table_remove(w->partials, &p->cluster);
    w->partial_bytes -= w->cluster_size;
    w->l1[i]->n_partial--;
    g_array_unref(p->ranges);
    g_free(p->data);
    g_free(p);
}

static void
partial_cover(struct partial *p, uint32_t start, uint32_t end)
{
    GArray *a = p->ranges;
    guint i = 0;

    while (i < a->len && g_array_index(a, struct cover_range, i).end < start) {
        i++;
    }
    guint j = i;
    while (j < a->len && g_array_index(a, struct cover_range, j).start <= end) {
        struct cover_range *r = &g_array_index(a, struct cover_range, j);
        start = MIN(start, r->start);
        end = MAX(end, r->end);
        j++;
    }
    if (j > i) {
        g_array_remove_range(a, i, j - i);
    }
    struct cover_range n = {start, end};
    g_array_insert_val(a, i, n);
}

static bool
partial_complete(const struct qcow2_writer *w, const struct partial *p)
{
    const GArray *a = p->ranges;

    return a->len == 1 && g_array_index(a, struct cover_range, 0).start == 0 &&
           g_array_index(a, struct cover_range, 0).end == w->cluster_size;
}

/* Read the backing chain's bytes at [off, off+len); zero past its end. */
static bool
read_backing(struct qcow2_writer *w, uint64_t off, uint8_t *buf, size_t len,
             GError **errp)
{
    uint64_t size = w->backing ? qcow2_reader_virtual_size(w->backing) : 0;
    size_t from_backing = 0;

    if (off < size) {
        from_backing = (size_t)MIN((uint64_t)len, size - off);
        if (!qcow2_reader_pread(w->backing, off, buf, from_backing, errp)) {
            g_prefix_error(errp, "qcow2: reading backing file: ");
            return false;
        }
    }
    memset(buf + from_backing, 0, len - from_backing);
    return true;
}

/* Write a partial cluster out as a data cluster, base bytes filled in. */
static bool
partial_flush(struct qcow2_writer *w, struct partial *p, GError **errp)
{
    uint64_t c = p->cluster;
    g_autofree uint8_t *merged = NULL;
    const uint8_t *out = p->data;

    if (l2_get(w, c) == ENTRY_UNSET && w->backing != NULL) {
        merged = g_malloc(w->cluster_size);
        if (!read_backing(w, c << w->cluster_bits, merged,
                          (size_t)cluster_valid_len(w, c), errp)) {
            w->failed = true;
            return false;
        }
        memset(merged + cluster_valid_len(w, c), 0,
               (size_t)(w->cluster_size - cluster_valid_len(w, c)));
        for (guint i = 0; i < p->ranges->len; i++) {
            struct cover_range *r =
                &g_array_index(p->ranges, struct cover_range, i);
            memcpy(merged + r->start, p->data + r->start, r->end - r->start);
        }
        out = merged;
    }
    uint64_t host = 0;
    if (!alloc_host_cluster(w, &host, errp) ||
        !qcow2w_pwrite(w, out, (size_t)w->cluster_size, host,
                       "partial data cluster", errp)) {
        return false;
    }
    set_hash(w, host, hash_cluster(w, out, (size_t)w->cluster_size));
    partial_drop(w, p);
    l2_set(w, c, host);
    return true;
}

static struct partial *
partial_get(struct qcow2_writer *w, uint64_t c, GError **errp)
{
    struct partial *p = partial_lookup(w, c);

    if (p != NULL) {
        return p;
    }
    if (w->ro != NULL) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: part of guest cluster %" PRIu64
                    " written into a reopened image",
                    c);
        return NULL;
    }
    while (w->partial_order.length >= MAX_PARTIAL_CLUSTERS ||
           w->partial_bytes + w->cluster_size > MAX_PARTIAL_BYTES) {
        struct partial *oldest = w->partial_order.head->data;
        if (!partial_flush(w, oldest, errp)) {
            return NULL;
        }
    }
    p = g_new0(struct partial, 1);
    p->cluster = c;
    p->data = g_malloc0(w->cluster_size);
    p->ranges = g_array_new(FALSE, FALSE, sizeof(struct cover_range));
    p->link.data = p;
    g_queue_push_tail_link(&w->partial_order, &p->link);
    g_hash_table_insert(w->partials, &p->cluster, p);
    w->partial_bytes += w->cluster_size;
    l2_materialize(w, c >> w->l2_bits)->n_partial++;
    /* Guests never see the bytes past the virtual size: they are covered,
     * and zero, from the start. */
    uint64_t valid = cluster_valid_len(w, c);
    if (valid < w->cluster_size) {
        partial_cover(p, (uint32_t)valid, (uint32_t)w->cluster_size);
    }
    return p;
}

struct qcow2_writer *
qcow2_writer_new(int fd, uint64_t virtual_size, unsigned cluster_bits,
                 const char *backing_file, struct qcow2_reader *backing,
                 GError **errp)
{
    if (cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: cluster bits %u outside %u..%u", cluster_bits,
                    QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
        return NULL;
    }
    if (virtual_size == 0 || virtual_size > QCOW2_MAX_VIRTUAL_SIZE) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: virtual size %" PRIu64 " not supported",
                    virtual_size);
        return NULL;
    }
    unsigned l2_bits = cluster_bits - 3;
    unsigned reach_bits = cluster_bits + l2_bits;
    uint64_t l1_size =
        (virtual_size + (UINT64_C(1) << reach_bits) - 1) >> reach_bits;
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: virtual size %" PRIu64
                    " too large for %u-byte clusters",
                    virtual_size, 1u << cluster_bits);
        return NULL;
    }
    if (backing != NULL && backing_file == NULL) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: backing reader given without a backing file name");
        return NULL;
    }
    if (backing_file != NULL) {
        size_t len = strlen(backing_file);
        if (len == 0 || len > QCOW2_MAX_BACKING_NAME ||
            HEADER_BYTES_WITH_BACKING + len > (UINT64_C(1) << cluster_bits)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "qcow2: backing file name of %zu bytes does not fit "
                        "the header",
                        len);
            return NULL;
        }
    }

    struct qcow2_writer *w = g_new0(struct qcow2_writer, 1);
    w->fd = fd;
    w->virtual_size = virtual_size;
    w->cluster_bits = cluster_bits;
    w->cluster_size = UINT64_C(1) << cluster_bits;
    w->l2_bits = l2_bits;
    w->n_clusters = (virtual_size + w->cluster_size - 1) >> cluster_bits;
    w->l1_size = l1_size;
    w->l1 = g_new0(struct l2_table *, l1_size);
    w->backing_file = g_strdup(backing_file);
    w->backing = backing;
    w->next_host_cluster = 1; /* cluster 0 is the header */
    w->orphans = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    w->host_hash = g_array_new(FALSE, TRUE, sizeof(uint64_t));
    w->stale = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    w->partials = g_hash_table_new(g_int64_hash, g_int64_equal);
    g_queue_init(&w->partial_order);
    return w;
}

void
qcow2_writer_free(struct qcow2_writer *w)
{
    if (w == NULL) {
        return;
    }
    while (w->partial_order.head != NULL) {
        partial_drop(w, w->partial_order.head->data);
    }
    for (uint64_t i = 0; i < w->l1_size; i++) {
        if (w->l1[i] != L2_ALL_ZERO) {
            g_free(w->l1[i]);
        }
    }
    g_free(w->l1);
    g_free(w->backing_file);
    g_array_unref(w->orphans);
    qcow2_reopen_free(w->ro);
    g_array_unref(w->host_hash);
    g_array_unref(w->stale);
    qcow2_sums_free(w->sums);
    g_hash_table_unref(w->partials);
    g_free(w->zero_buf);
    g_free(w);
}

size_t
qcow2_writer_max_extents(const struct qcow2_writer *w, size_t len)
{
    /* len bytes at any offset touch at most len / cluster + 2 clusters. */
    return (len >> w->cluster_bits) + 2;
}

static bool
check_range(const struct qcow2_writer *w, uint64_t off, uint64_t len,
            const char *op, GError **errp)
{
    if (off > w->virtual_size || len > w->virtual_size - off) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: %s of %" PRIu64 "+%" PRIu64
                    " past virtual size %" PRIu64,
                    op, off, len, w->virtual_size);
        return false;
    }
    return true;
}

static void
add_extent(struct qcow2_extent *ext, size_t *n_ext, uint64_t host,
           size_t buf_offset, size_t len)
{
    if (*n_ext > 0) {
        struct qcow2_extent *last = &ext[*n_ext - 1];
        if (last->host_offset + last->len == host &&
            last->buf_offset + last->len == buf_offset) {
            last->len += len;
            return;
        }
    }
    ext[*n_ext] = (struct qcow2_extent){host, buf_offset, len};
    (*n_ext)++;
}

/* The bytes of the disk's last cluster past the disk's end, zero: its
 * checksum covers them as zeroes, and a host cluster taken from the free
 * ones may hold old bytes there. */
static bool
zero_tail(struct qcow2_writer *w, uint64_t host, uint64_t valid, GError **errp)
{
    if (w->zero_buf == NULL) {
        w->zero_buf = g_malloc0(w->cluster_size);
    }
    return qcow2w_pwrite(w, w->zero_buf, (size_t)(w->cluster_size - valid),
                         host + valid, "end of the last cluster", errp);
}

bool
qcow2_writer_write(struct qcow2_writer *w, uint64_t off, const void *buf,
                   size_t len, struct qcow2_extent *ext, size_t *n_ext,
                   GError **errp)
{
    const uint8_t *src = buf;
    uint64_t end = off + len;
    uint64_t pos = off;

    *n_ext = 0;
    if (!writer_usable(w, errp) || !check_range(w, off, len, "write", errp) ||
        (w->ro != NULL && !qcow2_reopen_load(w, off, len, errp))) {
        return false;
    }
    while (pos < end) {
        uint64_t c = pos >> w->cluster_bits;
        uint64_t in_off = pos & (w->cluster_size - 1);
        uint64_t cluster_end = (c << w->cluster_bits) + cluster_valid_len(w, c);
        uint64_t n = MIN(end, cluster_end) - pos;
        size_t buf_offset = (size_t)(pos - off);
        uint64_t e = l2_get(w, c);

        bool whole = in_off == 0 && pos + n == cluster_end;

        if (e != ENTRY_UNSET && e != ENTRY_ZERO) {
            if (whole) {
                set_hash(w, e, hash_cluster(w, src + buf_offset, (size_t)n));
            } else {
                mark_stale(w, e);
            }
            add_extent(ext, n_ext, e + in_off, buf_offset, (size_t)n);
        } else if (whole) {
            struct partial *p = partial_lookup(w, c);
            if (p != NULL) {
                partial_drop(w, p);
            }
            uint64_t host = 0;
            if (!alloc_host_cluster(w, &host, errp) ||
                (n < w->cluster_size && !zero_tail(w, host, n, errp))) {
                return false;
            }
            l2_set(w, c, host);
            set_hash(w, host, hash_cluster(w, src + buf_offset, (size_t)n));
            add_extent(ext, n_ext, host, buf_offset, (size_t)n);
        } else {
            struct partial *p = partial_get(w, c, errp);
            if (p == NULL) {
                return false;
            }
            memcpy(p->data + in_off, src + buf_offset, (size_t)n);
            partial_cover(p, (uint32_t)in_off, (uint32_t)(in_off + n));
            if (partial_complete(w, p) && !partial_flush(w, p, errp)) {
                return false;
            }
        }
        pos += n;
    }
    return true;
}

/* Zero every cluster in the reach of L2 table i. */
static void
zero_table(struct qcow2_writer *w, uint64_t i)
{
    struct l2_table *t = w->l1[i];

    if (t == L2_ALL_ZERO) {
        return;
    }
    if (t != NULL) {
        uint64_t valid = qcow2w_table_valid_entries(w, i);
        uint64_t first = i << w->l2_bits;
        for (uint64_t k = 0; k < valid && t->n_partial > 0; k++) {
            struct partial *p = partial_lookup(w, first + k);
            if (p != NULL) {
                partial_drop(w, p);
            }
        }
        for (uint64_t k = 0; k < valid; k++) {
            if (t->e[k] != ENTRY_UNSET && t->e[k] != ENTRY_ZERO) {
                orphan(w, t->e[k]);
            }
        }
        g_free(t);
    }
    w->l1[i] = L2_ALL_ZERO;
    if (w->ro != NULL) {
        qcow2_reopen_table_changed(w, i);
    }
}

static bool
zero_piece(struct qcow2_writer *w, uint64_t c, uint64_t in_off, uint64_t n,
           GError **errp)
{
    uint64_t e = l2_get(w, c);
    struct partial *p;

    if (e != ENTRY_UNSET && e != ENTRY_ZERO) {
        if (w->zero_buf == NULL) {
            w->zero_buf = g_malloc0(w->cluster_size);
        }
        mark_stale(w, e);
        return qcow2w_pwrite(w, w->zero_buf, (size_t)n, e + in_off,
                             "zeroes into data cluster", errp);
    }
    p = partial_lookup(w, c);
    if (p == NULL && (e == ENTRY_ZERO || w->backing_file == NULL)) {
        return true; /* reads as zero already */
    }
    if (p == NULL) {
        p = partial_get(w, c, errp);
        if (p == NULL) {
            return false;
        }
    }
    memset(p->data + in_off, 0, (size_t)n);
    partial_cover(p, (uint32_t)in_off, (uint32_t)(in_off + n));
    if (partial_complete(w, p)) {
        return partial_flush(w, p, errp);
    }
    return true;
}

bool
qcow2_writer_zero(struct qcow2_writer *w, uint64_t off, uint64_t len,
                  GError **errp)
{
    uint64_t end = off + len;
    uint64_t pos = off;
    unsigned reach_bits = w->cluster_bits + w->l2_bits;

    if (!writer_usable(w, errp) || !check_range(w, off, len, "zero", errp) ||
        (w->ro != NULL && !qcow2_reopen_load(w, off, len, errp))) {
        return false;
    }
    while (pos < end) {
        uint64_t c = pos >> w->cluster_bits;
        uint64_t in_off = pos & (w->cluster_size - 1);
        uint64_t i = c >> w->l2_bits;
        uint64_t table_end = MIN(w->virtual_size, (i + 1) << reach_bits);

        if ((pos & ((UINT64_C(1) << reach_bits) - 1)) == 0 &&
            end >= table_end) {
            zero_table(w, i);
            pos = table_end;
            continue;
        }
        uint64_t cluster_end = (c << w->cluster_bits) + cluster_valid_len(w, c);
        uint64_t n = MIN(end, cluster_end) - pos;

        if (in_off == 0 && pos + n == cluster_end) {
            struct partial *p = partial_lookup(w, c);
            if (p != NULL) {
                partial_drop(w, p);
            }
            l2_set(w, c, ENTRY_ZERO);
        } else if (!zero_piece(w, c, in_off, n, errp)) {
            return false;
        }
        pos += n;
    }
    return true;
}

static bool
read_fd(struct qcow2_writer *w, uint64_t off, uint8_t *buf, size_t len,
        GError **errp)
{
    while (len > 0) {
        ssize_t n = pread(w->fd, buf, len, (off_t)off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "qcow2: reading data cluster at %" PRIu64 ": %s", off,
                        g_strerror(err));
            return false;
        }
        if (n == 0) {
            /* An extent the caller has not written yet: still a hole. */
            memset(buf, 0, len);
            return true;
        }
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

bool
qcow2_writer_read(struct qcow2_writer *w, uint64_t off, void *buf, size_t len,
                  GError **errp)
{
    uint8_t *dst = buf;
    uint64_t end = off + len;
    uint64_t pos = off;

    if (w->failed) {
        return writer_usable(w, errp);
    }
    if (!check_range(w, off, len, "read", errp) ||
        (w->ro != NULL && !qcow2_reopen_load(w, off, len, errp))) {
        return false;
    }
    while (pos < end) {
        uint64_t c = pos >> w->cluster_bits;
        uint64_t in_off = pos & (w->cluster_size - 1);
        uint64_t cluster_end = (c << w->cluster_bits) + cluster_valid_len(w, c);
        size_t n = (size_t)(MIN(end, cluster_end) - pos);
        uint8_t *out = dst + (pos - off);
        uint64_t e = l2_get(w, c);
        struct partial *p = partial_lookup(w, c);

        if (e != ENTRY_UNSET && e != ENTRY_ZERO) {
            if (!read_fd(w, e + in_off, out, n, errp)) {
                return false;
            }
        } else if (e == ENTRY_ZERO) {
            memset(out, 0, n);
        } else if (!read_backing(w, pos, out, n, errp)) {
            return false;
        }
        if (p != NULL) {
            /* Covered bytes from the buffer, the base (read above) for the
             * rest. */
            for (guint i = 0; i < p->ranges->len; i++) {
                struct cover_range *r =
                    &g_array_index(p->ranges, struct cover_range, i);
                uint64_t s = MAX((uint64_t)r->start, in_off);
                uint64_t t = MIN((uint64_t)r->end, in_off + n);
                if (s < t) {
                    memcpy(out + (s - in_off), p->data + s, (size_t)(t - s));
                }
            }
        }
        pos += n;
    }
    return true;
}

void
qcow2w_encode_table(const struct qcow2_writer *w, uint64_t i, uint8_t *buf,
                    bool *any)
{
    const struct l2_table *t = w->l1[i];

    *any = false;
    memset(buf, 0, w->cluster_size);
    for (uint64_t k = 0; t != NULL && k < qcow2w_table_valid_entries(w, i);
         k++) {
        uint64_t e = t == L2_ALL_ZERO ? ENTRY_ZERO : t->e[k];
        uint64_t v = 0;

        if (e == ENTRY_ZERO) {
            v = QCOW2_OFLAG_ZERO;
        } else if (e != ENTRY_UNSET) {
            v = e | QCOW2_OFLAG_COPIED;
        }
        qcow2_store_be64(buf + k * 8, v);
        *any |= v != 0;
    }
}

/* L2 tables go out in L1 order; returns the L1 table (big-endian). */
static bool
write_l2_tables(struct qcow2_writer *w, uint8_t *l1_buf, GError **errp)
{
    g_autofree uint8_t *buf = g_malloc(w->cluster_size);

    for (uint64_t i = 0; i < w->l1_size; i++) {
        uint64_t host = 0;
        bool any = false;

        qcow2w_encode_table(w, i, buf, &any);
        if (!any) {
            continue;
        }
        if (!alloc_host_cluster(w, &host, errp) ||
            !qcow2w_pwrite(w, buf, (size_t)w->cluster_size, host, "L2 table",
                           errp)) {
            return false;
        }
        qcow2_store_be64(l1_buf + i * 8, host | QCOW2_OFLAG_COPIED);
    }
    return true;
}

static int
compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* Refcount blocks and table for clusters [0, total): every cluster has
 * refcount 1 except orphaned data clusters, which have 0.  Blocks start at
 * host cluster first_block, the table follows them. */
static bool
write_refcounts(struct qcow2_writer *w, uint64_t total, uint64_t first_block,
                uint64_t n_blocks, uint64_t table_clusters, GError **errp)
{
    uint64_t per_block = w->cluster_size / 2;
    g_autofree uint8_t *buf = g_malloc(w->cluster_size);
    g_autofree uint8_t *table = g_malloc0(table_clusters * w->cluster_size);
    const uint64_t *orphans = (const uint64_t *)(void *)w->orphans->data;
    guint next_orphan = 0;

    g_array_sort(w->orphans, compare_u64);
    for (uint64_t b = 0; b < n_blocks; b++) {
        uint64_t first = b * per_block;
        uint64_t host = (first_block + b) << w->cluster_bits;

        memset(buf, 0, w->cluster_size);
        for (uint64_t k = 0; k < per_block && first + k < total; k++) {
            uint64_t cluster = first + k;

            while (next_orphan < w->orphans->len &&
                   orphans[next_orphan] < cluster) {
                next_orphan++;
            }
            if (next_orphan < w->orphans->len &&
                orphans[next_orphan] == cluster) {
                continue;
            }
            qcow2_store_be16(buf + k * 2, 1);
        }
        if (!qcow2w_pwrite(w, buf, (size_t)w->cluster_size, host,
                           "refcount block", errp)) {
            return false;
        }
        qcow2_store_be64(table + b * 8, host);
    }
    return qcow2w_pwrite(w, table, (size_t)(table_clusters * w->cluster_size),
                         (first_block + n_blocks) << w->cluster_bits,
                         "refcount table", errp);
}

static bool
write_header(struct qcow2_writer *w, uint64_t l1_offset,
             uint64_t reftable_offset, uint64_t reftable_clusters,
             GError **errp)
{
    size_t name_len = w->backing_file ? strlen(w->backing_file) : 0;
    size_t len = (w->backing_file ? HEADER_BYTES_WITH_BACKING
                                  : HEADER_BYTES_STANDALONE) +
                 name_len;
    g_autofree uint8_t *h = g_malloc0(len);
    uint8_t *ext = h + QCOW2_V3_HEADER_LEN;

    qcow2_store_be32(h + 0, QCOW2_MAGIC);
    qcow2_store_be32(h + 4, 3);
    if (w->backing_file != NULL) {
        qcow2_store_be64(h + QCOW2_HDR_BACKING_OFFSET,
                         HEADER_BYTES_WITH_BACKING);
        qcow2_store_be32(h + QCOW2_HDR_BACKING_LEN, (uint32_t)name_len);
    }
    qcow2_store_be32(h + QCOW2_HDR_CLUSTER_BITS, w->cluster_bits);
    qcow2_store_be64(h + QCOW2_HDR_SIZE, w->virtual_size);
    /* 32: crypt_method 0 */
    qcow2_store_be32(h + QCOW2_HDR_L1_SIZE, (uint32_t)w->l1_size);
    qcow2_store_be64(h + QCOW2_HDR_L1_OFFSET, l1_offset);
    qcow2_store_be64(h + QCOW2_HDR_REFTABLE_OFFSET, reftable_offset);
    qcow2_store_be32(h + QCOW2_HDR_REFTABLE_CLUSTERS,
                     (uint32_t)reftable_clusters);
    /* 60: no snapshots; 72..95: no incompatible, compatible or autoclear
     * features (refcounts are exact, so the image is clean). */
    qcow2_store_be32(h + QCOW2_HDR_REFCOUNT_ORDER, QCOW2_REFCOUNT_ORDER);
    qcow2_store_be32(h + QCOW2_HDR_HEADER_LEN, QCOW2_V3_HEADER_LEN);
    if (w->backing_file != NULL) {
        qcow2_store_be32(ext, QCOW2_EXT_BACKING_FORMAT);
        qcow2_store_be32(ext + 4, 5);
        memcpy(ext + 8, "qcow2", 5);
        ext += 16;
    }
    /* ext now points at the end-of-extensions marker (zeroes). */
    memcpy(ext + 8, w->backing_file ? w->backing_file : "", name_len);
    return qcow2w_pwrite(w, h, len, 0, "header", errp);
}

/* Hashes again, from the file, the data clusters changed in part after
 * their hash was taken (the caller has written every extent by now). */
static bool
rehash_stale(struct qcow2_writer *w, GError **errp)
{
    g_autofree uint8_t *buf = NULL;

    if (w->stale->len == 0 || w->no_sums) {
        return true;
    }
    buf = g_malloc(w->cluster_size);
    for (guint i = 0; i < w->stale->len; i++) {
        uint64_t host = g_array_index(w->stale, uint64_t, i) << w->cluster_bits;

        if (!read_fd(w, host, buf, (size_t)w->cluster_size, errp)) {
            w->failed = true;
            return false;
        }
        set_hash(w, host, qcow2_sums_hash(buf, (size_t)w->cluster_size));
    }
    g_array_set_size(w->stale, 0);
    return true;
}

/* The layer's checksums, in guest cluster order, from the mapping. */
static struct qcow2_sums *
build_sums(const struct qcow2_writer *w)
{
    struct qcow2_sums *sums = qcow2_sums_new(w->cluster_bits, w->virtual_size);

    for (uint64_t i = 0; i < w->l1_size; i++) {
        const struct l2_table *t = w->l1[i];
        uint64_t first = i << w->l2_bits;
        uint64_t valid = qcow2w_table_valid_entries(w, i);

        if (t == L2_ALL_ZERO) {
            struct qcow2_sum e = {.cluster = first, .count = valid, .zero = 1};
            qcow2_sums_append(sums, &e);
            continue;
        }
        for (uint64_t k = 0; t != NULL && k < valid; k++) {
            struct qcow2_sum e = {.cluster = first + k, .count = 1};

            if (t->e[k] == ENTRY_UNSET) {
                continue;
            }
            if (t->e[k] == ENTRY_ZERO) {
                e.zero = true;
            } else {
                e.hash = g_array_index(w->host_hash, uint64_t,
                                       t->e[k] >> w->cluster_bits);
            }
            qcow2_sums_append(sums, &e);
        }
    }
    return sums;
}

bool
qcow2_writer_finish_tables(struct qcow2_writer *w, GError **errp)
{
    if (!writer_usable(w, errp)) {
        return false;
    }
    while (w->partial_order.head != NULL) {
        if (!partial_flush(w, w->partial_order.head->data, errp)) {
            return false;
        }
    }
    if (!rehash_stale(w, errp)) {
        return false;
    }
    if (w->ro != NULL) {
        if (!qcow2_reopen_finish_tables(w, errp)) {
            w->failed = true;
            return false;
        }
        w->tables_done = true;
        return true;
    }

    uint64_t l1_bytes = w->l1_size * 8;
    uint64_t l1_clusters = (l1_bytes + w->cluster_size - 1) >> w->cluster_bits;
    g_autofree uint8_t *l1_buf = g_malloc0(l1_clusters * w->cluster_size);
    if (!write_l2_tables(w, l1_buf, errp)) {
        return false;
    }
    uint64_t l1_offset = w->next_host_cluster << w->cluster_bits;
    w->next_host_cluster += l1_clusters;
    if (!qcow2w_pwrite(w, l1_buf, (size_t)(l1_clusters * w->cluster_size),
                       l1_offset, "L1 table", errp)) {
        return false;
    }

    /* The refcount structures count themselves: grow until the blocks
     * cover the blocks and the table that points at them. */
    uint64_t per_block = w->cluster_size / 2;
    uint64_t before = w->next_host_cluster;
    uint64_t n_blocks = 0, table_clusters = 0;
    for (;;) {
        uint64_t total = before + n_blocks + table_clusters;
        uint64_t nb = (total + per_block - 1) / per_block;
        uint64_t tc = (nb * 8 + w->cluster_size - 1) >> w->cluster_bits;
        if (nb == n_blocks && tc == table_clusters) {
            break;
        }
        n_blocks = nb;
        table_clusters = tc;
    }
    if (table_clusters * w->cluster_size > QCOW2_MAX_REFTABLE_BYTES) {
        w->failed = true;
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSPC,
                    "qcow2: image too large for its refcount table "
                    "(%" PRIu64 " clusters)",
                    before);
        return false;
    }
    uint64_t total = before + n_blocks + table_clusters;
    if (!write_refcounts(w, total, before, n_blocks, table_clusters, errp)) {
        return false;
    }
    w->next_host_cluster = total;

    /* Every referenced cluster lies inside the file (the refcount table
     * was written last, so this only matters if the caller wrote less
     * than it was told). */
    struct stat st;
    uint64_t file_size = total << w->cluster_bits;
    if (fstat(w->fd, &st) < 0 || ((uint64_t)st.st_size < file_size &&
                                  ftruncate(w->fd, (off_t)file_size) < 0)) {
        int err = errno;
        w->failed = true;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "qcow2: extending image to %" PRIu64 " bytes: %s",
                    file_size, g_strerror(err));
        return false;
    }
    w->l1_offset = l1_offset;
    w->reftable_offset = (before + n_blocks) << w->cluster_bits;
    w->reftable_clusters = table_clusters;
    w->file_size = file_size;
    if (!w->no_sums) {
        w->sums = build_sums(w);
    }
    w->tables_done = true;
    return true;
}

bool
qcow2_writer_write_header(struct qcow2_writer *w, GError **errp)
{
    if (w->failed || !w->tables_done || w->finished) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: header written out of order");
        return false;
    }
    /* The header last: until it is written the file is not a valid image
     * (a new one), or still the image it was (a reopened one). */
    if (!write_header(w, w->l1_offset, w->reftable_offset, w->reftable_clusters,
                      errp)) {
        return false;
    }
    w->finished = true;
    return true;
}

bool
qcow2_writer_finish(struct qcow2_writer *w, GError **errp)
{
    return qcow2_writer_finish_tables(w, errp) &&
           qcow2_writer_write_header(w, errp);
}

const struct qcow2_sums *
qcow2_writer_sums(const struct qcow2_writer *w)
{
    return w->sums;
}

uint64_t
qcow2_writer_file_size(const struct qcow2_writer *w)
{
    if (w->finished) {
        return w->file_size;
    }
    return w->next_host_cluster << w->cluster_bits;
}

static void
count_bytes(const struct qcow2_writer *w, uint64_t *data, uint64_t *zero)
{
    *data = 0;
    *zero = 0;
    for (uint64_t i = 0; i < w->l1_size; i++) {
        const struct l2_table *t = w->l1[i];
        uint64_t first = i << w->l2_bits;
        uint64_t valid = qcow2w_table_valid_entries(w, i);

        if (t == NULL) {
            continue;
        }
        if (t == L2_ALL_ZERO) {
            uint64_t end =
                MIN(w->virtual_size, (first + valid) << w->cluster_bits);
            *zero += end - (first << w->cluster_bits);
            continue;
        }
        for (uint64_t k = 0; k < valid; k++) {
            uint64_t c = first + k;
            uint64_t e = t->e[k];
            uint64_t bytes = cluster_valid_len(w, c);

            if (t->n_partial > 0 && g_hash_table_contains(w->partials, &c)) {
                *data += bytes; /* becomes a data cluster at finish */
            } else if (e == ENTRY_ZERO) {
                *zero += bytes;
            } else if (e != ENTRY_UNSET) {
                *data += bytes;
            }
        }
    }
}

uint64_t
qcow2_writer_data_bytes(const struct qcow2_writer *w)
{
    uint64_t data, zero;

    count_bytes(w, &data, &zero);
    return data;
}

uint64_t
qcow2_writer_zero_bytes(const struct qcow2_writer *w)
{
    uint64_t data, zero;

    count_bytes(w, &data, &zero);
    return zero;
}

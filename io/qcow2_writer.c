/* qcow2 writer: one backup layer, append-only (the finish, tables and
 * header, is in io/qcow2_writer_finish.c).
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

bool
qcow2w_usable(const struct qcow2_writer *w, GError **errp)
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
bool
qcow2w_alloc_host_cluster(struct qcow2_writer *w, uint64_t *host, GError **errp)
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

void
qcow2w_set_hash(struct qcow2_writer *w, uint64_t host, uint64_t hash)
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
    if (!qcow2w_alloc_host_cluster(w, &host, errp) ||
        !qcow2w_pwrite(w, out, (size_t)w->cluster_size, host,
                       "partial data cluster", errp)) {
        return false;
    }
    qcow2w_set_hash(w, host, hash_cluster(w, out, (size_t)w->cluster_size));
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

/* Writes out every outstanding partial cluster, base bytes filled in. */
bool
qcow2w_flush_partials(struct qcow2_writer *w, GError **errp)
{
    while (w->partial_order.head != NULL) {
        if (!partial_flush(w, w->partial_order.head->data, errp)) {
            return false;
        }
    }
    return true;
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
    if (!qcow2w_usable(w, errp) || !check_range(w, off, len, "write", errp) ||
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
                qcow2w_set_hash(w, e,
                                hash_cluster(w, src + buf_offset, (size_t)n));
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
            if (!qcow2w_alloc_host_cluster(w, &host, errp) ||
                (n < w->cluster_size && !zero_tail(w, host, n, errp))) {
                return false;
            }
            l2_set(w, c, host);
            qcow2w_set_hash(w, host,
                            hash_cluster(w, src + buf_offset, (size_t)n));
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

    if (!qcow2w_usable(w, errp) || !check_range(w, off, len, "zero", errp) ||
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

bool
qcow2w_read_fd(struct qcow2_writer *w, uint64_t off, uint8_t *buf, size_t len,
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
        return qcow2w_usable(w, errp);
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
            if (!qcow2w_read_fd(w, e + in_off, out, n, errp)) {
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

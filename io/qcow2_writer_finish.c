/* qcow2 writer, the finish: the in-memory mapping becomes L2 tables, an
 * L1 table, refcounts and, last, the header (see io/qcow2_writer.c for
 * the write path).  Everything goes after the data already written, so
 * until the header is written the file is not a valid image (a new layer)
 * or is still the image it was (a reopened one, io/qcow2_reopen.c). */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/qcow2.h"
#include "io/qcow2_format.h"
#include "io/qcow2_sums.h"
#include "io/qcow2_writer_int.h"

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
        if (!qcow2w_alloc_host_cluster(w, &host, errp) ||
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

        if (!qcow2w_read_fd(w, host, buf, (size_t)w->cluster_size, errp)) {
            w->failed = true;
            return false;
        }
        qcow2w_set_hash(w, host, qcow2_sums_hash(buf, (size_t)w->cluster_size));
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
    if (!qcow2w_usable(w, errp)) {
        return false;
    }
    if (!qcow2w_flush_partials(w, errp)) {
        return false;
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

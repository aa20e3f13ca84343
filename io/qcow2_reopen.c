/* An existing image made writable again to fold layers into it
 * (qcow2_writer_reopen, for prune's merge).
 *
 * Copy-on-write of the metadata, so that a merge costs what it changes,
 * not the size of the image: the old image's L2 tables are read only
 * where the merge writes (qcow2_reopen_load), its refcount blocks only
 * where a refcount changes or a free cluster is looked for.  At finish,
 * each changed L2 table and refcount block goes to a cluster the old
 * image does not use, with a new L1 table and refcount table (a cluster
 * or so each); every other table stays where it is and is pointed at
 * again.  The old header still points at the old tables, all intact,
 * until the caller writes the new one; the old tables' clusters are
 * freed in the new refcounts only.
 *
 * Free clusters are those the old refcounts say are unused (refcount 0,
 * as QEMU allocates them), looked for in the refcount blocks read
 * anyway: those that count the old L1 and refcount tables (which every
 * merge replaces, so earlier merges left their freed tables there) and
 * the block of the end of the file (where a crashed merge left what it
 * appended).  Without one, a cluster is appended.  A cluster the old
 * metadata or a loaded table uses but whose refcount is 0 is damage:
 * the merge fails rather than write over it.
 *
 * Refcount order 4 only (16-bit refcounts, what qbak and qemu-img write),
 * version 3, no snapshots, clean (no dirty bit, so the refcounts are
 * exact). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/qcow2.h"
#include "io/qcow2_format.h"
#include "io/qcow2_writer_int.h"

/* What a host cluster is to the merge (one byte each, for the clusters
 * of the file and those appended). */
enum use {
    USE_UNKNOWN,  /* not seen in the metadata read: free if refcount 0 */
    USE_OLD_DATA, /* a data cluster of a loaded table of the old image */
    USE_OLD_META, /* the old header, an L1, L2, refcount table or block */
    USE_NEW,      /* taken by this merge */
};

enum table_state { TABLE_UNLOADED, TABLE_LOADED, TABLE_CHANGED };

struct rblock {
    uint16_t *old;     /* refcounts as the old image says */
    uint16_t *cur;     /* as the new image will say */
    uint64_t new_host; /* changed: where it goes, 0 until placed */
    bool dirty;
};

struct qcow2_reopen {
    const char *name;       /* borrowed from the chain */
    uint64_t file_clusters; /* clusters of the file when reopened */
    uint64_t *old_l1;       /* host order */
    uint8_t *table;         /* enum table_state per L1 index */
    uint64_t old_l1_offset, old_l1_clusters;
    uint64_t *rt; /* old refcount table entries, host order */
    uint64_t rt_n;
    uint64_t old_rt_offset, old_rt_clusters;
    struct rblock **blocks; /* per refcount block index, NULL: not read */
    uint64_t n_blocks;
    uint64_t per_block; /* refcounts per block */
    uint8_t *use;       /* enum use per host cluster */
    uint64_t use_n;
    uint64_t scan;      /* the free-cluster search goes on from here */
    GArray *freed;      /* clusters whose refcount went 1 -> 0 */
    GArray *zero_alloc; /* (L1 index, host cluster) of zero clusters with
                           a cluster still allocated */
};

static bool
read_at(struct qcow2_writer *w, void *buf, size_t len, uint64_t off,
        const char *what, GError **errp)
{
    ssize_t n = pread(w->fd, buf, len, (off_t)off);

    if (n == (ssize_t)len) {
        return true;
    }
    int err = n < 0 ? errno : EIO;
    g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                "%s: reading %s at %" PRIu64 ": %s", w->ro->name, what, off,
                n < 0 ? g_strerror(err) : "short read");
    return false;
}

static enum use
use_get(const struct qcow2_reopen *ro, uint64_t idx)
{
    return idx < ro->use_n ? (enum use)ro->use[idx] : USE_UNKNOWN;
}

static void
use_set(struct qcow2_reopen *ro, uint64_t idx, enum use u)
{
    if (idx >= ro->use_n) {
        uint64_t n = MAX(idx + 1, ro->use_n * 2);
        ro->use = g_realloc(ro->use, n);
        memset(ro->use + ro->use_n, 0, n - ro->use_n);
        ro->use_n = n;
    }
    ro->use[idx] = (uint8_t)u;
}

/* A cluster of the old metadata: inside the file, aligned, not the
 * header unless it is the header. */
static bool
mark_meta(struct qcow2_writer *w, uint64_t off, const char *what, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    uint64_t idx = off >> w->cluster_bits;

    if ((off & (w->cluster_size - 1)) != 0 || idx >= ro->file_clusters ||
        (idx == 0 && off != 0)) {
        return qcow2_corrupt(errp, ro->name,
                             "%s at 0x%" PRIx64 " outside the file", what, off);
    }
    use_set(ro, idx, USE_OLD_META);
    return true;
}

/* Refcount block b, read (or zero where the old image has none). */
static struct rblock *
block_get(struct qcow2_writer *w, uint64_t b, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    struct rblock *rb;

    if (b >= ro->n_blocks) {
        uint64_t n = MAX(b + 1, ro->n_blocks * 2);
        ro->blocks = g_renew(struct rblock *, ro->blocks, n);
        memset(ro->blocks + ro->n_blocks, 0,
               (n - ro->n_blocks) * sizeof(ro->blocks[0]));
        ro->n_blocks = n;
    }
    if (ro->blocks[b] != NULL) {
        return ro->blocks[b];
    }
    rb = g_new0(struct rblock, 1);
    rb->old = g_new0(uint16_t, ro->per_block);
    if (b < ro->rt_n && ro->rt[b] != 0) {
        g_autofree uint8_t *buf = g_malloc(w->cluster_size);

        if (!read_at(w, buf, (size_t)w->cluster_size, ro->rt[b],
                     "refcount block", errp)) {
            g_free(rb->old);
            g_free(rb);
            return NULL;
        }
        for (uint64_t k = 0; k < ro->per_block; k++) {
            rb->old[k] = (uint16_t)(buf[2 * k] << 8 | buf[2 * k + 1]);
        }
    }
    rb->cur = g_memdup2(rb->old, ro->per_block * sizeof(uint16_t));
    ro->blocks[b] = rb;
    return rb;
}

static bool
ref_set(struct qcow2_writer *w, uint64_t idx, uint16_t v, GError **errp)
{
    struct rblock *rb = block_get(w, idx / w->ro->per_block, errp);

    if (rb == NULL) {
        return false;
    }
    rb->cur[idx % w->ro->per_block] = v;
    rb->dirty = true;
    return true;
}

/* A cluster the new image no longer references: refcount 1 -> 0. */
static bool
free_cluster(struct qcow2_writer *w, uint64_t idx, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    struct rblock *rb = block_get(w, idx / ro->per_block, errp);
    uint16_t *r;

    if (rb == NULL) {
        return false;
    }
    r = &rb->cur[idx % ro->per_block];
    if (*r != 1) {
        return qcow2_corrupt(
            errp, ro->name,
            "cluster %" PRIu64 " has refcount %u where 1 is due", idx, *r);
    }
    *r = 0;
    rb->dirty = true;
    g_array_append_val(ro->freed, idx);
    return true;
}

/* Whether host cluster idx (in a block read) may be taken. */
static bool
slot_free(struct qcow2_reopen *ro, uint64_t idx, bool *is_free, GError **errp)
{
    const struct rblock *rb = ro->blocks[idx / ro->per_block];
    uint64_t k = idx % ro->per_block;
    enum use u = use_get(ro, idx);

    *is_free = false;
    if (idx == 0 || rb->old[k] != 0 || rb->cur[k] != 0 || u == USE_NEW) {
        return true;
    }
    if (u != USE_UNKNOWN) {
        return qcow2_corrupt(errp, ro->name,
                             "cluster %" PRIu64 " is in use but has refcount 0",
                             idx);
    }
    *is_free = true;
    return true;
}

static bool
block_read(const struct qcow2_reopen *ro, uint64_t b)
{
    return b < ro->n_blocks && ro->blocks[b] != NULL;
}

/* n consecutive free clusters of the file (in blocks read), first at
 * *idx; *found false when there are none. */
static bool
find_free(struct qcow2_writer *w, uint64_t n, uint64_t *idx, bool *found,
          GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    uint64_t pos = n == 1 ? ro->scan : 0, run = 0;

    *found = false;
    while (pos < ro->file_clusters) {
        uint64_t b = pos / ro->per_block;
        bool is_free = false;

        if (!block_read(ro, b)) {
            while (b < ro->n_blocks && !block_read(ro, b)) {
                b++;
            }
            pos = b < ro->n_blocks ? b * ro->per_block : ro->file_clusters;
            run = 0;
            continue;
        }
        if (!slot_free(ro, pos, &is_free, errp)) {
            return false;
        }
        run = is_free ? run + 1 : 0;
        pos++;
        if (run == n) {
            *idx = pos - n;
            *found = true;
            break;
        }
    }
    if (n == 1) {
        ro->scan = pos;
    }
    return true;
}

/* n consecutive clusters taken (refcount 1), first at *idx: free ones
 * of the file, or appended. */
static bool
take(struct qcow2_writer *w, uint64_t n, uint64_t *idx, GError **errp)
{
    bool found = false;

    if (!find_free(w, n, idx, &found, errp)) {
        return false;
    }
    if (!found) {
        *idx = w->next_host_cluster;
        w->next_host_cluster += n;
    }
    for (uint64_t k = 0; k < n; k++) {
        use_set(w->ro, *idx + k, USE_NEW);
        if (!ref_set(w, *idx + k, 1, errp)) {
            return false;
        }
    }
    return true;
}

bool
qcow2_reopen_alloc(struct qcow2_writer *w, uint64_t *host, GError **errp)
{
    uint64_t idx = 0;

    if (!take(w, 1, &idx, errp)) {
        return false;
    }
    *host = idx << w->cluster_bits;
    return true;
}

void
qcow2_reopen_table_changed(struct qcow2_writer *w, uint64_t i)
{
    w->ro->table[i] = TABLE_CHANGED;
}

/* L2 table i of the old image into w's mapping. */
static bool
load_table(struct qcow2_writer *w, uint64_t i, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    uint64_t l2_off = ro->old_l1[i] & QCOW2_L1E_OFFSET_MASK;
    uint64_t valid = qcow2w_table_valid_entries(w, i);
    uint64_t first = i << w->l2_bits;
    g_autofree uint8_t *buf = NULL;
    struct l2_table *t;

    ro->table[i] = TABLE_LOADED;
    if (l2_off == 0) {
        return true; /* all unallocated: w->l1[i] stays NULL */
    }
    buf = g_malloc(w->cluster_size);
    if (!read_at(w, buf, (size_t)w->cluster_size, l2_off, "L2 table", errp)) {
        return false;
    }
    t = g_malloc0(sizeof(*t) + (w->cluster_size / 8) * sizeof(t->e[0]));
    w->l1[i] = t;
    for (uint64_t k = 0; k < valid; k++) {
        uint64_t e = qcow2_load_be64(buf + k * 8);
        uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
        uint64_t idx = off >> w->cluster_bits;

        if (e & (QCOW2_OFLAG_COMPRESSED | QCOW2_L2E_RESERVED_MASK)) {
            return qcow2_corrupt(errp, ro->name,
                                 "guest cluster %" PRIu64
                                 " is compressed or has reserved bits set",
                                 first + k);
        }
        if (off == 0) {
            if (e & QCOW2_OFLAG_ZERO) {
                t->e[k] = ENTRY_ZERO;
                t->n_zero++;
            }
            continue;
        }
        if ((off & (w->cluster_size - 1)) != 0 || idx >= ro->file_clusters ||
            use_get(ro, idx) != USE_UNKNOWN) {
            return qcow2_corrupt(errp, ro->name,
                                 "guest cluster %" PRIu64
                                 " at host cluster %" PRIu64
                                 " overlaps other data or metadata, or lies "
                                 "outside the file",
                                 first + k, idx);
        }
        use_set(ro, idx, USE_OLD_DATA);
        if (e & QCOW2_OFLAG_ZERO) {
            /* Reads as zero but keeps its cluster: if the table is
             * written again, the cluster is freed. */
            uint64_t pair[2] = {i, idx};
            g_array_append_vals(ro->zero_alloc, pair, 2);
            t->e[k] = ENTRY_ZERO;
            t->n_zero++;
        } else {
            t->e[k] = off;
        }
    }
    return true;
}

bool
qcow2_reopen_load(struct qcow2_writer *w, uint64_t off, uint64_t len,
                  GError **errp)
{
    unsigned reach_bits = w->cluster_bits + w->l2_bits;

    if (len == 0) {
        return true;
    }
    for (uint64_t i = off >> reach_bits; i <= (off + len - 1) >> reach_bits;
         i++) {
        if (w->ro->table[i] == TABLE_UNLOADED && !load_table(w, i, errp)) {
            w->failed = true;
            return false;
        }
    }
    return true;
}

bool
qcow2_writer_load_tables(struct qcow2_writer *w, uint64_t off, uint64_t len,
                         GError **errp)
{
    if (w->ro == NULL) {
        return true;
    }
    if (off > w->virtual_size || len > w->virtual_size - off) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "qcow2: tables of %" PRIu64 "+%" PRIu64
                    " past virtual size %" PRIu64,
                    off, len, w->virtual_size);
        return false;
    }
    return qcow2_reopen_load(w, off, len, errp);
}

bool
qcow2_writer_in_place(const struct qcow2_writer *w, uint64_t off)
{
    uint64_t c = off >> w->cluster_bits;
    uint64_t i = c >> w->l2_bits;
    const struct l2_table *t;
    uint64_t e;

    if (w->ro == NULL || c >= w->n_clusters) {
        return false;
    }
    /* An answer for a table not read would change once it is. */
    g_assert(w->ro->table[i] != TABLE_UNLOADED);
    t = w->l1[i];
    if (t == NULL || t == L2_ALL_ZERO) {
        return false;
    }
    e = t->e[c & ((UINT64_C(1) << w->l2_bits) - 1)];
    return e != ENTRY_UNSET && e != ENTRY_ZERO &&
           use_get(w->ro, e >> w->cluster_bits) == USE_OLD_DATA;
}

/* Reads the old header's tables and checks that the image is one this
 * file can change in place of its refcounts. */
static bool
reopen_header(struct qcow2_writer *w, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    uint8_t h[QCOW2_V3_HEADER_LEN];
    uint32_t l1_size;
    g_autofree uint8_t *buf = NULL;
    uint64_t bytes;

    if (!read_at(w, h, sizeof(h), 0, "header", errp)) {
        return false;
    }
    if (qcow2_load_be32(h + 4) != 3 ||
        qcow2_load_be32(h + QCOW2_HDR_REFCOUNT_ORDER) != QCOW2_REFCOUNT_ORDER ||
        qcow2_load_be32(h + 60) != 0 || /* nb_snapshots */
        qcow2_load_be64(h + QCOW2_HDR_INCOMPAT) != 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: only a clean qcow2 v3 image with 16-bit refcounts "
                    "and no snapshots can be merged into",
                    ro->name);
        return false;
    }
    l1_size = qcow2_load_be32(h + QCOW2_HDR_L1_SIZE);
    if (l1_size != w->l1_size) {
        return qcow2_corrupt(errp, ro->name,
                             "L1 table of %u entries, %" PRIu64 " expected",
                             l1_size, w->l1_size);
    }
    ro->old_l1_offset = qcow2_load_be64(h + QCOW2_HDR_L1_OFFSET);
    ro->old_l1_clusters =
        (w->l1_size * 8 + w->cluster_size - 1) >> w->cluster_bits;
    ro->old_rt_offset = qcow2_load_be64(h + QCOW2_HDR_REFTABLE_OFFSET);
    ro->old_rt_clusters = qcow2_load_be32(h + QCOW2_HDR_REFTABLE_CLUSTERS);
    if (ro->old_rt_clusters == 0 ||
        ro->old_rt_clusters << w->cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
        return qcow2_corrupt(errp, ro->name,
                             "refcount table of %" PRIu64 " clusters",
                             ro->old_rt_clusters);
    }
    if (!mark_meta(w, 0, "header", errp)) {
        return false;
    }
    for (uint64_t k = 0; k < ro->old_l1_clusters; k++) {
        if (!mark_meta(w, ro->old_l1_offset + (k << w->cluster_bits),
                       "L1 table", errp)) {
            return false;
        }
    }
    for (uint64_t k = 0; k < ro->old_rt_clusters; k++) {
        if (!mark_meta(w, ro->old_rt_offset + (k << w->cluster_bits),
                       "refcount table", errp)) {
            return false;
        }
    }
    bytes = w->l1_size * 8;
    buf = g_malloc(MAX(bytes, 1));
    if (!read_at(w, buf, (size_t)bytes, ro->old_l1_offset, "L1 table", errp)) {
        return false;
    }
    ro->old_l1 = g_new(uint64_t, w->l1_size);
    for (uint64_t i = 0; i < w->l1_size; i++) {
        uint64_t e = qcow2_load_be64(buf + i * 8);

        ro->old_l1[i] = e;
        if (e & QCOW2_L1E_RESERVED_MASK) {
            return qcow2_corrupt(errp, ro->name,
                                 "L1 entry %" PRIu64 " has reserved bits", i);
        }
        if ((e & QCOW2_L1E_OFFSET_MASK) != 0 &&
            !mark_meta(w, e & QCOW2_L1E_OFFSET_MASK, "L2 table", errp)) {
            return false;
        }
    }
    ro->rt_n = (ro->old_rt_clusters << w->cluster_bits) / 8;
    bytes = ro->rt_n * 8;
    buf = g_realloc(buf, bytes);
    if (!read_at(w, buf, (size_t)bytes, ro->old_rt_offset, "refcount table",
                 errp)) {
        return false;
    }
    ro->rt = g_new(uint64_t, ro->rt_n);
    for (uint64_t b = 0; b < ro->rt_n; b++) {
        ro->rt[b] = qcow2_load_be64(buf + b * 8);
        if (ro->rt[b] != 0 &&
            !mark_meta(w, ro->rt[b], "refcount block", errp)) {
            return false;
        }
    }
    return true;
}

struct qcow2_writer *
qcow2_writer_reopen(int fd, struct qcow2_reader *chain, unsigned depth,
                    GError **errp)
{
    struct stat st, layer_st;
    struct qcow2_writer *w;
    struct qcow2_reopen *ro;
    const char *name = qcow2_reader_layer_name(chain, depth);

    if (fstat(fd, &st) < 0 ||
        fstat(qcow2_reader_layer_fd(chain, depth), &layer_st) < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: fstat: %s", name, g_strerror(err));
        return NULL;
    }
    if (st.st_dev != layer_st.st_dev || st.st_ino != layer_st.st_ino) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: the file to write is not the image read", name);
        return NULL;
    }
    w = qcow2_writer_new(fd, qcow2_reader_layer_virtual_size(chain, depth),
                         qcow2_reader_layer_cluster_bits(chain, depth),
                         qcow2_reader_layer_backing_file(chain, depth), NULL,
                         errp);
    if (w == NULL) {
        return NULL;
    }
    w->no_sums = true;
    ro = w->ro = g_new0(struct qcow2_reopen, 1);
    ro->name = name;
    ro->file_clusters =
        ((uint64_t)st.st_size + w->cluster_size - 1) >> w->cluster_bits;
    ro->table = g_malloc0(w->l1_size);
    ro->per_block = w->cluster_size / 2;
    ro->freed = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    ro->zero_alloc = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    w->next_host_cluster = MAX(ro->file_clusters, 1);
    /* The blocks read now are where free clusters are looked for: those
     * of the old L1 and refcount tables, and that of the file's end. */
    if (!reopen_header(w, errp) ||
        block_get(w, (ro->old_l1_offset >> w->cluster_bits) / ro->per_block,
                  errp) == NULL ||
        block_get(w, (ro->old_rt_offset >> w->cluster_bits) / ro->per_block,
                  errp) == NULL ||
        block_get(w, (w->next_host_cluster - 1) / ro->per_block, errp) ==
            NULL) {
        g_prefix_error(errp, "reopening for a merge: ");
        qcow2_writer_free(w);
        return NULL;
    }
    return w;
}

/* Changed L2 tables to fresh clusters; the L1 table (all of it) too. */
static bool
finish_l2_l1(struct qcow2_writer *w, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    uint64_t l1_clusters = ro->old_l1_clusters, l1_idx = 0;
    g_autofree uint8_t *buf = g_malloc(w->cluster_size);
    g_autofree uint8_t *l1 = g_malloc0(l1_clusters << w->cluster_bits);

    for (uint64_t i = 0; i < w->l1_size; i++) {
        uint64_t old = ro->old_l1[i] & QCOW2_L1E_OFFSET_MASK;
        uint64_t e = ro->old_l1[i], host = 0;
        bool any = false;

        if (ro->table[i] == TABLE_CHANGED) {
            qcow2w_encode_table(w, i, buf, &any);
            e = 0;
            if (any) {
                if (!qcow2_reopen_alloc(w, &host, errp) ||
                    !qcow2w_pwrite(w, buf, (size_t)w->cluster_size, host,
                                   "L2 table", errp)) {
                    return false;
                }
                e = host | QCOW2_OFLAG_COPIED;
            }
            if (old != 0 && !free_cluster(w, old >> w->cluster_bits, errp)) {
                return false;
            }
        }
        qcow2_store_be64(l1 + i * 8, e);
    }
    for (guint k = 0; k < ro->zero_alloc->len; k += 2) {
        uint64_t i = g_array_index(ro->zero_alloc, uint64_t, k);

        if (ro->table[i] == TABLE_CHANGED &&
            !free_cluster(w, g_array_index(ro->zero_alloc, uint64_t, k + 1),
                          errp)) {
            return false;
        }
    }
    for (guint k = 0; k < w->orphans->len; k++) {
        if (!free_cluster(w, g_array_index(w->orphans, uint64_t, k), errp)) {
            return false;
        }
    }
    g_array_set_size(w->orphans, 0);
    for (uint64_t k = 0; k < l1_clusters; k++) {
        if (!free_cluster(w, (ro->old_l1_offset >> w->cluster_bits) + k,
                          errp)) {
            return false;
        }
    }
    if (!take(w, l1_clusters, &l1_idx, errp) ||
        !qcow2w_pwrite(w, l1, (size_t)(l1_clusters << w->cluster_bits),
                       l1_idx << w->cluster_bits, "L1 table", errp)) {
        return false;
    }
    w->l1_offset = l1_idx << w->cluster_bits;
    return true;
}

/* Places every changed refcount block and the refcount table.  Placing
 * one changes refcounts, which may change another block (or need a new
 * one, or a longer table): round after round until nothing moves. */
static bool
place_refcounts(struct qcow2_writer *w, uint64_t *rt_idx, uint64_t *rt_clusters,
                uint64_t *rt_entries, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    bool again = true;

    *rt_idx = *rt_clusters = 0;
    for (uint64_t k = 0; k < ro->old_rt_clusters; k++) {
        if (!free_cluster(w, (ro->old_rt_offset >> w->cluster_bits) + k,
                          errp)) {
            return false;
        }
    }
    while (again) {
        uint64_t entries = ro->rt_n, need;

        again = false;
        for (uint64_t b = 0; b < ro->n_blocks; b++) {
            struct rblock *rb = ro->blocks[b];
            uint64_t idx = 0;

            if (rb == NULL || !rb->dirty) {
                continue;
            }
            entries = MAX(entries, b + 1);
            if (rb->new_host != 0) {
                continue;
            }
            if (!take(w, 1, &idx, errp)) {
                return false;
            }
            rb->new_host = idx << w->cluster_bits;
            if (b < ro->rt_n && ro->rt[b] != 0 &&
                !free_cluster(w, ro->rt[b] >> w->cluster_bits, errp)) {
                return false;
            }
            again = true;
        }
        need = (entries * 8 + w->cluster_size - 1) >> w->cluster_bits;
        if (need << w->cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSPC,
                        "%s: image too large for its refcount table", ro->name);
            return false;
        }
        if (need > *rt_clusters) {
            /* A longer table elsewhere; the shorter one taken before is
             * left unreferenced (refcount 0). */
            for (uint64_t k = 0; k < *rt_clusters; k++) {
                if (!ref_set(w, *rt_idx + k, 0, errp)) {
                    return false;
                }
            }
            if (!take(w, need, rt_idx, errp)) {
                return false;
            }
            *rt_clusters = need;
            again = true;
        }
        *rt_entries = entries;
    }
    return true;
}

bool
qcow2_reopen_finish_tables(struct qcow2_writer *w, GError **errp)
{
    struct qcow2_reopen *ro = w->ro;
    uint64_t rt_idx, rt_clusters, rt_entries;
    g_autofree uint8_t *buf = g_malloc(w->cluster_size);
    g_autofree uint8_t *rt = NULL;
    struct stat st;

    if (!finish_l2_l1(w, errp) ||
        !place_refcounts(w, &rt_idx, &rt_clusters, &rt_entries, errp)) {
        return false;
    }
    rt = g_malloc0(rt_clusters << w->cluster_bits);
    for (uint64_t b = 0; b < rt_entries; b++) {
        const struct rblock *rb = b < ro->n_blocks ? ro->blocks[b] : NULL;
        uint64_t e = b < ro->rt_n ? ro->rt[b] : 0;

        if (rb != NULL && rb->dirty) {
            for (uint64_t k = 0; k < ro->per_block; k++) {
                qcow2_store_be16(buf + 2 * k, rb->cur[k]);
            }
            if (!qcow2w_pwrite(w, buf, (size_t)w->cluster_size, rb->new_host,
                               "refcount block", errp)) {
                return false;
            }
            e = rb->new_host;
        }
        qcow2_store_be64(rt + b * 8, e);
    }
    if (!qcow2w_pwrite(w, rt, (size_t)(rt_clusters << w->cluster_bits),
                       rt_idx << w->cluster_bits, "refcount table", errp)) {
        return false;
    }
    /* Every cluster taken lies inside the file (all were written, but a
     * free one may sit past a shorter file's end). */
    uint64_t file_size = w->next_host_cluster << w->cluster_bits;
    if (fstat(w->fd, &st) < 0 || ((uint64_t)st.st_size < file_size &&
                                  ftruncate(w->fd, (off_t)file_size) < 0)) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: extending to %" PRIu64 " bytes: %s", ro->name,
                    file_size, g_strerror(err));
        return false;
    }
    w->reftable_offset = rt_idx << w->cluster_bits;
    w->reftable_clusters = rt_clusters;
    w->file_size = MAX(file_size, (uint64_t)st.st_size);
    return true;
}

static int
compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

void
qcow2_writer_punch_free(struct qcow2_writer *w)
{
    GArray *freed = w->ro != NULL ? w->ro->freed : NULL;
    const uint64_t *idx;
    guint n;

    if (!w->finished || freed == NULL) {
        return;
    }
    g_array_sort(freed, compare_u64);
    idx = (const uint64_t *)(void *)freed->data;
    n = freed->len;
    for (guint i = 0; i < n;) {
        guint j = i + 1;

        while (j < n && idx[j] <= idx[j - 1] + 1) {
            j++;
        }
        /* Best effort: a file system without hole punching keeps them. */
        (void)fallocate(w->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        (off_t)(idx[i] << w->cluster_bits),
                        (off_t)((idx[j - 1] - idx[i] + 1) << w->cluster_bits));
        i = j;
    }
}

void
qcow2_reopen_free(struct qcow2_reopen *ro)
{
    if (ro == NULL) {
        return;
    }
    for (uint64_t b = 0; b < ro->n_blocks; b++) {
        if (ro->blocks[b] != NULL) {
            g_free(ro->blocks[b]->old);
            g_free(ro->blocks[b]->cur);
            g_free(ro->blocks[b]);
        }
    }
    g_free(ro->blocks);
    g_free(ro->old_l1);
    g_free(ro->table);
    g_free(ro->rt);
    g_free(ro->use);
    g_array_unref(ro->freed);
    g_array_unref(ro->zero_alloc);
    g_free(ro);
}

/* qcow2 chain reader, the data side: which layer holds each guest byte
 * (L2 tables, cached), and reads through the chain.  Opening and the
 * headers: qcow2_reader.c; the same distrust of every byte read holds. */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <unistd.h>

#include "io/qcow2.h"
#include "io/qcow2_format.h"
#include "io/qcow2_reader_int.h"
#include "io/qcow2_sums.h"

/* The L2 table at host offset off, from the cache or the file. */
static const uint64_t *
layer_l2(struct qcow2_layer *l, uint64_t off, GError **errp)
{
    struct l2_cache_entry *victim = &l->cache[0];

    l->use_clock++;
    for (unsigned i = 0; i < L2_CACHE_SIZE; i++) {
        struct l2_cache_entry *c = &l->cache[i];
        if (c->offset == off) {
            c->last_use = l->use_clock;
            return c->table;
        }
        if (c->last_use < victim->last_use) {
            victim = c;
        }
    }
    if ((off & (l->cluster_size - 1)) != 0) {
        qcow2_corrupt(errp, l->name,
                      "L2 table offset 0x%" PRIx64 " not aligned", off);
        return NULL;
    }
    if (off > l->file_size || l->cluster_size > l->file_size - off) {
        qcow2_corrupt(errp, l->name,
                      "L2 table offset 0x%" PRIx64 " past end of file", off);
        return NULL;
    }
    if (victim->table == NULL) {
        victim->table = g_malloc(l->cluster_size);
    }
    victim->offset = 0;
    if (!qcow2_read_exact(l->fd, victim->table, l->cluster_size, off, l->name,
                          "L2 table", errp)) {
        return NULL;
    }
    for (uint64_t i = 0; i < (l->cluster_size >> 3); i++) {
        victim->table[i] = GUINT64_FROM_BE(victim->table[i]);
    }
    victim->offset = off;
    victim->last_use = l->use_clock;
    return victim->table;
}

/* Describe guest cluster c of layer l: its kind and, for data, where it
 * starts in the file. */
static bool
layer_cluster(struct qcow2_layer *l, uint64_t c, enum cluster_kind *kind,
              uint64_t *host, GError **errp)
{
    uint64_t l1_index = c >> l->l2_bits;
    uint64_t l1e = l->l1[l1_index];

    if (l1e & QCOW2_L1E_RESERVED_MASK) {
        return qcow2_corrupt(errp, l->name,
                             "L1 entry %" PRIu64 " has reserved bits set",
                             l1_index);
    }
    uint64_t l2_offset = l1e & QCOW2_L1E_OFFSET_MASK;
    if (l2_offset == 0) {
        *kind = CLUSTER_UNALLOCATED;
        return true;
    }
    const uint64_t *l2 = layer_l2(l, l2_offset, errp);
    if (l2 == NULL) {
        return false;
    }
    uint64_t e = l2[c & ((UINT64_C(1) << l->l2_bits) - 1)];
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return qcow2_corrupt(
            errp, l->name,
            "guest cluster %" PRIu64 " is compressed (not supported)", c);
    }
    if (e & QCOW2_L2E_RESERVED_MASK) {
        return qcow2_corrupt(
            errp, l->name,
            "L2 entry for guest cluster %" PRIu64 " has reserved bits set", c);
    }
    uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
    if (off & (l->cluster_size - 1)) {
        return qcow2_corrupt(
            errp, l->name,
            "guest cluster %" PRIu64 " at unaligned offset 0x%" PRIx64, c, off);
    }
    if (e & QCOW2_OFLAG_ZERO) {
        *kind = CLUSTER_ZERO;
    } else if (off == 0) {
        *kind = CLUSTER_UNALLOCATED;
    } else if (off >= l->file_size) {
        return qcow2_corrupt(errp, l->name,
                             "guest cluster %" PRIu64 " at 0x%" PRIx64
                             " past end of file",
                             c, off);
    } else {
        *kind = CLUSTER_DATA;
        *host = off;
    }
    return true;
}

/* The part of [off, off+max_len) that lies in off's cluster, as one run.
 * A data cluster that the file ends inside reads as zero past the end, as
 * it does in QEMU. */
static bool
layer_piece(struct qcow2_layer *l, uint64_t off, uint64_t max_len,
            struct layer_run *run, GError **errp)
{
    uint64_t in_off = off & (l->cluster_size - 1);
    uint64_t l1_index = off >> (l->cluster_bits + l->l2_bits);
    uint64_t host = 0;

    if (l->l1[l1_index] == 0) {
        /* A whole table's reach at once: walking a sparse 1 TiB disk
         * costs its L1 entries, not its clusters. */
        uint64_t reach_end = (l1_index + 1) << (l->cluster_bits + l->l2_bits);
        run->kind = CLUSTER_UNALLOCATED;
        run->len = MIN(max_len, reach_end - off);
        return true;
    }
    run->len = MIN(max_len, l->cluster_size - in_off);
    if (!layer_cluster(l, off >> l->cluster_bits, &run->kind, &host, errp)) {
        return false;
    }
    if (run->kind == CLUSTER_DATA) {
        host += in_off;
        if (host >= l->file_size) {
            run->kind = CLUSTER_ZERO;
        } else {
            run->host_offset = host;
            run->len = MIN(run->len, l->file_size - host);
        }
    }
    return true;
}

/* Longest run at [off, off+max_len) of one kind in layer l alone
 * (off + max_len <= the layer's virtual size). */
static bool
layer_run(struct qcow2_layer *l, uint64_t off, uint64_t max_len,
          struct layer_run *run, GError **errp)
{
    if (!layer_piece(l, off, max_len, run, errp)) {
        return false;
    }
    while (run->len < max_len) {
        struct layer_run next;

        if (!layer_piece(l, off + run->len, max_len - run->len, &next, errp)) {
            return false;
        }
        if (next.kind != run->kind ||
            (run->kind == CLUSTER_DATA &&
             next.host_offset != run->host_offset + run->len)) {
            break;
        }
        run->len += next.len;
    }
    return true;
}

/* One answer through the chain: the top layer that has the bytes decides,
 * and an unallocated run narrows the question asked of the layer below. */
static bool
chain_map_once(struct qcow2_reader *r, uint64_t off, uint64_t max_len,
               struct qcow2_map *m, GError **errp)
{
    uint64_t len = max_len;

    for (unsigned depth = 0;; depth++) {
        struct qcow2_layer *l = r->layers[depth];
        struct layer_run run;

        m->depth = depth;
        m->fd = -1;
        m->direct_fd = -1;
        m->host_offset = 0;
        if (off >= l->virtual_size) {
            /* QEMU reads a backing file as zero past its end. */
            m->kind = QCOW2_MAP_ZERO;
            m->len = len;
            return true;
        }
        len = MIN(len, l->virtual_size - off);
        if (!layer_run(l, off, len, &run, errp)) {
            return false;
        }
        switch (run.kind) {
        case CLUSTER_DATA:
            m->kind = QCOW2_MAP_DATA;
            m->fd = l->fd;
            m->direct_fd = qcow2_layer_direct_fd(l);
            m->host_offset = run.host_offset;
            m->len = run.len;
            return true;
        case CLUSTER_ZERO:
            m->kind = QCOW2_MAP_ZERO;
            m->len = run.len;
            return true;
        case CLUSTER_UNALLOCATED:
            if (depth + 1 == r->n_layers) {
                m->kind = QCOW2_MAP_ZERO;
                m->len = run.len;
                return true;
            }
            len = run.len;
            break;
        }
    }
}

bool
qcow2_reader_layer_map(struct qcow2_reader *r, unsigned depth, uint64_t off,
                       uint64_t max_len, struct qcow2_layer_run *run,
                       GError **errp)
{
    struct qcow2_layer *l = r->layers[depth];
    struct layer_run lr;

    if (off >= l->virtual_size || max_len == 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: layer map of %" PRIu64 "+%" PRIu64
                    " outside virtual size %" PRIu64,
                    l->name, off, max_len, l->virtual_size);
        return false;
    }
    if (!layer_run(l, off, MIN(max_len, l->virtual_size - off), &lr, errp)) {
        return false;
    }
    run->kind = lr.kind == CLUSTER_DATA   ? QCOW2_LAYER_DATA
                : lr.kind == CLUSTER_ZERO ? QCOW2_LAYER_ZERO
                                          : QCOW2_LAYER_UNALLOCATED;
    run->host_offset = lr.kind == CLUSTER_DATA ? lr.host_offset : 0;
    run->len = lr.len;
    return true;
}

bool
qcow2_reader_check_cluster(const struct qcow2_reader *r, unsigned depth,
                           uint64_t c, const void *buf, GError **errp)
{
    const struct qcow2_layer *l = r->layers[depth];
    const struct qcow2_sum *e;

    if (l->sums == NULL) {
        return true;
    }
    e = qcow2_sums_find(l->sums, c);
    if (e == NULL || e->zero) {
        return qcow2_corrupt(errp, l->name,
                             "guest offset %" PRIu64
                             ": data cluster the checksums do not list as data",
                             c << l->cluster_bits);
    }
    if (qcow2_sums_hash(buf, l->cluster_size) != e->hash) {
        return qcow2_corrupt(errp, l->name,
                             "guest offset %" PRIu64 ": checksum mismatch",
                             c << l->cluster_bits);
    }
    return true;
}

bool
qcow2_reader_map(struct qcow2_reader *r, uint64_t off, uint64_t max_len,
                 struct qcow2_map *m, GError **errp)
{
    uint64_t size = r->layers[0]->virtual_size;

    if (off >= size || max_len == 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: map of %" PRIu64 "+%" PRIu64
                    " outside virtual size %" PRIu64,
                    r->layers[0]->name, off, max_len, size);
        return false;
    }
    max_len = MIN(max_len, size - off);
    if (!chain_map_once(r, off, max_len, m, errp)) {
        return false;
    }
    /* Zero answers from different layers (a zero cluster here, the end of
     * a shorter backing file there) are one run to the caller. */
    while (m->len < max_len) {
        struct qcow2_map next;

        if (!chain_map_once(r, off + m->len, max_len - m->len, &next, errp)) {
            return false;
        }
        if (next.kind != m->kind ||
            (m->kind == QCOW2_MAP_DATA &&
             (next.fd != m->fd ||
              next.host_offset != m->host_offset + m->len))) {
            break;
        }
        m->len += next.len;
    }
    return true;
}

bool
qcow2_reader_pread(struct qcow2_reader *r, uint64_t off, void *buf, size_t len,
                   GError **errp)
{
    uint8_t *p = buf;
    uint64_t size = r->layers[0]->virtual_size;

    if (off > size || len > size - off) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: read of %" PRIu64 "+%zu outside virtual size %" PRIu64,
                    r->layers[0]->name, off, len, size);
        return false;
    }
    while (len > 0) {
        struct qcow2_map m;

        if (!qcow2_reader_map(r, off, len, &m, errp)) {
            return false;
        }
        if (m.kind == QCOW2_MAP_ZERO) {
            memset(p, 0, (size_t)m.len);
        } else if (!qcow2_read_exact(m.fd, p, (size_t)m.len, m.host_offset,
                                     r->layers[m.depth]->name, "data cluster",
                                     errp)) {
            return false;
        }
        p += m.len;
        off += m.len;
        len -= (size_t)m.len;
    }
    return true;
}

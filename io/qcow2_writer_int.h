/* The qcow2 writer's insides, shared by io/qcow2_writer.c (a new layer),
 * io/qcow2_writer_finish.c and io/qcow2_reopen.c (an existing image made
 * writable for a merge). Private to io/. */
#ifndef QBAK_IO_QCOW2_WRITER_INT_H
#define QBAK_IO_QCOW2_WRITER_INT_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "io/qcow2.h"

/* In-memory L2 entry: ENTRY_UNSET, ENTRY_ZERO, or the host offset of a
 * data cluster (cluster-aligned and >= one cluster, so never 0 or 1). */
#define ENTRY_UNSET UINT64_C(0)
#define ENTRY_ZERO UINT64_C(1)

/* Header, backing format extension (8 + "qcow2" padded to 8), end marker. */
#define HEADER_BYTES_WITH_BACKING (QCOW2_V3_HEADER_LEN + 16 + 8)
#define HEADER_BYTES_STANDALONE (QCOW2_V3_HEADER_LEN + 8)

struct l2_table {
    uint32_t n_zero;    /* entries equal to ENTRY_ZERO */
    uint32_t n_partial; /* clusters in reach with a partial buffer */
    uint64_t e[];
};

/* Stands for a table whose every valid entry is ENTRY_ZERO: a TRIM of the
 * whole disk costs no memory per cluster. */
extern struct l2_table qcow2_all_zero_table;
#define L2_ALL_ZERO (&qcow2_all_zero_table)

struct qcow2_reopen;

struct qcow2_writer {
    int fd;
    uint64_t virtual_size;
    unsigned cluster_bits;
    uint64_t cluster_size;
    unsigned l2_bits;
    uint64_t n_clusters; /* guest clusters */
    uint64_t l1_size;
    struct l2_table **l1; /* NULL: all unset; L2_ALL_ZERO; or a table */
    char *backing_file;
    struct qcow2_reader *backing;

    uint64_t next_host_cluster;
    GArray *orphans; /* host cluster indices no longer referenced */

    GHashTable *partials; /* &partial->cluster -> struct partial */
    GQueue partial_order; /* oldest first */
    uint64_t partial_bytes;

    uint8_t *zero_buf; /* cluster_size zero bytes, allocated on first use */
    bool failed;       /* an I/O error left the file in an unknown state */
    bool tables_done;  /* finish_tables ran: no more guest writes */
    bool finished;
    uint64_t file_size;
    uint64_t l1_offset, reftable_offset, reftable_clusters;

    /* Checksums: the XXH3 of each data cluster, indexed by host cluster.
     * A cluster changed in part after its hash was taken is listed in
     * stale and hashed again from the file at finish. */
    GArray *host_hash;       /* uint64_t */
    GArray *stale;           /* host cluster indices */
    bool no_sums;            /* reopened without checksums: produce none */
    struct qcow2_sums *sums; /* built by finish_tables */

    /* Reopened (io/qcow2_reopen.c): the old image's tables, loaded as
     * the merge reaches them, and its refcounts; NULL for a new layer. */
    struct qcow2_reopen *ro;
};

/* io/qcow2_writer.c */
bool qcow2w_pwrite(struct qcow2_writer *w, const void *buf, size_t len,
                   uint64_t off, const char *what, GError **errp);
/* A host cluster for new data or a table: the next at the end of the
 * file, or for a reopened image one its refcounts say is free. */
bool qcow2w_alloc_host_cluster(struct qcow2_writer *w, uint64_t *host,
                               GError **errp);
bool qcow2w_read_fd(struct qcow2_writer *w, uint64_t off, uint8_t *buf,
                    size_t len, GError **errp);
/* Fails once an I/O error has left the file in an unknown state. */
bool qcow2w_usable(const struct qcow2_writer *w, GError **errp);
void qcow2w_set_hash(struct qcow2_writer *w, uint64_t host, uint64_t hash);
uint64_t qcow2w_table_valid_entries(const struct qcow2_writer *w, uint64_t i);
/* Writes out every outstanding partial cluster, base bytes filled in. */
bool qcow2w_flush_partials(struct qcow2_writer *w, GError **errp);

/* io/qcow2_writer_finish.c */
/* The L2 table at L1 index i in the file's big-endian form. */
void qcow2w_encode_table(const struct qcow2_writer *w, uint64_t i, uint8_t *buf,
                         bool *any);

/* io/qcow2_reopen.c */
/* Loads the old image's L2 tables for guest bytes [off, off + len). */
bool qcow2_reopen_load(struct qcow2_writer *w, uint64_t off, uint64_t len,
                       GError **errp);
/* A free host cluster (its offset in *host), marked used. */
bool qcow2_reopen_alloc(struct qcow2_writer *w, uint64_t *host, GError **errp);
/* An entry of table i changed from what the old image says. */
void qcow2_reopen_table_changed(struct qcow2_writer *w, uint64_t i);
/* The reopened writer's half of qcow2_writer_finish_tables: the changed
 * tables and the refcounts they change, after the end of the data. */
bool qcow2_reopen_finish_tables(struct qcow2_writer *w, GError **errp);
void qcow2_reopen_free(struct qcow2_reopen *ro);

#endif

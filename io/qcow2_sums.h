/* Per-cluster checksums of one qcow2 layer, kept in a file beside it.
 *
 * Every data cluster that qbak writes into a layer gets the XXH3 64-bit
 * hash (libxxhash, seed 0) of its cluster_size bytes as stored in the
 * image file; the layer's zero clusters are recorded as runs of zero
 * clusters (a TRIM of a whole disk costs one entry); guest clusters the
 * layer leaves unallocated have no entry.  The file is named
 * after the image plus QCOW2_SUMS_SUFFIX ("vd0.qcow2" -> "vd0.qcow2.sums").
 *
 * File format (all integers big-endian, as in qcow2):
 *
 *   offset  size  field
 *        0     8  magic "QBAKSUMS"
 *        8     4  version (1)
 *       12     4  cluster_bits of the image
 *       16     8  virtual size of the image
 *       24     8  entry count N
 *       32    24  reserved, zero
 *       56     8  XXH3-64 of bytes 0..55
 *       64  16*N  entries, sorted by guest cluster index, no overlap:
 *                   8  first guest cluster; bit 63 set: a zero run
 *                   8  XXH3-64 of the data cluster's bytes, or the
 *                      zero run's length in clusters
 *   64+16N     8  XXH3-64 of the entries (bytes 64 .. 64+16N-1)
 *
 * A reader accepts nothing else: a wrong magic, version, size, order,
 * overlap, a run past the virtual size or either hash makes the file
 * damaged (G_FILE_ERROR_INVAL naming it).
 */
#ifndef QBAK_IO_QCOW2_SUMS_H
#define QBAK_IO_QCOW2_SUMS_H

#include <glib.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_SUMS_SUFFIX ".sums"
#define QCOW2_SUMS_VERSION 1

/* 24 bytes in memory (the flag shares the cluster's word: guest cluster
 * indexes stay below 2^41). */
struct qcow2_sum {
    uint64_t cluster : 63; /* first guest cluster */
    uint64_t zero : 1;     /* a run of zero clusters (hash is 0) */
    uint64_t count;        /* clusters: 1 for data, the run's length for zero */
    uint64_t hash;         /* XXH3-64 of the data cluster */
};

/* Ordered, non-overlapping entries; adjacent zero runs are one entry. */
struct qcow2_sums;

struct qcow2_sums *qcow2_sums_new(unsigned cluster_bits, uint64_t virtual_size);
void qcow2_sums_free(struct qcow2_sums *s);

unsigned qcow2_sums_cluster_bits(const struct qcow2_sums *s);
uint64_t qcow2_sums_virtual_size(const struct qcow2_sums *s);

/* The hash qbak stores for a data cluster's bytes. */
uint64_t qcow2_sums_hash(const void *buf, size_t len);

/* Appends an entry (count 1 for data); entries must come in increasing
 * cluster order without overlap (returns false, changing nothing,
 * otherwise or past the virtual size).  A zero run adjacent to the last
 * zero run extends it. */
bool qcow2_sums_append(struct qcow2_sums *s, const struct qcow2_sum *e);

size_t qcow2_sums_count(const struct qcow2_sums *s);
/* Entry i (0 <= i < count), in cluster order.  Borrowed. */
const struct qcow2_sum *qcow2_sums_at(const struct qcow2_sums *s, size_t i);
/* The entry covering guest cluster c, or NULL (binary search). */
const struct qcow2_sum *qcow2_sums_find(const struct qcow2_sums *s, uint64_t c);

/* top's entries over base's: what a layer folded into its backing file
 * holds.  Same cluster size and virtual size required (else NULL). */
struct qcow2_sums *qcow2_sums_overlay(const struct qcow2_sums *base,
                                      const struct qcow2_sums *top);

/* Writes the file dirfd/name (created 0640 less umask, O_EXCL, no
 * symlinks followed) and fsyncs it; the caller fsyncs the directory. */
bool qcow2_sums_write(int dirfd, const char *name, const struct qcow2_sums *s,
                      GError **errp);
/* The same, fsynced only with do_fsync: without, the caller makes it
 * durable (a backup's commit fsyncs its whole point at once). */
bool qcow2_sums_write_sync(int dirfd, const char *name,
                           const struct qcow2_sums *s, bool do_fsync,
                           GError **errp);
/* Reads and validates dirfd/name.  A missing file fails with
 * G_FILE_ERROR_NOENT, a damaged one with G_FILE_ERROR_INVAL. */
struct qcow2_sums *qcow2_sums_read(int dirfd, const char *name, GError **errp);
/* The same from bytes (the fuzz target's entry point). */
struct qcow2_sums *qcow2_sums_parse(const uint8_t *buf, size_t len,
                                    const char *name, GError **errp);

#endif

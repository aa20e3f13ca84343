/* qcow2 v3 images: an append-only writer (one backup layer) and a chain
 * reader (restore, NBD READ, partial-cluster fill).
 *
 * The writer does the mapping; the caller does the hot-path data I/O.
 * qcow2_writer_write() hands back extents (host offset + slice of the
 * caller's buffer) that the caller writes, typically through io_uring.
 * Metadata, the header and the rare partial-cluster data are written by the
 * writer itself with pwrite() in qcow2_writer_finish().  Nothing fsyncs:
 * durability is the caller's job.
 *
 * File layout written: cluster 0 = header (+ backing file name and header
 * extensions), data clusters appended from cluster 1 in arrival order, then
 * L2 tables, L1 table, refcount blocks and refcount table at the end.
 * Guest clusters never written stay unallocated (they read from the backing
 * file); WRITE_ZEROES/TRIM produce v3 zero clusters, never "unallocated".
 *
 * Errors are in the G_FILE_ERROR domain: G_FILE_ERROR_INVAL for a bad
 * image or bad arguments, g_file_error_from_errno() for system calls.
 */
#ifndef QBAK_IO_QCOW2_H
#define QBAK_IO_QCOW2_H

#include <glib.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_DEFAULT_CLUSTER_BITS 16
/* Largest virtual size either side accepts (QEMU's own limit is 2^61). */
#define QCOW2_MAX_VIRTUAL_SIZE (UINT64_C(1) << 50)
/* Longest backing chain the reader follows. */
#define QCOW2_MAX_CHAIN_DEPTH 1024

struct qcow2_reader;
struct qcow2_writer;
struct qcow2_sums;

/* One piece of a write: the caller writes len bytes from its own buffer at
 * buf_offset to the image file at host_offset. */
struct qcow2_extent {
    uint64_t host_offset;
    size_t buf_offset;
    size_t len;
};

/* fd: the new, empty image file, open for reading and writing; borrowed
 * (the caller closes it after qcow2_writer_free).
 * virtual_size: 1 byte to QCOW2_MAX_VIRTUAL_SIZE, and small enough that the
 * L1 table fits QEMU's 32 MiB limit (2^50 needs 64 KiB clusters).  QEMU
 * only sees whole 512-byte sectors of it (guest disks have nothing else).
 * backing_file: name written into the header (relative to the image's own
 * directory), or NULL for a standalone image.  backing: the reader of that
 * chain, borrowed, used to fill the uncovered bytes of partially written
 * clusters; NULL means those bytes are zero. */
struct qcow2_writer *qcow2_writer_new(int fd, uint64_t virtual_size,
                                      unsigned cluster_bits,
                                      const char *backing_file,
                                      struct qcow2_reader *backing,
                                      GError **errp);
void qcow2_writer_free(struct qcow2_writer *w);

/* Size of the extent array qcow2_writer_write() may need for len bytes. */
size_t qcow2_writer_max_extents(const struct qcow2_writer *w, size_t len);

/* Guest write of buf[0..len) at off.  Whole clusters not yet written in this
 * layer get fresh host clusters (consecutive ones coalesced into one extent);
 * clusters written before are overwritten in place; pieces of clusters not
 * yet written are kept in memory (or written by the writer itself once
 * complete) and produce no extent.  On success *n_ext extents were filled;
 * the caller must write them before qcow2_writer_finish().
 * Fails (no change) on a range past the virtual size.
 *
 * Outstanding pieces are bounded (4096 clusters, 256 MiB): past that the
 * oldest is completed from the backing chain and written as a data cluster
 * (same bytes as at finish, the chain being immutable), never an error.
 * The writer's own pwrite()s (completed pieces here, pieces of zeroes on
 * data clusters in qcow2_writer_zero()) happen during the call: an extent
 * of the same guest range still in flight is not ordered against them,
 * which NBD leaves to the client anyway.
 * An I/O error here, in _zero or in _finish is sticky: every later call
 * fails, so a hole in the file can never end up in a finished image. */
bool qcow2_writer_write(struct qcow2_writer *w, uint64_t off, const void *buf,
                        size_t len, struct qcow2_extent *ext, size_t *n_ext,
                        GError **errp);

/* WRITE_ZEROES and TRIM: whole clusters become zero clusters; pieces of
 * clusters are written as zero bytes. */
bool qcow2_writer_zero(struct qcow2_writer *w, uint64_t off, uint64_t len,
                       GError **errp);

/* Read the layer as a guest would see it (this layer over the backing
 * chain).  Synchronous; for NBD READ, which a backup job never sends. */
bool qcow2_writer_read(struct qcow2_writer *w, uint64_t off, void *buf,
                       size_t len, GError **errp);

/* Complete partial clusters, write L2/L1/refcount tables and the header.
 * All extents handed out must have been written before this is called.
 * The writer is spent afterwards (only _free and the getters below).
 * The same as _finish_tables then _write_header. */
bool qcow2_writer_finish(struct qcow2_writer *w, GError **errp);
/* The two halves of _finish, for a caller that must make the data and
 * tables durable before the header points at them (a merge rewriting an
 * existing image: until the header is written, the old one stands). */
bool qcow2_writer_finish_tables(struct qcow2_writer *w, GError **errp);
bool qcow2_writer_write_header(struct qcow2_writer *w, GError **errp);

/* Layer depth of chain (borrowed), an existing image whose file is fd
 * (open read-write, the same file; borrowed), made writable again to
 * fold another layer into it: guest writes of whole clusters overwrite
 * its data clusters in place or take clusters its refcounts say are
 * free, else at the end of the file (a write of part of a cluster it
 * lacks fails).  Finish writes each L2 table and refcount block that
 * changed to a free cluster, a new L1 and refcount table, and a header
 * that points at them; the tables replaced become free clusters.  So the
 * bytes written follow what the merge changes, not the image's size, and
 * the old image stays whole until the new header is written.  The old
 * image's L2 tables are read only where the merge goes
 * (qcow2_writer_load_tables; writes and zeroes read theirs themselves).
 * Needs a clean v3 image with 16-bit refcounts and no snapshots (what qbak
 * and qemu-img write).  Backing file name, cluster size and virtual size
 * stay.  A reopened writer keeps no checksums (qcow2_writer_sums returns
 * NULL): those of a merge come from the layers' own (qcow2_sums_overlay). */
struct qcow2_writer *qcow2_writer_reopen(int fd, struct qcow2_reader *chain,
                                         unsigned depth, GError **errp);
/* Reopened: reads the old image's L2 tables for guest bytes [off, off +
 * len), once; a no-op for a new layer. */
bool qcow2_writer_load_tables(struct qcow2_writer *w, uint64_t off,
                              uint64_t len, GError **errp);
/* Reopened: whether a write of the guest cluster at off goes over a data
 * cluster of the image as it was (in place), rather than to a cluster the
 * old image does not reference, which nothing reads until the new header.
 * off's table must have been loaded (qcow2_writer_load_tables). */
bool qcow2_writer_in_place(const struct qcow2_writer *w, uint64_t off);
/* After the header written by a reopened writer is durable: gives the
 * clusters it freed back to the file system (hole punching; where the
 * file system cannot, they stay as they are).  Best effort, no error. */
void qcow2_writer_punch_free(struct qcow2_writer *w);

/* Bytes of the image file after finish (header, data and metadata). */
uint64_t qcow2_writer_file_size(const struct qcow2_writer *w);
/* Guest bytes that became data clusters or zero clusters in this layer. */
uint64_t qcow2_writer_data_bytes(const struct qcow2_writer *w);
uint64_t qcow2_writer_zero_bytes(const struct qcow2_writer *w);
/* After finish: the checksums of the layer (io/qcow2_sums.h), one entry
 * per data cluster and per run of zero clusters, or NULL for a reopened
 * image.
 * Borrowed: valid until qcow2_writer_free. */
const struct qcow2_sums *qcow2_writer_sums(const struct qcow2_writer *w);

/* Open an image and its whole backing chain read-only.  path is resolved
 * relative to dirfd (AT_FDCWD allowed); a backing file name is resolved
 * relative to the directory of the image that names it, as QEMU does
 * (absolute names are accepted, as stock tools accept them).
 * Every field read from a file is validated: a bad or hostile image fails
 * with a message naming the file, never crashes.
 * path itself may be a symlink or a /proc/self/fd/N link (the caller chose
 * it); backing names come from untrusted files and are opened with
 * O_NOFOLLOW, and must be regular files or block devices (a FIFO does not
 * hang the open).  Chains loop-checked by device and inode, at most
 * QCOW2_MAX_CHAIN_DEPTH images, one fd each. */
struct qcow2_reader *qcow2_reader_open(int dirfd, const char *path,
                                       GError **errp);
/* The same, and each layer's checksum file (io/qcow2_sums.h) is loaded
 * from beside it: see qcow2_reader_layer_sums.  A missing or damaged sums
 * file does not fail the open. */
struct qcow2_reader *qcow2_reader_open_with_sums(int dirfd, const char *path,
                                                 GError **errp);
void qcow2_reader_free(struct qcow2_reader *r);

uint64_t qcow2_reader_virtual_size(const struct qcow2_reader *r);
unsigned qcow2_reader_cluster_bits(const struct qcow2_reader *r);
/* Backing file name as stored in the top image's header, or NULL. */
const char *qcow2_reader_backing_file(const struct qcow2_reader *r);
/* The same for layer depth. */
const char *qcow2_reader_layer_backing_file(const struct qcow2_reader *r,
                                            unsigned depth);
/* Images in the chain: 1 for an image without a backing file. */
unsigned qcow2_reader_chain_depth(const struct qcow2_reader *r);

/* Each layer on its own (depth 0 = top, < chain depth). */
const char *qcow2_reader_layer_name(const struct qcow2_reader *r,
                                    unsigned depth);
/* The layer's file, open read-only; owned by the reader. */
int qcow2_reader_layer_fd(const struct qcow2_reader *r, unsigned depth);
uint64_t qcow2_reader_layer_file_size(const struct qcow2_reader *r,
                                      unsigned depth);
uint64_t qcow2_reader_layer_virtual_size(const struct qcow2_reader *r,
                                         unsigned depth);
unsigned qcow2_reader_layer_cluster_bits(const struct qcow2_reader *r,
                                         unsigned depth);
/* Opened with sums: the layer's checksums, or NULL when its file is
 * missing or damaged; *why (borrowed) then says which ("no checksum
 * file", or the parse error).  Opened without: NULL, *why NULL. */
const struct qcow2_sums *qcow2_reader_layer_sums(const struct qcow2_reader *r,
                                                 unsigned depth,
                                                 const char **why);

enum qcow2_layer_kind {
    QCOW2_LAYER_UNALLOCATED, /* the layer below answers */
    QCOW2_LAYER_ZERO,        /* a zero cluster in this layer */
    QCOW2_LAYER_DATA,        /* a data cluster of this layer */
};

struct qcow2_layer_run {
    enum qcow2_layer_kind kind;
    uint64_t host_offset; /* DATA: offset in the layer's file */
    uint64_t len;
};

/* The longest run at guest offset off (< the layer's virtual size) of at
 * most max_len bytes that has one kind in layer depth alone and, for
 * DATA, consecutive host offsets.  Runs start and end on cluster
 * boundaries except at off itself and at the layer's virtual size. */
bool qcow2_reader_layer_map(struct qcow2_reader *r, unsigned depth,
                            uint64_t off, uint64_t max_len,
                            struct qcow2_layer_run *run, GError **errp);

/* Checks guest cluster c's bytes (buf: the whole cluster, cluster size
 * bytes, as read from layer depth's file) against the layer's checksums.
 * True when they match or the layer has no checksums (see
 * qcow2_reader_layer_sums); a mismatch, or a cluster the checksums do not
 * list as data, fails with G_FILE_ERROR_INVAL naming the file and the
 * guest offset. */
bool qcow2_reader_check_cluster(const struct qcow2_reader *r, unsigned depth,
                                uint64_t c, const void *buf, GError **errp);

enum qcow2_map_kind {
    QCOW2_MAP_DATA, /* bytes at host_offset in fd */
    QCOW2_MAP_ZERO, /* reads as zeroes (zero cluster, or unallocated in
                       the whole chain, or beyond a shorter backing file) */
};

struct qcow2_map {
    enum qcow2_map_kind kind;
    int fd;               /* DATA: file to read; owned by the reader */
    int direct_fd;        /* DATA: the same with O_DIRECT, or -1; owned */
    uint64_t host_offset; /* DATA: offset in fd */
    uint64_t len;         /* bytes described, 1 <= len <= max_len */
    unsigned depth;       /* layer that answered: 0 = top */
};

/* Describe the guest range starting at off (off < virtual size) as seen
 * through the chain: the longest run of at most max_len bytes that has one
 * kind and, for DATA, consecutive host offsets in one file. */
bool qcow2_reader_map(struct qcow2_reader *r, uint64_t off, uint64_t max_len,
                      struct qcow2_map *m, GError **errp);

/* Synchronous read through the chain (pread). */
bool qcow2_reader_pread(struct qcow2_reader *r, uint64_t off, void *buf,
                        size_t len, GError **errp);

/* Folding a layer into its backing file (prune's merge). */
struct qcow2_merge_stats {
    uint64_t data_bytes; /* data copied from the top layer(s) */
    uint64_t zero_bytes; /* guest bytes made zero clusters */
    int damaged_depth;   /* the layer whose checksum failed, or -1 */
    /* A failure may have left the parent reading differently: data
     * written over its own in place, or the new header. */
    bool parent_changed;
};

/* Called after each piece of data merged (bytes so far); the merge goes on
 * whatever it does (a test may kill the process there). */
typedef void qcow2_merge_progress_fn(void *opaque, uint64_t done);

/* Folds the top layer of chain (depth 0, opened with sums) into the image
 * below it (depth 1), whose file the caller opened read-write as
 * parent_fd.  Afterwards the parent image alone reads exactly as the top
 * layer over it did; the top layer's file is not touched.  Cost follows
 * the top layer's data, not the disk: its clusters are written into the
 * parent in place or into free clusters, then copies of the tables that
 * changed (qcow2_writer_reopen), fdatasync, the header, fdatasync.  Until that
 * header write the parent image reads as before, except for clusters the top
 * layer covers; any failure or crash before it leaves the chain (top over
 * parent) reading as before, so the merge can simply be run again. Every
 * cluster to merge is read and checked against its checksums before the first
 * is written: damage fails the merge (G_FILE_ERROR_INVAL) with the parent
 * untouched.  *merged_sums: the parent's checksums with the top's over them, or
 * NULL when either layer has none. */
bool qcow2_merge_top(struct qcow2_reader *chain, int parent_fd,
                     struct qcow2_sums **merged_sums,
                     struct qcow2_merge_stats *stats,
                     qcow2_merge_progress_fn *progress_fn, void *opaque,
                     GError **errp);

/* The same for the n newest layers of chain (depths 0..n-1) at once,
 * folded into the image at depth n (parent_fd): each guest cluster is
 * written once, from the newest of them that has it, and the merged
 * checksums are layer n's with each newer one's over them.  The chain
 * reads the same at every instant (every cluster written is covered by
 * one of the n layers, untouched), so n merges of one layer each, oldest
 * first, give the same image as this one, at the cost of one.  On a
 * checksum failure stats->damaged_depth names the layer.  merged_sums may
 * be NULL (qcow2_merge_sums gives them beforehand). */
bool qcow2_merge_layers(struct qcow2_reader *chain, unsigned n, int parent_fd,
                        struct qcow2_sums **merged_sums,
                        struct qcow2_merge_stats *stats,
                        qcow2_merge_progress_fn *progress_fn, void *opaque,
                        GError **errp);

/* The checksums the merge of layers 0..n-1 into layer n gives (layer n's
 * with each newer one's over them), or NULL when one of them has none:
 * from the layers' checksum files alone, which the merge does not touch,
 * so they can be made durable while it runs. */
struct qcow2_sums *qcow2_merge_sums(struct qcow2_reader *chain, unsigned n);

#endif

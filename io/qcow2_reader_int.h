/* qcow2 chain reader's state, shared by its opening side (qcow2_reader.c)
 * and its data side (qcow2_reader_map.c). */
#ifndef QBAK_IO_QCOW2_READER_INT_H
#define QBAK_IO_QCOW2_READER_INT_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* L2 tables cached per layer.  A restore walks the disk in order, so one
 * table is hot at a time; a few more absorb a chain whose layers
 * interleave. */
#define L2_CACHE_SIZE 4

struct l2_cache_entry {
    uint64_t offset; /* host offset of the table; 0 = slot empty */
    uint64_t last_use;
    uint64_t *table; /* host-endian entries */
};

struct qcow2_layer {
    char *name; /* for messages: the path as given or as named */
    int fd;
    int direct_fd;    /* the same file with O_DIRECT, or -1 */
    bool direct_done; /* direct_fd was tried */
    dev_t dev;
    ino_t ino;
    uint64_t file_size;
    uint64_t virtual_size;
    unsigned cluster_bits;
    uint64_t cluster_size;
    unsigned l2_bits; /* log2 of entries per L2 table */
    uint64_t *l1;     /* host-endian, only the entries virtual_size needs */
    uint64_t l1_entries;
    uint64_t use_clock;
    struct l2_cache_entry cache[L2_CACHE_SIZE];
    char *backing_name;      /* as stored in the header, or NULL */
    struct qcow2_sums *sums; /* loaded when asked and valid, else NULL */
    char *sums_why;          /* asked but NULL: why */
};

struct qcow2_reader {
    struct qcow2_layer **layers; /* [0] is the top */
    unsigned n_layers;
    char *backing_file;
};

enum cluster_kind {
    CLUSTER_UNALLOCATED,
    CLUSTER_ZERO,
    CLUSTER_DATA,
};

/* A run of guest bytes inside one layer with one kind. */
struct layer_run {
    enum cluster_kind kind;
    uint64_t host_offset;
    uint64_t len;
};

/* pread() that reads everything or says why not; a file shorter than its
 * own metadata claims is corrupt, not an I/O error.  name and what go
 * into the message. */
bool qcow2_read_exact(int fd, void *buf, size_t len, uint64_t off,
                      const char *name, const char *what, GError **errp);
/* The layer's file opened with O_DIRECT, the first time it is asked for
 * (-1 where the file system refuses). */
int qcow2_layer_direct_fd(struct qcow2_layer *l);

#endif

/* A point's catalog: every path of every file system of one disk at one
 * restore point, with type, size, mtime and mode, so `qbak find` answers
 * without starting an appliance.  Points never change, so a catalog never
 * goes stale; it lives beside the manifest as <point>/<disk>.catalog and
 * goes with its point.
 *
 * Format 1 (all integers little-endian; varints are LEB128, 10 bytes at
 * most; mtime is zigzag-encoded seconds since the epoch):
 *
 *   "QBAKCAT1"                      8-byte magic
 *   u32 H, then H bytes of JSON     {"format": 1, "point", "disk",
 *                                    "created", "filesystems": [{"fs",
 *                                    "type", "size", "label", "entries",
 *                                    "error"?}]}
 *   per file system, in the header's order, "entries" records sorted by
 *   path (bytewise), each:
 *     varint P   bytes shared with the previous path of this file system
 *     varint S   then S more bytes of the path ("/a/b": absolute, no
 *                trailing '/', the root itself not listed)
 *     u8 type    'f' file, 'd' directory, 'l' symlink, 'o' other
 *     varint mode (st_mode, type bits included), varint size,
 *     varint zigzag(mtime)
 *   u64 XXH3-64 (seed 0) of every byte before it
 *
 * The file is written to a temporary name, fsynced, renamed into place and
 * the directory fsynced: a catalog that exists is whole.  The parser
 * treats the bytes as untrusted (fuzzed: tests/fuzz/fuzz-catalog.c).
 */
#ifndef QBAK_AGENT_FILES_CATALOG_H
#define QBAK_AGENT_FILES_CATALOG_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#define CATALOG_SUFFIX ".catalog"
#define CATALOG_MAX_SIZE (1ull << 32)

/* One path.  type: 'f', 'd', 'l', 'o'. */
struct files_entry {
    char *path;
    char type;
    uint32_t mode;
    uint64_t size;
    int64_t mtime;
};

/* One file system of a disk and (once walked) what it holds. */
struct files_fs {
    char *name; /* "1", "2" (partition), "VG/LV", or "disk" */
    char *dev;  /* appliance device; NULL when read from a catalog */
    char *type; /* vfs type: ext4, xfs, ... */
    int64_t size;
    char *label;
    char *error;     /* could not be listed: why (then no entries) */
    char **pvs;      /* an LVM volume: its PVs (the filter to select) */
    GArray *entries; /* struct files_entry, sorted by path; may be NULL */
};

struct files_catalog {
    char *point;
    char *disk;
    GPtrArray *fss; /* struct files_fs * */
};

struct files_fs *files_fs_new(void);
void files_fs_free(struct files_fs *fs);
void files_catalog_free(struct files_catalog *c);

/* An empty array of struct files_entry that frees their paths. */
GArray *files_entries_new(void);
/* Sorts entries by path (bytewise). */
void files_entries_sort(GArray *entries);
/* The entry type letter for st_mode. */
char files_type_of_mode(uint32_t mode);
const char *files_type_name(char type);

/* The encoded bytes of c (entries must be sorted). */
GBytes *files_catalog_encode(const struct files_catalog *c);

/* Parses len bytes; with verify, the checksum must match.  Fails
 * (QBAK_ERROR_DAMAGED) on anything malformed. */
struct files_catalog *files_catalog_decode(const uint8_t *buf, size_t len,
                                           bool verify, GError **errp);

/* Reads point_fd/<disk>.catalog: NULL with QBAK_ERROR_NOT_FOUND when there
 * is none, QBAK_ERROR_DAMAGED when it does not verify. */
struct files_catalog *files_catalog_read(int point_fd, const char *disk,
                                         GError **errp);

/* Writes c durably as point_fd/<disk>.catalog; returns its size or -1. */
int64_t files_catalog_write(int point_fd, const struct files_catalog *c,
                            GError **errp);

#endif

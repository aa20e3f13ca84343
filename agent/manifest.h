/* manifest.json: what a committed restore point holds, in one place.
 *
 * Every reader goes through manifest_parse(), which checks the format
 * version and the schema below; a manifest that fails is not guessed at:
 * the point is listed as damaged (repo_scan_points) and nothing builds on
 * it.  Keys not listed here are ignored (a later format may add some).
 *
 * Schema (format 2; format 1 is the same without "sums" and
 * "sums_algorithm", and is still read).  In format 2 a layer without
 * checksums (one from format 1 merged with another) has no "sums": it is
 * unverifiable, which verify reports as such.
 *   format          integer, MANIFEST_FORMAT_MIN..MANIFEST_FORMAT
 *   vm              string, the VM directory's name
 *   point           string, the point directory's name
 *   parent          string or null: the point an incremental disk builds on
 *   time            string, ISO 8601 UTC of the commit
 *   qemu_version    string (optional)
 *   consistency     string: "filesystem-frozen" or "crash-consistent"
 *   freeze          object (optional): what the guest agent reported
 *   duration_s      number (optional)
 *   memory          object or null (optional): the memory state, when the
 *                   point holds one (agent/vm/vmstate.h: file, bytes,
 *                   capture_s, downtime_ms, method, capabilities)
 *   settings        object (optional): a summary of vm.json, the VM's
 *                   recorded settings (agent/vm/settings.h)
 *   disks           non-empty array of objects, one per disk:
 *     disk          string, the disk's name (a valid file name)
 *     type          "full" or "incremental"
 *     reason        string or null: why a disk that could have been an
 *                   incremental is full
 *     file          string: the layer's qcow2 file in the point directory
 *     virtual_size  integer > 0: the guest disk's size in bytes
 *     cluster_size  integer, a power of two from 512 to 2 MiB
 *     chain         string: the chain id (a full starts a new one)
 *     bitmap        string (optional): this point's bitmap generation
 *     node          string (optional): QEMU's node name at backup time
 *     backing       string, incremental only: "../<parent>/<file>"
 *     bytes_written integer (optional): the layer's file size
 *     sums          string (format 2, optional): the layer's checksum
 *                   file ("<file>.sums", io/qcow2_sums.h)
 *     sums_algorithm "xxh3-64", required with "sums"
 */
#ifndef QBAK_AGENT_MANIFEST_H
#define QBAK_AGENT_MANIFEST_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define MANIFEST_NAME "manifest.json"
/* The format backups write, and the oldest one still read. */
#define MANIFEST_FORMAT 2
#define MANIFEST_FORMAT_MIN 1
#define MANIFEST_SUMS_ALGORITHM "xxh3-64"

/* Strings are borrowed from the manifest's JSON document. */
struct manifest_disk {
    const char *disk;
    const char *type;
    const char *reason; /* or NULL */
    const char *file;
    const char *chain;
    const char *bitmap;  /* or NULL */
    const char *backing; /* NULL for a full */
    const char *sums;    /* NULL: the layer has no checksums (format 1) */
    uint64_t virtual_size;
    uint64_t cluster_size;
    bool full;
};

struct manifest {
    json_t *json; /* the document, owned */
    int format;
    const char *vm;
    const char *point;
    const char *parent; /* or NULL */
    const char *time;
    const char *consistency;
    struct manifest_disk *disks;
    size_t n_disks;
};

/* Validates j (borrowed; the manifest keeps its own reference) against the
 * schema, for the point directory named point of VM vm (either may be NULL
 * to skip that check).  Fails with QBAK_ERROR_DAMAGED saying what is
 * wrong. */
struct manifest *manifest_parse(json_t *j, const char *vm, const char *point,
                                GError **errp);
/* Reads and parses point_fd/manifest.json: QBAK_ERROR_DAMAGED for a file
 * that does not parse or validate, QBAK_ERROR_NOT_FOUND when missing. */
struct manifest *manifest_read(int point_fd, const char *vm, const char *point,
                               GError **errp);
void manifest_free(struct manifest *m);

/* The entry for disk, or NULL. */
const struct manifest_disk *manifest_disk(const struct manifest *m,
                                          const char *disk);

/* Building a new point's manifest (backup): the document without disks
 * (freeze taken, may be NULL), then one entry per disk, appended. */
json_t *manifest_new(const char *vm, const char *point, const char *parent,
                     const char *time, const char *qemu_version,
                     const char *consistency, json_t *freeze,
                     double duration_s);
/* extra: further keys of the entry (node, bytes_written), taken. */
void manifest_add_disk(json_t *m, const struct manifest_disk *d, json_t *extra);

#endif

/* Folding the top layer of a chain into its backing image: see
 * qcow2_merge_top in qcow2.h.
 *
 * Why the chain reads the same at every instant: the parent's clusters
 * that change are exactly those the top layer covers (data or zero), and
 * the top layer, untouched, still answers for them; clusters appended to
 * the parent are referenced only by tables the new header points at.  So
 * until that header is written the chain reads as before, and after it
 * the parent alone reads as the chain did.  The merged checksums come from
 * the two layers' checksum files, which the merge does not touch, so a
 * merge run again after a crash gives the same ones.  Nothing here fsyncs a
 * directory or renames: the caller decides when the merged image takes
 * the top layer's place. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/qcow2.h"
#include "io/qcow2_sums.h"

/* Data moved per read and write. */
#define MERGE_CHUNK (UINT64_C(4) << 20)

static bool
sync_fd(int fd, const char *name, GError **errp)
{
    if (fdatasync(fd) < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: fdatasync: %s", name, g_strerror(err));
        return false;
    }
    return true;
}

static bool
pread_full(int fd, uint8_t *buf, size_t len, uint64_t off, const char *name,
           GError **errp)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, (off_t)off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: reading at %" PRIu64 ": %s", name, off,
                        g_strerror(err));
            return false;
        }
        if (n == 0) {
            /* The file ends inside a cluster: QEMU reads zeroes there. */
            memset(buf, 0, len);
            return true;
        }
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

/* Test-only fault injection, in io/ring.c's manner:
 * QBAK_FAULT_MERGE_WRITE=N[:err] makes the Nth data write of the merges of
 * this process fail with err (EIO (default), ENOSPC or a number). */
static int
fault_merge_write(void)
{
    static long nth = -1, count;
    static int err;

    if (nth < 0) {
        const char *s = getenv("QBAK_FAULT_MERGE_WRITE");
        char *end = NULL;

        nth = s && *s ? strtol(s, &end, 10) : 0;
        err = EIO;
        if (end && *end == ':') {
            err = strcmp(end + 1, "ENOSPC") == 0 ? ENOSPC
                  : strcmp(end + 1, "EIO") == 0  ? EIO
                                                 : atoi(end + 1);
        }
    }
    return nth > 0 && ++count == nth ? err : 0;
}

static bool
pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t off,
            const char *name, GError **errp)
{
    int fault = fault_merge_write();

    while (len > 0) {
        ssize_t n =
            fault ? (errno = fault, -1) : pwrite(fd, buf, len, (off_t)off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : ENOSPC;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: writing at %" PRIu64 ": %s", name, off,
                        g_strerror(err));
            return false;
        }
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

/* One run of the top layer's data: read, check, write into the parent. */
struct merge {
    struct qcow2_reader *chain;
    struct qcow2_writer *w;
    int parent_fd;
    uint8_t *buf;
    struct qcow2_extent *ext;
    struct qcow2_merge_stats *stats;
    qcow2_merge_progress_fn *progress_fn;
    void *opaque;
};

static bool
merge_data(struct merge *m, uint64_t off, const struct qcow2_layer_run *run,
           GError **errp)
{
    struct qcow2_reader *chain = m->chain;
    uint8_t *buf = m->buf;
    unsigned bits = qcow2_reader_layer_cluster_bits(chain, 0);
    uint64_t cluster = UINT64_C(1) << bits;
    uint64_t size = qcow2_reader_layer_virtual_size(chain, 0);
    int top_fd = qcow2_reader_layer_fd(chain, 0);
    const char *top_name = qcow2_reader_layer_name(chain, 0);
    const char *parent_name = qcow2_reader_layer_name(chain, 1);
    uint64_t done = 0;

    while (done < run->len) {
        /* Whole clusters are read (the last one of a disk whose size is
         * not a multiple: past its end too) so that each is checked. */
        uint64_t want = MIN(MERGE_CHUNK, run->len - done);
        uint64_t whole = (want + cluster - 1) & ~(cluster - 1);
        uint64_t guest = off + done;
        size_t n_ext = 0;

        if (!pread_full(top_fd, buf, (size_t)whole, run->host_offset + done,
                        top_name, errp)) {
            return false;
        }
        for (uint64_t k = 0; k < whole; k += cluster) {
            if (!qcow2_reader_check_cluster(chain, 0, (guest + k) >> bits,
                                            buf + k, errp)) {
                return false;
            }
        }
        uint64_t len = MIN(want, size - guest);
        if (!qcow2_writer_write(m->w, guest, buf, (size_t)len, m->ext, &n_ext,
                                errp)) {
            return false;
        }
        for (size_t i = 0; i < n_ext; i++) {
            const struct qcow2_extent *e = &m->ext[i];

            if (!pwrite_full(m->parent_fd, buf + e->buf_offset, e->len,
                             e->host_offset, parent_name, errp)) {
                return false;
            }
        }
        done += want;
        m->stats->data_bytes += want;
        if (m->progress_fn != NULL) {
            m->progress_fn(m->opaque, m->stats->data_bytes);
        }
    }
    return true;
}

bool
qcow2_merge_top(struct qcow2_reader *chain, int parent_fd,
                struct qcow2_sums **merged_sums,
                struct qcow2_merge_stats *stats,
                qcow2_merge_progress_fn *progress_fn, void *opaque,
                GError **errp)
{
    const struct qcow2_sums *top_sums, *parent_sums;
    struct qcow2_writer *w = NULL;
    g_autofree uint8_t *buf = NULL;
    g_autofree struct qcow2_extent *ext = NULL;
    struct merge m;
    const char *top_name = qcow2_reader_layer_name(chain, 0);
    uint64_t size, off = 0;
    bool ok = false;

    *merged_sums = NULL;
    memset(stats, 0, sizeof(*stats));
    if (qcow2_reader_chain_depth(chain) < 2) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: no backing image to merge into", top_name);
        return false;
    }
    size = qcow2_reader_layer_virtual_size(chain, 0);
    if (size != qcow2_reader_layer_virtual_size(chain, 1) ||
        qcow2_reader_layer_cluster_bits(chain, 0) !=
            qcow2_reader_layer_cluster_bits(chain, 1)) {
        /* Not damage: two sound images that do not fit together. */
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "%s: its backing image %s differs in size or cluster "
                    "size",
                    top_name, qcow2_reader_layer_name(chain, 1));
        return false;
    }
    top_sums = qcow2_reader_layer_sums(chain, 0, NULL);
    parent_sums = qcow2_reader_layer_sums(chain, 1, NULL);
    w = qcow2_writer_reopen(parent_fd, chain, 1, errp);
    if (w == NULL) {
        return false;
    }
    buf = g_malloc(MERGE_CHUNK);
    ext = g_new(struct qcow2_extent, qcow2_writer_max_extents(w, MERGE_CHUNK));
    m = (struct merge){chain, w,     parent_fd,   buf,
                       ext,   stats, progress_fn, opaque};
    while (off < size) {
        struct qcow2_layer_run run;

        if (!qcow2_reader_layer_map(chain, 0, off, size - off, &run, errp)) {
            goto out;
        }
        if (run.kind == QCOW2_LAYER_DATA) {
            if (!merge_data(&m, off, &run, errp)) {
                goto out;
            }
        } else if (run.kind == QCOW2_LAYER_ZERO) {
            if (!qcow2_writer_zero(w, off, run.len, errp)) {
                goto out;
            }
            stats->zero_bytes += run.len;
        }
        off += run.len;
    }
    /* Data and tables durable before the header points at them, the
     * header durable before the caller moves the file into place. */
    if (!qcow2_writer_finish_tables(w, errp) ||
        !sync_fd(parent_fd, qcow2_reader_layer_name(chain, 1), errp) ||
        !qcow2_writer_write_header(w, errp) ||
        !sync_fd(parent_fd, qcow2_reader_layer_name(chain, 1), errp)) {
        goto out;
    }
    qcow2_writer_punch_free(w);
    if (top_sums != NULL && parent_sums != NULL) {
        *merged_sums = qcow2_sums_overlay(parent_sums, top_sums);
    }
    ok = true;
out:
    if (!ok) {
        g_prefix_error(errp, "merging %s into %s: ", top_name,
                       qcow2_reader_layer_name(chain, 1));
    }
    qcow2_writer_free(w);
    return ok;
}

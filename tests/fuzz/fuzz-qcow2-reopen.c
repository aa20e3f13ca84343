/* libFuzzer target: an image reopened for a merge (qcow2_writer_reopen)
 * on hostile files.
 *
 * The input is the image merged into.  It goes into a memfd, is opened by
 * the reader by its /proc/self/fd path and reopened for writing; a few
 * whole clusters are written (in place or taken from the free ones) and a
 * range zeroed at the start, the middle and the end of the disk, then the
 * tables and header are written.  Its own L2 tables, refcount table and
 * blocks are read by the reopened writer itself, not the reader: a writer
 * that errors out is fine, one that crashes, leaks or hangs is not; when
 * it succeeds, the result must open again.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "io/qcow2.h"

/* L1 entries at most: a header claiming a huge disk is not slow. */
#define MAX_L1_ENTRIES 65536

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool
write_all(int fd, const uint8_t *data, size_t size, uint64_t off)
{
    size_t done = 0;

    while (done < size) {
        ssize_t n = pwrite(fd, data + done, size - done, (off_t)(off + done));
        if (n <= 0) {
            return false;
        }
        done += (size_t)n;
    }
    return true;
}

/* One whole cluster of data at guest cluster c. */
static bool
write_cluster(struct qcow2_writer *w, int fd, uint64_t c, unsigned bits,
              uint64_t vsize, uint8_t *buf, GError **errp)
{
    uint64_t off = c << bits;
    size_t len = (size_t)MIN(UINT64_C(1) << bits, vsize - off);
    struct qcow2_extent ext[4];
    size_t n = 0;

    if (qcow2_writer_max_extents(w, len) > 4) {
        abort();
    }
    if (!qcow2_writer_load_tables(w, off, len, errp)) {
        return false;
    }
    (void)qcow2_writer_in_place(w, off);
    if (!qcow2_writer_write(w, off, buf, len, ext, &n, errp)) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (ext[i].buf_offset + ext[i].len > len ||
            !write_all(fd, buf + ext[i].buf_offset, ext[i].len,
                       ext[i].host_offset)) {
            abort();
        }
    }
    return true;
}

static bool
exercise(struct qcow2_writer *w, int fd, unsigned bits, uint64_t vsize,
         GError **errp)
{
    uint64_t n_clusters = (vsize + (UINT64_C(1) << bits) - 1) >> bits;
    g_autofree uint8_t *buf = g_malloc0(UINT64_C(1) << bits);
    uint64_t at[3] = {0, n_clusters / 2, n_clusters - 1};

    memset(buf, 0x5a, UINT64_C(1) << bits);
    for (int i = 0; i < 3; i++) {
        if (!write_cluster(w, fd, at[i], bits, vsize, buf, errp)) {
            return false;
        }
    }
    uint64_t z = (n_clusters / 4) << bits;
    uint64_t zlen = MIN(UINT64_C(3) << bits, vsize - z);
    if (!qcow2_writer_zero(w, z, zlen, errp)) {
        return false;
    }
    return qcow2_writer_finish_tables(w, errp) &&
           qcow2_writer_write_header(w, errp);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    GError *err = NULL;
    int fd = memfd_create("fuzz-qcow2-reopen", MFD_CLOEXEC);
    struct qcow2_reader *r;
    struct qcow2_writer *w;
    unsigned bits;
    uint64_t vsize;
    bool ok;

    if (fd < 0 || !write_all(fd, data, size, 0)) {
        abort();
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    r = qcow2_reader_open(AT_FDCWD, path, &err);
    if (r == NULL) {
        g_clear_error(&err);
        close(fd);
        return 0;
    }
    bits = qcow2_reader_cluster_bits(r);
    vsize = qcow2_reader_virtual_size(r);
    if ((vsize >> (2 * bits - 3)) >= MAX_L1_ENTRIES) {
        qcow2_reader_free(r);
        close(fd);
        return 0;
    }
    w = qcow2_writer_reopen(fd, r, 0, &err);
    if (w == NULL) {
        if (err == NULL) {
            abort(); /* failure must say why */
        }
        g_clear_error(&err);
        qcow2_reader_free(r);
        close(fd);
        return 0;
    }
    ok = exercise(w, fd, bits, vsize, &err);
    if (!ok && err == NULL) {
        abort();
    }
    g_clear_error(&err);
    if (ok) {
        qcow2_writer_punch_free(w);
    }
    qcow2_writer_free(w);
    qcow2_reader_free(r);
    if (ok) {
        /* The header written points at tables the reader accepts. */
        r = qcow2_reader_open(AT_FDCWD, path, &err);
        if (r == NULL) {
            fprintf(stderr, "reopened image no longer opens: %s\n",
                    err->message);
            abort();
        }
        qcow2_reader_free(r);
    }
    close(fd);
    return 0;
}

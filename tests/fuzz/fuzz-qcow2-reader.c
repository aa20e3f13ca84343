/* libFuzzer target: the qcow2 reader on hostile images.
 *
 * The input is the image file.  It goes into a memfd that the reader opens
 * by its /proc/self/fd path, exactly as it opens a file in a repository;
 * then the whole guest range is mapped and part of it read.  The work per
 * input is capped so that a header claiming a 1 PiB disk does not turn
 * into a slow input: a reader that errors out is fine, one that crashes,
 * leaks or hangs is not.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "io/qcow2.h"

#define WALK_MAX_SIZE (UINT64_C(64) << 20) /* map all of disks up to this */
#define MAX_MAP_CALLS 4096
#define READ_CHUNK (UINT64_C(64) << 10)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool
write_all(int fd, const uint8_t *data, size_t size)
{
    size_t done = 0;

    while (done < size) {
        ssize_t n = pwrite(fd, data + done, size - done, (off_t)done);
        if (n <= 0) {
            return false;
        }
        done += (size_t)n;
    }
    return true;
}

/* Map [off, end) in steps, checking what the reader promises. */
static bool
walk(struct qcow2_reader *r, uint64_t off, uint64_t end, unsigned *calls)
{
    uint64_t vsize = qcow2_reader_virtual_size(r);
    unsigned depth = qcow2_reader_chain_depth(r);

    while (off < end && *calls < MAX_MAP_CALLS) {
        struct qcow2_map m;
        GError *err = NULL;
        /* Vary the limit so runs are cut at odd places too. */
        uint64_t max_len = (*calls % 3 == 0) ? 4097 : end - off;

        (*calls)++;
        if (!qcow2_reader_map(r, off, max_len, &m, &err)) {
            g_error_free(err);
            return false;
        }
        if (m.len == 0 || m.len > max_len || m.len > vsize - off ||
            m.depth >= depth ||
            (m.kind != QCOW2_MAP_DATA && m.kind != QCOW2_MAP_ZERO) ||
            (m.kind == QCOW2_MAP_DATA && m.fd < 0)) {
            abort();
        }
        off += m.len;
    }
    return true;
}

static void
read_at(struct qcow2_reader *r, uint64_t off, uint8_t *buf)
{
    uint64_t vsize = qcow2_reader_virtual_size(r);
    GError *err = NULL;

    if (off >= vsize) {
        return;
    }
    if (!qcow2_reader_pread(r, off, buf, (size_t)MIN(READ_CHUNK, vsize - off),
                            &err)) {
        g_error_free(err);
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[READ_CHUNK];
    char path[64];
    GError *err = NULL;
    int fd = memfd_create("fuzz-qcow2", MFD_CLOEXEC);

    if (fd < 0) {
        abort();
    }
    if (!write_all(fd, data, size)) {
        abort();
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
    if (r == NULL) {
        if (err == NULL) {
            abort(); /* failure must say why */
        }
        g_error_free(err);
        close(fd);
        return 0;
    }
    uint64_t vsize = qcow2_reader_virtual_size(r);
    unsigned calls = 0;

    (void)qcow2_reader_backing_file(r);
    if (qcow2_reader_cluster_bits(r) < QCOW2_MIN_CLUSTER_BITS ||
        qcow2_reader_cluster_bits(r) > QCOW2_MAX_CLUSTER_BITS ||
        vsize > QCOW2_MAX_VIRTUAL_SIZE) {
        abort();
    }
    if (vsize <= WALK_MAX_SIZE) {
        walk(r, 0, vsize, &calls);
    } else {
        /* The start, the middle and the end of a huge disk. */
        walk(r, 0, MIN(vsize, WALK_MAX_SIZE), &calls);
        walk(r, vsize / 2, vsize / 2 + MIN(vsize / 2, WALK_MAX_SIZE), &calls);
        walk(r, vsize - MIN(vsize, 1u << 20), vsize, &calls);
    }
    read_at(r, 0, buf);
    read_at(r, vsize / 2, buf);
    read_at(r, vsize - MIN(vsize, READ_CHUNK), buf);
    /* An unaligned read across clusters. */
    read_at(r, vsize / 3 + 7, buf);
    qcow2_reader_free(r);
    close(fd);
    return 0;
}

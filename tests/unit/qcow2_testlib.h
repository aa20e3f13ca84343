/* Scaffolding shared by the qcow2 unit tests: temporary directories,
 * qemu-img and qemu-io as oracles, file patching, and an image being
 * written together with the guest content it must show.  Header-only:
 * each test program includes it once. */
#ifndef QBAK_TESTS_UNIT_QCOW2_TESTLIB_H
#define QBAK_TESTS_UNIT_QCOW2_TESTLIB_H

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "io/qcow2.h"

#pragma GCC diagnostic ignored "-Wunused-function"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define TiB (UINT64_C(1) << 40)

/* ------------------------------------------------------------------ */
/* Scaffolding: temporary directories, qemu-img, file patching.        */

static char *
tmpdir_new(void)
{
    g_autoptr(GError) err = NULL;
    char *dir = g_dir_make_tmp("qbak-qcow2-XXXXXX", &err);

    g_assert_no_error(err);
    return dir;
}

static int
run(const char *const *argv, char **out)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *stdout_buf = NULL;
    g_autofree char *stderr_buf = NULL;
    int status = 0;

    if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL,
                      NULL, &stdout_buf, &stderr_buf, &status, &err)) {
        g_error("spawning %s: %s", argv[0], err->message);
    }
    if (out != NULL) {
        *out = g_strconcat(stdout_buf, stderr_buf, NULL);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int
remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    return remove(path);
}

static void
tmpdir_remove(char *dir)
{
    g_assert_cmpint(nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS), ==, 0);
    g_free(dir);
}

static bool
have_qemu_img(void)
{
    g_autofree char *img = g_find_program_in_path("qemu-img");
    g_autofree char *io = g_find_program_in_path("qemu-io");

    if (img == NULL || io == NULL) {
        g_test_skip("qemu-img or qemu-io not installed");
        return false;
    }
    return true;
}

static void
assert_same_bytes(const uint8_t *got, const uint8_t *want, uint64_t len,
                  const char *what)
{
    if (memcmp(got, want, len) == 0) {
        return;
    }
    for (uint64_t i = 0; i < len; i++) {
        if (got[i] != want[i]) {
            g_error("%s: first difference at byte %" PRIu64
                    ": got 0x%02x, want 0x%02x",
                    what, i, got[i], want[i]);
        }
    }
}

/* qemu-img check exits 0 only without corruptions and without leaks. */
static void
assert_qemu_check(const char *path)
{
    const char *argv[] = {"qemu-img", "check", "-f", "qcow2", path, NULL};
    g_autofree char *out = NULL;
    int rc = run(argv, &out);

    if (rc != 0) {
        g_error("qemu-img check %s: exit %d\n%s", path, rc, out);
    }
}

static void
assert_qemu_content(const char *path, const uint8_t *want, uint64_t size)
{
    g_autofree char *raw = g_strconcat(path, ".raw", NULL);
    const char *argv[] = {"qemu-img", "convert", "-t", "unsafe", "-f", "qcow2",
                          "-O",       "raw",     path, raw,      NULL};
    g_autofree char *out = NULL;
    g_autofree char *got = NULL;
    gsize got_len = 0;

    if (run(argv, &out) != 0) {
        g_error("qemu-img convert %s: %s", path, out);
    }
    g_assert_true(g_file_get_contents(raw, &got, &got_len, NULL));
    /* QEMU counts disks in 512-byte sectors and drops a partial last
     * sector (guest disks never have one). */
    g_assert_cmpuint(got_len, ==, size & ~UINT64_C(511));
    assert_same_bytes((const uint8_t *)got, want, got_len, path);
    g_unlink(raw);
}

/* Run qemu-io commands; it exits non-zero when one fails, including a
 * read -P whose pattern does not match. */
static void
qemu_io(const char *path, bool read_only, const char *const *cmds)
{
    GPtrArray *argv = g_ptr_array_new();
    g_autofree char *out = NULL;

    g_ptr_array_add(argv, (char *)"qemu-io");
    g_ptr_array_add(argv, (char *)"-f");
    g_ptr_array_add(argv, (char *)"qcow2");
    g_ptr_array_add(argv, (char *)"-t");
    g_ptr_array_add(argv, (char *)"unsafe");
    if (read_only) {
        g_ptr_array_add(argv, (char *)"-r");
    }
    for (unsigned i = 0; cmds[i] != NULL; i++) {
        g_ptr_array_add(argv, (char *)"-c");
        g_ptr_array_add(argv, (char *)cmds[i]);
    }
    g_ptr_array_add(argv, (char *)path);
    g_ptr_array_add(argv, NULL);
    if (run((const char *const *)argv->pdata, &out) != 0) {
        g_error("qemu-io %s: %s", path, out);
    }
    g_ptr_array_free(argv, TRUE);
}

static void
patch(const char *path, uint64_t off, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);

    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pwrite(fd, buf, len, (off_t)off), ==, (ssize_t)len);
    close(fd);
}

static void
patch_be32(const char *path, uint64_t off, uint32_t v)
{
    uint32_t be = GUINT32_TO_BE(v);

    patch(path, off, &be, sizeof(be));
}

static void
patch_be64(const char *path, uint64_t off, uint64_t v)
{
    uint64_t be = GUINT64_TO_BE(v);

    patch(path, off, &be, sizeof(be));
}

static uint64_t
peek_be64(const char *path, uint64_t off)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    uint64_t be = 0;

    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pread(fd, &be, 8, (off_t)off), ==, 8);
    close(fd);
    return GUINT64_FROM_BE(be);
}

/* ------------------------------------------------------------------ */
/* An image being written and the guest content it must show.          */

struct image {
    char *path;
    int fd;
    struct qcow2_writer *w;
    uint8_t *want;
    uint64_t size;
    unsigned cluster_bits;
};

/* base: the content of the backing chain (size bytes), or NULL for zero. */
static void
image_begin(struct image *img, const char *path, uint64_t size,
            unsigned cluster_bits, const char *backing_name,
            struct qcow2_reader *backing, const uint8_t *base,
            uint64_t base_size)
{
    g_autoptr(GError) err = NULL;

    img->path = g_strdup(path);
    img->size = size;
    img->cluster_bits = cluster_bits;
    img->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    g_assert_cmpint(img->fd, >=, 0);
    img->w = qcow2_writer_new(img->fd, size, cluster_bits, backing_name,
                              backing, &err);
    g_assert_no_error(err);
    g_assert_nonnull(img->w);
    img->want = g_malloc0(size);
    if (base != NULL) {
        memcpy(img->want, base, MIN(size, base_size));
    }
}

static void
image_write(struct image *img, uint64_t off, const uint8_t *buf, size_t len)
{
    g_autoptr(GError) err = NULL;
    size_t max = qcow2_writer_max_extents(img->w, len);
    g_autofree struct qcow2_extent *ext = g_new(struct qcow2_extent, max);
    size_t n = 0;

    g_assert_true(qcow2_writer_write(img->w, off, buf, len, ext, &n, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(n, <=, max);
    for (size_t i = 0; i < n; i++) {
        g_assert_cmpuint(ext[i].buf_offset + ext[i].len, <=, len);
        g_assert_cmpuint(ext[i].host_offset % 512, ==,
                         (off + ext[i].buf_offset) % 512);
        g_assert_cmpint(pwrite(img->fd, buf + ext[i].buf_offset, ext[i].len,
                               (off_t)ext[i].host_offset),
                        ==, (ssize_t)ext[i].len);
    }
    memcpy(img->want + off, buf, len);
}

static void
image_fill(struct image *img, GRand *rand, uint64_t off, size_t len)
{
    g_autofree uint8_t *buf = g_malloc(len + 8);
    /* xorshift64 seeded from rand: megabytes of noise, cheaply. */
    uint64_t x = (uint64_t)g_rand_int(rand) << 32 | g_rand_int(rand) | 1;

    for (size_t i = 0; i < len; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    image_write(img, off, buf, len);
}

static void
image_pattern(struct image *img, uint64_t off, size_t len, uint8_t byte)
{
    g_autofree uint8_t *buf = g_malloc(len);

    memset(buf, byte, len);
    image_write(img, off, buf, len);
}

static void
image_zero(struct image *img, uint64_t off, uint64_t len)
{
    g_autoptr(GError) err = NULL;

    g_assert_true(qcow2_writer_zero(img->w, off, len, &err));
    g_assert_no_error(err);
    memset(img->want + off, 0, len);
}

/* The writer's own view before finish must already be the guest's. */
static void
image_assert_writer_read(struct image *img)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *got = g_malloc(img->size);
    uint64_t step = (UINT64_C(1) << img->cluster_bits) * 3 + 777;

    for (uint64_t off = 0; off < img->size; off += step) {
        size_t n = (size_t)MIN(step, img->size - off);
        g_assert_true(qcow2_writer_read(img->w, off, got + off, n, &err));
        g_assert_no_error(err);
    }
    assert_same_bytes(got, img->want, img->size, "qcow2_writer_read");
}

static void
image_finish(struct image *img)
{
    g_autoptr(GError) err = NULL;
    struct stat st;

    g_assert_true(qcow2_writer_finish(img->w, &err));
    g_assert_no_error(err);
    g_assert_cmpint(fstat(img->fd, &st), ==, 0);
    g_assert_cmpuint((uint64_t)st.st_size, ==, qcow2_writer_file_size(img->w));
    g_assert_cmpuint((uint64_t)st.st_size % (UINT64_C(1) << img->cluster_bits),
                     ==, 0);
    qcow2_writer_free(img->w);
    img->w = NULL;
    close(img->fd);
    img->fd = -1;
}

static void
image_clear(struct image *img)
{
    if (img->w != NULL) {
        qcow2_writer_free(img->w);
    }
    if (img->fd >= 0) {
        close(img->fd);
    }
    g_free(img->path);
    g_free(img->want);
    memset(img, 0, sizeof(*img));
    img->fd = -1;
}

/* Read the whole disk with our reader, both through pread and by walking
 * the map, and compare with want. */
static void
assert_reader_content(int dirfd, const char *path, const uint8_t *want,
                      uint64_t size)
{
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *r = qcow2_reader_open(dirfd, path, &err);
    g_autofree uint8_t *got = g_malloc(size);
    uint64_t step = 1 * MiB + 4097;

    g_assert_no_error(err);
    g_assert_nonnull(r);
    g_assert_cmpuint(qcow2_reader_virtual_size(r), ==, size);
    for (uint64_t off = 0; off < size; off += step) {
        size_t n = (size_t)MIN(step, size - off);
        g_assert_true(qcow2_reader_pread(r, off, got + off, n, &err));
        g_assert_no_error(err);
    }
    assert_same_bytes(got, want, size, "qcow2_reader_pread");

    /* Alternate small and unbounded max_len so both the limit and the
     * coalescing are exercised. */
    memset(got, 0xee, size);
    uint64_t off = 0;
    for (unsigned i = 0; off < size; i++) {
        struct qcow2_map m;
        uint64_t max_len = (i % 3 == 0) ? 12345 : UINT64_MAX;

        g_assert_true(qcow2_reader_map(r, off, max_len, &m, &err));
        g_assert_no_error(err);
        g_assert_cmpuint(m.len, >=, 1);
        g_assert_cmpuint(m.len, <=, MIN(max_len, size - off));
        g_assert_cmpuint(m.depth, <, qcow2_reader_chain_depth(r));
        if (m.kind == QCOW2_MAP_DATA) {
            g_assert_cmpint(pread(m.fd, got + off, m.len, (off_t)m.host_offset),
                            ==, (ssize_t)m.len);
        } else {
            g_assert_cmpint(m.kind, ==, QCOW2_MAP_ZERO);
            memset(got + off, 0, m.len);
        }
        off += m.len;
    }
    assert_same_bytes(got, want, size, "qcow2_reader_map");
    qcow2_reader_free(r);
}

static void
assert_image_ok(struct image *img)
{
    assert_qemu_check(img->path);
    assert_qemu_content(img->path, img->want, img->size);
    assert_reader_content(AT_FDCWD, img->path, img->want, img->size);
}

/* A mix of whole-cluster writes (runs of several clusters), partial
 * writes, whole and partial zeroes, anywhere on the disk. */
static void
random_ops(struct image *img, GRand *rand, unsigned n_ops, bool partial)
{
    uint64_t cs = UINT64_C(1) << img->cluster_bits;
    uint64_t n_clusters = (img->size + cs - 1) / cs;

    for (unsigned i = 0; i < n_ops; i++) {
        uint64_t c = (uint64_t)g_rand_int_range(rand, 0, (gint32)n_clusters);
        uint64_t run = (uint64_t)g_rand_int_range(rand, 1, 5);
        uint64_t off = c * cs;
        uint64_t len = MIN(run * cs, img->size - off);
        unsigned op = (unsigned)g_rand_int_range(rand, 0, partial ? 10 : 5);

        if (op >= 5) {
            /* Anywhere inside two clusters, any length. */
            off += (uint64_t)g_rand_int_range(rand, 0, (gint32)cs);
            off = MIN(off, img->size - 1);
            len = (uint64_t)g_rand_int_range(rand, 1, (gint32)(2 * cs));
            len = MIN(len, img->size - off);
        }
        switch (op % 5) {
        case 0:
        case 1:
        case 2:
            image_fill(img, rand, off, (size_t)len);
            break;
        case 3:
            image_zero(img, off, len);
            break;
        case 4:
            image_pattern(img, off, (size_t)len, (uint8_t)(0x10 + i));
            break;
        }
    }
}

#endif

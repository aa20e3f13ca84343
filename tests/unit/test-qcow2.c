/* qcow2 writer and reader, with real qemu-img as the oracle: every image
 * written must pass `qemu-img check` (no errors, no leaks) and read back,
 * through QEMU, as the guest content the test kept in memory. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <malloc.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "io/qcow2.h"

#include "tests/unit/qcow2_testlib.h"

/* ------------------------------------------------------------------ */
/* Writer                                                               */

static void
test_full_random_clusters(gconstpointer arg)
{
    unsigned bits = GPOINTER_TO_UINT(arg);
    uint64_t cs = UINT64_C(1) << bits;
    uint64_t size = MIN(40 * cs, 16 * MiB);
    g_autoptr(GRand) rand = g_rand_new_with_seed(bits);
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;
    struct image img = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    path = g_build_filename(dir, "disk.qcow2", NULL);
    image_begin(&img, path, size, bits, NULL, NULL, NULL, 0);

    /* Each cluster: data (some in multi-cluster writes), zero, or left
     * alone, then some overwritten and some data zeroed. */
    for (uint64_t c = 0; c < size / cs;) {
        unsigned kind = (unsigned)g_rand_int_range(rand, 0, 5);
        uint64_t run =
            MIN((uint64_t)g_rand_int_range(rand, 1, 4), size / cs - c);
        if (kind <= 1) {
            image_fill(&img, rand, c * cs, (size_t)(run * cs));
        } else if (kind == 2) {
            image_zero(&img, c * cs, run * cs);
        }
        c += run;
    }
    for (unsigned i = 0; i < 10; i++) {
        uint64_t c = (uint64_t)g_rand_int_range(rand, 0, (gint32)(size / cs));
        if (i % 2) {
            image_fill(&img, rand, c * cs, (size_t)cs);
        } else {
            image_zero(&img, c * cs, cs);
        }
    }
    uint64_t data = qcow2_writer_data_bytes(img.w);
    uint64_t zero = qcow2_writer_zero_bytes(img.w);
    g_assert_cmpuint(data % cs, ==, 0);
    g_assert_cmpuint(data + zero, <=, size);
    /* And pieces of clusters, at every cluster size. */
    random_ops(&img, rand, 12, true);
    image_assert_writer_read(&img);
    image_finish(&img);
    assert_image_ok(&img);

    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_partial_cluster_at_odd_end(gconstpointer arg)
{
    const uint64_t size = *(const uint64_t *)arg;
    g_autoptr(GRand) rand = g_rand_new_with_seed(7);
    g_autofree char *dir = NULL;
    g_autofree char *p1 = NULL, *p2 = NULL, *p3 = NULL;
    struct image img = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();

    /* The whole disk in 1 MiB writes: the last one is short. */
    p1 = g_build_filename(dir, "whole.qcow2", NULL);
    if (size % 512 != 0) {
        image_begin(&img, p1, size, 16, NULL, NULL, NULL, 0);
        for (uint64_t off = 0; off < size; off += MiB) {
            image_fill(&img, rand, off, (size_t)MIN(MiB, size - off));
        }
        g_assert_cmpuint(qcow2_writer_data_bytes(img.w), ==, size);
        image_finish(&img);
        assert_image_ok(&img);
        image_clear(&img);
    }

    /* Only the last guest bytes, in pieces; the cluster stays partial
     * until finish and its tail past the end is never seen. */
    p2 = g_build_filename(dir, "tail.qcow2", NULL);
    image_begin(&img, p2, size, 16, NULL, NULL, NULL, 0);
    image_fill(&img, rand, size - 100, 100);
    image_fill(&img, rand, size - 5000, 1000);
    image_zero(&img, size - 3000, 10);
    image_assert_writer_read(&img);
    image_finish(&img);
    assert_image_ok(&img);
    image_clear(&img);

    /* The valid part of the last cluster in two writes completes it. */
    p3 = g_build_filename(dir, "tail-complete.qcow2", NULL);
    image_begin(&img, p3, size, 12, NULL, NULL, NULL, 0);
    uint64_t last = size & ~(UINT64_C(4096) - 1);
    image_fill(&img, rand, last, 17);
    image_fill(&img, rand, last + 17, (size_t)(size - last - 17));
    image_fill(&img, rand, last - 4096, (size_t)(size - last + 4096));
    image_finish(&img);
    assert_image_ok(&img);
    image_clear(&img);

    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_partial_clusters_in_middle(gconstpointer data)
{
    unsigned bits = GPOINTER_TO_UINT(data);
    uint64_t cs = UINT64_C(1) << bits;
    uint64_t size = 24 * cs;
    g_autoptr(GRand) rand = g_rand_new_with_seed(11);
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;
    struct image img = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    path = g_build_filename(dir, "disk.qcow2", NULL);
    image_begin(&img, path, size, bits, NULL, NULL, NULL, 0);

    image_fill(&img, rand, 3 * cs + 17, 300); /* left partial */
    image_fill(&img, rand, 5 * cs + 100, (size_t)(2 * cs - 200)); /* 5,6,7 */
    image_fill(&img, rand, 9 * cs, (size_t)(cs / 2)); /* completed ... */
    image_fill(&img, rand, 9 * cs + cs / 2, (size_t)(cs / 2)); /* ... here */
    image_fill(&img, rand, 11 * cs + 5, 100);                  /* then whole */
    image_fill(&img, rand, 11 * cs, (size_t)cs);
    image_fill(&img, rand, 13 * cs + 5, 100); /* then zeroed */
    image_zero(&img, 13 * cs, cs);
    image_zero(&img, 15 * cs, cs);              /* zero, then */
    image_fill(&img, rand, 15 * cs + 200, 100); /* partial data */
    image_zero(&img, 17 * cs + 10, 100);        /* partial zero */
    image_fill(&img, rand, 17 * cs + 50, 200);  /* overlapping */
    image_fill(&img, rand, 19 * cs + 100, 100); /* overlapping */
    image_fill(&img, rand, 19 * cs + 150, 100); /* pieces */
    image_fill(&img, rand, 19 * cs + 50, 60);
    image_fill(&img, rand, 19 * cs + 300, (size_t)(cs - 300));
    image_fill(&img, rand, 19 * cs, 50);    /* completes 19 */
    image_fill(&img, rand, 21 * cs, 1);     /* one byte */
    image_fill(&img, rand, 22 * cs - 1, 2); /* across a boundary */
    image_assert_writer_read(&img);
    image_finish(&img);
    assert_image_ok(&img);

    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* A full image of random data to put incremental layers on. */
static void
write_random_base(struct image *img, const char *path, uint64_t size,
                  unsigned bits, GRand *rand)
{
    image_begin(img, path, size, bits, NULL, NULL, NULL, 0);
    for (uint64_t off = 0; off < size; off += MiB) {
        image_fill(img, rand, off, (size_t)MIN(MiB, size - off));
    }
    image_finish(img);
}

static void
test_incremental_partial_over_backing(void)
{
    const unsigned bits = 16;
    const uint64_t cs = UINT64_C(1) << bits;
    const uint64_t size = 4 * MiB;
    g_autoptr(GRand) rand = g_rand_new_with_seed(3);
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = NULL;
    g_autofree char *base_path = NULL, *top_path = NULL;
    struct image base = {.fd = -1}, top = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    base_path = g_build_filename(dir, "base.qcow2", NULL);
    top_path = g_build_filename(dir, "top.qcow2", NULL);
    write_random_base(&base, base_path, size, bits, rand);

    struct qcow2_reader *backing = qcow2_reader_open(AT_FDCWD, base_path, &err);
    g_assert_no_error(err);
    image_begin(&top, top_path, size, bits, "base.qcow2", backing, base.want,
                size);
    image_fill(&top, rand, 2 * cs + 1000, 3000);            /* rest: base */
    image_fill(&top, rand, 4 * cs + 100, (size_t)(2 * cs)); /* 4,5,6 */
    image_zero(&top, 8 * cs + 10, 20);                      /* partial zero */
    image_zero(&top, 9 * cs + cs / 2, cs);                  /* half, half */
    image_fill(&top, rand, 11 * cs, 10);                    /* completed */
    image_fill(&top, rand, 11 * cs + 10, (size_t)(cs - 10));
    image_zero(&top, 12 * cs, cs);          /* zero, then */
    image_fill(&top, rand, 12 * cs + 5, 5); /* base is zero */
    random_ops(&top, rand, 40, true);
    image_assert_writer_read(&top);
    image_finish(&top);
    assert_image_ok(&top);
    qcow2_reader_free(backing);

    image_clear(&base);
    image_clear(&top);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* In an incremental layer "unallocated" shows the backing file's data;
 * zeroes must be zero clusters. */
static void
test_incremental_zero_not_unallocated(void)
{
    const unsigned bits = 12;
    const uint64_t cs = UINT64_C(1) << bits;
    const uint64_t size = 6 * MiB; /* 3 L2 tables of 2 MiB reach */
    g_autoptr(GRand) rand = g_rand_new_with_seed(5);
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = NULL;
    g_autofree char *base_path = NULL, *top_path = NULL;
    struct image base = {.fd = -1}, top = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    base_path = g_build_filename(dir, "base.qcow2", NULL);
    top_path = g_build_filename(dir, "top.qcow2", NULL);
    write_random_base(&base, base_path, size, bits, rand);

    struct qcow2_reader *backing = qcow2_reader_open(AT_FDCWD, base_path, &err);
    g_assert_no_error(err);
    image_begin(&top, top_path, size, bits, "base.qcow2", backing, base.want,
                size);
    image_zero(&top, 0, cs);
    image_zero(&top, 7 * cs, 3 * cs);
    image_fill(&top, rand, 100 * cs, (size_t)(4 * cs));
    image_zero(&top, 101 * cs, cs);              /* data zeroed again */
    image_zero(&top, 2 * MiB, 2 * MiB);          /* a whole L2 table's reach */
    image_fill(&top, rand, 3 * MiB, (size_t)cs); /* and data inside it */
    g_assert_cmpuint(qcow2_writer_zero_bytes(top.w), ==, 2 * MiB - cs + 5 * cs);
    g_assert_cmpuint(qcow2_writer_data_bytes(top.w), ==, 4 * cs);
    image_finish(&top);
    assert_image_ok(&top);
    qcow2_reader_free(backing);

    image_clear(&base);
    image_clear(&top);
    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_overwrite_written_cluster(void)
{
    const uint64_t cs = 64 * KiB;
    g_autoptr(GRand) rand = g_rand_new_with_seed(13);
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;
    struct image img = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    path = g_build_filename(dir, "disk.qcow2", NULL);
    image_begin(&img, path, 2 * MiB, 16, NULL, NULL, NULL, 0);
    image_fill(&img, rand, 0, (size_t)(4 * cs));
    uint64_t before = qcow2_writer_file_size(img.w);
    image_fill(&img, rand, cs, (size_t)cs);           /* whole, in place */
    image_fill(&img, rand, 2 * cs + 7, 1000);         /* piece, in place */
    image_fill(&img, rand, cs / 2, (size_t)(3 * cs)); /* across all four */
    g_assert_cmpuint(qcow2_writer_file_size(img.w), ==, before);
    image_finish(&img);
    assert_image_ok(&img);

    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_zero_written_cluster(void)
{
    const uint64_t cs = 64 * KiB;
    g_autoptr(GRand) rand = g_rand_new_with_seed(17);
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;
    struct image img = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    path = g_build_filename(dir, "disk.qcow2", NULL);
    image_begin(&img, path, 2 * MiB, 16, NULL, NULL, NULL, 0);
    image_fill(&img, rand, 0, (size_t)(8 * cs));
    image_zero(&img, cs, cs);               /* unreferenced: no leak */
    image_zero(&img, 3 * cs + 100, 5000);   /* zeroes in place */
    image_zero(&img, 5 * cs - 10, 2 * cs);  /* piece, whole, piece */
    image_fill(&img, rand, cs, (size_t)cs); /* fresh cluster again */
    image_zero(&img, 0, 2 * MiB);           /* then everything */
    image_fill(&img, rand, 7 * cs, 10);
    image_finish(&img);
    assert_image_ok(&img);

    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* full + 3 incrementals in sibling directories, named relatively as qbak
 * names them; QEMU and our reader resolve the names. */
static void
test_chain_relative_backing(void)
{
    const unsigned bits = 16;
    const uint64_t size = 8 * MiB + 4567;
    g_autoptr(GRand) rand = g_rand_new_with_seed(23);
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = NULL;
    g_autofree uint8_t *want = g_malloc0(size);
    int dirfd;

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    g_assert_cmpint(dirfd, >=, 0);

    for (unsigned n = 0; n < 4; n++) {
        g_autofree char *sub = g_strdup_printf("%s/p%u", dir, n);
        g_autofree char *path = g_strdup_printf("%s/disk.qcow2", sub);
        /* The layer below, as we open it and as the header names it. */
        g_autofree char *below =
            n > 0 ? g_strdup_printf("p%u/disk.qcow2", n - 1) : NULL;
        g_autofree char *name =
            n > 0 ? g_strdup_printf("../p%u/disk.qcow2", n - 1) : NULL;
        struct qcow2_reader *backing = NULL;
        struct image img = {.fd = -1};

        g_assert_cmpint(g_mkdir(sub, 0755), ==, 0);
        if (n > 0) {
            backing = qcow2_reader_open(dirfd, below, &err);
            g_assert_no_error(err);
            g_assert_cmpuint(qcow2_reader_chain_depth(backing), ==, n);
        }
        image_begin(&img, path, size, bits, name, backing, want, size);
        if (n == 0) {
            random_ops(&img, rand, 60, false);
        }
        random_ops(&img, rand, 25, true);
        image_finish(&img);
        assert_qemu_check(path);
        memcpy(want, img.want, size);
        qcow2_reader_free(backing);
        image_clear(&img);
    }

    g_autofree char *top = g_strdup_printf("%s/p3/disk.qcow2", dir);
    assert_qemu_content(top, want, size);
    assert_reader_content(dirfd, "p3/disk.qcow2", want, size);

    struct qcow2_reader *r = qcow2_reader_open(dirfd, "p3/disk.qcow2", &err);
    g_assert_no_error(err);
    g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 4);
    g_assert_cmpstr(qcow2_reader_backing_file(r), ==, "../p2/disk.qcow2");
    g_assert_cmpuint(qcow2_reader_cluster_bits(r), ==, bits);
    /* Every layer answers for some of the disk. */
    bool answered[4] = {false};
    for (uint64_t off = 0; off < size;) {
        struct qcow2_map m;
        g_assert_true(qcow2_reader_map(r, off, UINT64_MAX, &m, &err));
        g_assert_no_error(err);
        answered[m.depth] = true;
        off += m.len;
    }
    for (unsigned i = 0; i < 4; i++) {
        g_assert_true(answered[i]);
    }
    qcow2_reader_free(r);

    close(dirfd);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* More partial clusters than the writer keeps in memory: the oldest are
 * written out early, filled from the backing file, with the same result. */
static void
test_many_partial_clusters(void)
{
    const unsigned bits = 9;
    const uint64_t cs = UINT64_C(1) << bits;
    const uint64_t size = 4 * MiB; /* 8192 clusters */
    g_autoptr(GRand) rand = g_rand_new_with_seed(29);
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = NULL;
    g_autofree char *base_path = NULL, *top_path = NULL, *full_path = NULL;
    struct image base = {.fd = -1}, top = {.fd = -1}, full = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    base_path = g_build_filename(dir, "base.qcow2", NULL);
    top_path = g_build_filename(dir, "top.qcow2", NULL);
    full_path = g_build_filename(dir, "full.qcow2", NULL);
    write_random_base(&base, base_path, size, bits, rand);

    struct qcow2_reader *backing = qcow2_reader_open(AT_FDCWD, base_path, &err);
    g_assert_no_error(err);
    image_begin(&top, top_path, size, bits, "base.qcow2", backing, base.want,
                size);
    image_begin(&full, full_path, size, bits, NULL, NULL, NULL, 0);
    for (uint64_t c = 0; c < 6000; c++) {
        image_fill(&top, rand, c * cs + 10 + c % 100, 10);
        image_fill(&full, rand, c * cs + 10 + c % 100, 10);
    }
    /* Finish some of those that were written out early. */
    for (uint64_t c = 0; c < 20; c++) {
        image_fill(&top, rand, c * cs + 200, 20);
        image_zero(&top, c * cs + 300, 20);
    }
    image_assert_writer_read(&top);
    image_finish(&top);
    image_finish(&full);
    assert_image_ok(&top);
    assert_image_ok(&full);
    qcow2_reader_free(backing);

    image_clear(&base);
    image_clear(&top);
    image_clear(&full);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* A backing file smaller than the layer reads as zero past its end. */
static void
test_shorter_backing_reads_zero(void)
{
    const uint64_t base_size = 1 * MiB + 512;
    const uint64_t size = 3 * MiB;
    g_autoptr(GRand) rand = g_rand_new_with_seed(31);
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = NULL;
    g_autofree char *base_path = NULL, *top_path = NULL;
    struct image base = {.fd = -1}, top = {.fd = -1};

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    base_path = g_build_filename(dir, "base.qcow2", NULL);
    top_path = g_build_filename(dir, "top.qcow2", NULL);
    write_random_base(&base, base_path, base_size, 16, rand);

    struct qcow2_reader *backing = qcow2_reader_open(AT_FDCWD, base_path, &err);
    g_assert_no_error(err);
    image_begin(&top, top_path, size, 16, "base.qcow2", backing, base.want,
                base_size);
    image_fill(&top, rand, MiB + 100, 50);  /* cluster straddling the end */
    image_fill(&top, rand, 2 * MiB + 1, 5); /* wholly past it */
    image_fill(&top, rand, 5000, 10);
    image_assert_writer_read(&top);
    image_finish(&top);
    assert_image_ok(&top);
    qcow2_reader_free(backing);

    image_clear(&base);
    image_clear(&top);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* Bytes the heap holds (0 under sanitizers and valgrind, which replace
 * malloc: the checks below then pass trivially). */
static size_t
heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();

    return mi.uordblks + mi.hblkhd;
}

/* Memory follows the touched part: a 1 TiB disk, a few writes, a TRIM of
 * a large range. */
static void
test_large_sparse_disk(void)
{
    const uint64_t size = TiB;
    const uint64_t cs = 64 * KiB;
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *buf = g_malloc(cs);
    struct qcow2_extent ext[4];
    size_t n;
    int fd;

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    path = g_build_filename(dir, "disk.qcow2", NULL);
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    g_assert_cmpint(fd, >=, 0);
    size_t heap_before = heap_in_use();
    struct qcow2_writer *w = qcow2_writer_new(fd, size, 16, NULL, NULL, &err);
    g_assert_no_error(err);

    const uint64_t at[] = {0, 300 * GiB + 5 * cs, size - cs};
    for (unsigned i = 0; i < G_N_ELEMENTS(at); i++) {
        memset(buf, 0x40 + i, cs);
        g_assert_true(qcow2_writer_write(w, at[i], buf, cs, ext, &n, &err));
        g_assert_cmpuint(n, ==, 1);
        g_assert_cmpint(pwrite(fd, buf, cs, (off_t)ext[0].host_offset), ==,
                        (ssize_t)cs);
    }
    g_assert_true(qcow2_writer_zero(w, 500 * GiB, 64 * GiB, &err));
    g_assert_true(qcow2_writer_zero(w, 600 * GiB + 4096, 4096, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(qcow2_writer_zero_bytes(w), ==, 64 * GiB);
    /* A flat L2 array would be 128 MiB; three 64 KiB tables are touched. */
    g_assert_cmpuint(heap_in_use() - heap_before, <, 2 * MiB);
    g_assert_true(qcow2_writer_finish(w, &err));
    g_assert_no_error(err);
    /* Data, 3 + 128 L2 tables, the L1 table and refcounts. */
    g_assert_cmpuint(qcow2_writer_file_size(w), <, 10 * MiB);
    qcow2_writer_free(w);
    close(fd);

    assert_qemu_check(path);
    /* Through QEMU: the data, a zeroed table reach, unallocated space. */
    g_autofree char *r0 =
        g_strdup_printf("read -P 0x40 %" PRIu64 " 64k", at[0]);
    g_autofree char *r1 =
        g_strdup_printf("read -P 0x41 %" PRIu64 " 64k", at[1]);
    g_autofree char *r2 =
        g_strdup_printf("read -P 0x42 %" PRIu64 " 64k", at[2]);
    const char *reads[] = {r0,
                           r1,
                           r2,
                           "read -P 0 500G 1M",
                           "read -P 0 563G 1M",
                           "read -P 0 100G 1M",
                           NULL};
    qemu_io(path, true, reads);

    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
    g_assert_no_error(err);
    struct qcow2_map m;
    g_assert_true(qcow2_reader_map(r, 0, UINT64_MAX, &m, &err));
    g_assert_cmpint(m.kind, ==, QCOW2_MAP_DATA);
    g_assert_cmpuint(m.len, ==, cs);
    g_assert_true(qcow2_reader_map(r, cs, UINT64_MAX, &m, &err));
    g_assert_cmpint(m.kind, ==, QCOW2_MAP_ZERO);
    g_assert_cmpuint(m.len, ==, 300 * GiB + 4 * cs);
    g_assert_true(qcow2_reader_map(r, 500 * GiB - 1, UINT64_MAX, &m, &err));
    g_assert_cmpint(m.kind, ==, QCOW2_MAP_ZERO);
    g_assert_cmpuint(m.len, ==, size - cs - (500 * GiB - 1));
    g_assert_no_error(err);
    qcow2_reader_free(r);

    /* TRIM of the whole disk, in one request and in 1 GiB requests. */
    for (unsigned pass = 0; pass < 2; pass++) {
        heap_before = heap_in_use();
        w = qcow2_writer_new(-1, size, 16, NULL, NULL, &err);
        g_assert_no_error(err);
        for (uint64_t off = 0; off < size; off += pass ? GiB : size) {
            g_assert_true(qcow2_writer_zero(w, off, pass ? GiB : size, &err));
        }
        g_assert_no_error(err);
        g_assert_cmpuint(qcow2_writer_zero_bytes(w), ==, size);
        g_assert_cmpuint(heap_in_use() - heap_before, <, 2 * MiB);
        qcow2_writer_free(w);
    }

    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_writer_rejects_bad_arguments(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autofree char *path = g_build_filename(dir, "disk.qcow2", NULL);
    g_autofree char *long_name = g_strnfill(1024, 'a');
    g_autofree char *mid_name = g_strnfill(400, 'b');
    uint8_t buf[512] = {0};
    struct qcow2_extent ext[8];
    size_t n = 99;
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    struct {
        uint64_t size;
        unsigned bits;
        const char *backing;
    } bad[] = {
        {MiB, 8, NULL},
        {MiB, 22, NULL},
        {0, 16, NULL},
        {QCOW2_MAX_VIRTUAL_SIZE + 1, 16, NULL},
        {QCOW2_MAX_VIRTUAL_SIZE, 12, NULL}, /* L1 table over 32 MiB */
        {MiB, 16, ""},
        {MiB, 16, long_name},
        {MiB, 9, mid_name}, /* does not fit cluster 0 */
    };

    g_assert_cmpint(fd, >=, 0);
    for (unsigned i = 0; i < G_N_ELEMENTS(bad); i++) {
        GError *err = NULL;
        g_assert_null(qcow2_writer_new(fd, bad[i].size, bad[i].bits,
                                       bad[i].backing, NULL, &err));
        g_assert_nonnull(err);
        g_error_free(err);
    }

    GError *err = NULL;
    struct qcow2_writer *w = qcow2_writer_new(fd, MiB, 9, NULL, NULL, &err);
    g_assert_no_error(err);
    g_assert_false(qcow2_writer_write(w, MiB - 1, buf, 2, ext, &n, &err));
    g_assert_cmpuint(n, ==, 0);
    g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_INVAL);
    g_clear_error(&err);
    g_assert_false(qcow2_writer_write(w, UINT64_MAX, buf, 2, ext, &n, &err));
    g_clear_error(&err);
    g_assert_false(qcow2_writer_zero(w, 1, UINT64_MAX, &err));
    g_clear_error(&err);
    g_assert_false(qcow2_writer_read(w, MiB, buf, 1, &err));
    g_clear_error(&err);
    g_assert_cmpuint(qcow2_writer_data_bytes(w), ==, 0);
    g_assert_true(qcow2_writer_finish(w, &err));
    g_assert_false(qcow2_writer_write(w, 0, buf, 1, ext, &n, &err));
    g_clear_error(&err);
    g_assert_false(qcow2_writer_finish(w, &err));
    g_clear_error(&err);
    qcow2_writer_free(w);
    close(fd);
    if (have_qemu_img()) {
        assert_qemu_check(path);
    }
    tmpdir_remove(g_steal_pointer(&dir));
}

/* A failed write is never turned into a success later. */
static void
test_write_error_is_sticky(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autofree char *path = g_build_filename(dir, "disk.qcow2", NULL);
    uint8_t buf[4096] = {0};
    struct qcow2_extent ext[8];
    size_t n;
    GError *err = NULL;

    g_assert_true(g_file_set_contents(path, "", 0, NULL));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct qcow2_writer *w = qcow2_writer_new(fd, MiB, 12, NULL, NULL, &err);
    g_assert_no_error(err);
    /* Whole clusters are the caller's I/O: no error here. */
    g_assert_true(qcow2_writer_write(w, 0, buf, 4096, ext, &n, &err));
    g_assert_true(qcow2_writer_write(w, 8192, buf, 100, ext, &n, &err));
    g_assert_cmpuint(n, ==, 0);
    /* Completing a partial cluster is the writer's own pwrite. */
    g_assert_false(qcow2_writer_write(w, 8292, buf, 3996, ext, &n, &err));
    g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_BADF);
    g_clear_error(&err);
    g_assert_false(qcow2_writer_write(w, 0, buf, 4096, ext, &n, &err));
    g_clear_error(&err);
    g_assert_false(qcow2_writer_zero(w, 0, 4096, &err));
    g_clear_error(&err);
    g_assert_false(qcow2_writer_finish(w, &err));
    g_assert_nonnull(err);
    g_clear_error(&err);
    qcow2_writer_free(w);
    close(fd);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* ------------------------------------------------------------------ */
/* Reader                                                               */

static uint8_t *
qemu_content(const char *path, uint64_t size)
{
    g_autofree char *raw = g_strconcat(path, ".raw", NULL);
    const char *argv[] = {"qemu-img", "convert", "-t", "unsafe", "-f", "qcow2",
                          "-O",       "raw",     path, raw,      NULL};
    char *got = NULL;
    gsize len = 0;

    g_assert_cmpint(run(argv, NULL), ==, 0);
    g_assert_true(g_file_get_contents(raw, &got, &len, NULL));
    g_assert_cmpuint(len, ==, size);
    g_unlink(raw);
    return (uint8_t *)got;
}

/* Images QEMU wrote itself: v3 and v2 (compat=0.10), three cluster
 * sizes, an overlay with partial-cluster writes, and our writer on top of
 * QEMU's chain. */
static void
test_reader_qemu_img_created(void)
{
    const char *const variants[][2] = {
        {"compat=1.1,cluster_size=65536", "16"},
        {"compat=0.10,cluster_size=65536", "16"},
        {"compat=1.1,cluster_size=512", "9"},
        {"compat=1.1,cluster_size=2097152", "21"},
    };
    const uint64_t size = 4 * MiB;
    g_autoptr(GError) err = NULL;
    g_autofree char *dir = NULL;

    if (!have_qemu_img()) {
        return;
    }
    dir = tmpdir_new();
    for (unsigned i = 0; i < G_N_ELEMENTS(variants); i++) {
        g_autofree char *base = g_strdup_printf("%s/base%u.qcow2", dir, i);
        g_autofree char *over = g_strdup_printf("%s/over%u.qcow2", dir, i);
        g_autofree char *ours = g_strdup_printf("%s/ours%u.qcow2", dir, i);
        g_autofree char *base_name = g_strdup_printf("base%u.qcow2", i);
        g_autofree char *over_name = g_strdup_printf("over%u.qcow2", i);
        const char *create_base[] = {"qemu-img", "create", "-q",           "-f",
                                     "qcow2",    "-o",     variants[i][0], base,
                                     "4M",       NULL};
        const char *create_over[] = {
            "qemu-img", "create",  "-q", "-f",    "qcow2", "-o", variants[i][0],
            "-b",       base_name, "-F", "qcow2", over,    NULL};
        const char *base_cmds[] = {"write -P 0x5a 0 64k", "write -z 1M 64k",
                                   "write -P 0x33 2M 1M", NULL};
        const char *over_cmds[] = {"write -P 0x77 32k 64k", "write -z 2M 512",
                                   "discard 3M 1M", "write -P 0x44 4095k 1k",
                                   NULL};
        const bool v2 = strstr(variants[i][0], "0.10") != NULL;

        g_assert_cmpint(run(create_base, NULL), ==, 0);
        qemu_io(base, false, base_cmds);
        g_assert_cmpint(run(create_over, NULL), ==, 0);
        qemu_io(over, false, over_cmds);

        /* The overlay's content covers the base wherever the overlay
         * left clusters unallocated. */
        g_autofree uint8_t *want_over = qemu_content(over, size);
        assert_reader_content(AT_FDCWD, over, want_over, size);

        struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, over, &err);
        g_assert_no_error(err);
        g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 2);
        g_assert_cmpuint(qcow2_reader_cluster_bits(r), ==,
                         atoi(variants[i][1]));
        g_assert_cmpstr(qcow2_reader_backing_file(r), ==, base_name);
        struct qcow2_map m;
        g_assert_true(qcow2_reader_map(r, 0, 32 * KiB, &m, &err));
        g_assert_cmpint(m.kind, ==, QCOW2_MAP_DATA);
        if (!v2 && strcmp(variants[i][1], "16") == 0) {
            /* v2 has no zero clusters (QEMU writes real zeroes); with
             * other cluster sizes the zeroes share a cluster with data. */
            g_assert_true(qcow2_reader_map(r, MiB, 64 * KiB, &m, &err));
            g_assert_cmpint(m.kind, ==, QCOW2_MAP_ZERO);
            g_assert_cmpuint(m.len, ==, 64 * KiB);
        }
        g_assert_no_error(err);

        /* Our incremental over QEMU's chain (other cluster sizes than
         * ours for one of them), partial clusters filled from it. */
        if (i % 2 == 1) {
            qcow2_reader_free(r);
            continue;
        }
        struct image img = {.fd = -1};
        g_autoptr(GRand) rand = g_rand_new_with_seed(i);
        image_begin(&img, ours, size, 16, over_name, r, want_over, size);
        random_ops(&img, rand, 30, true);
        image_finish(&img);
        assert_image_ok(&img);
        image_clear(&img);
        qcow2_reader_free(r);
    }
    tmpdir_remove(g_steal_pointer(&dir));
}

/* A small valid image to damage: data clusters 1..3 (guest clusters
 * 0..2), L2 table, L1 table, refcounts. */
static char *
make_victim(const char *dir, const char *name, const char *backing)
{
    char *path = g_build_filename(dir, name, NULL);
    struct image img = {.fd = -1};

    image_begin(&img, path, MiB, 16, backing, NULL, NULL, 0);
    image_pattern(&img, 0, 3 * 64 * KiB, 0xab);
    image_finish(&img);
    image_clear(&img);
    return path;
}

static void
assert_open_fails(int dirfd, const char *path, const char *why)
{
    GError *err = NULL;
    struct qcow2_reader *r = qcow2_reader_open(dirfd, path, &err);

    if (r != NULL) {
        g_error("%s: opened, expected failure (%s)", path, why);
    }
    g_assert_nonnull(err);
    g_test_message("%s: %s", why, err->message);
    g_error_free(err);
}

/* Damage found only when the tables are walked: open works, reading the
 * disk fails cleanly. */
static void
assert_read_fails(const char *path, const char *why)
{
    GError *err = NULL;
    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
    g_autofree uint8_t *buf = g_malloc(MiB);

    g_assert_no_error(err);
    g_assert_nonnull(r);
    g_assert_false(qcow2_reader_pread(r, 0, buf, MiB, &err));
    g_assert_nonnull(err);
    g_test_message("%s: %s", why, err->message);
    g_error_free(err);
    qcow2_reader_free(r);
}

struct header_damage {
    const char *name;
    uint64_t offset;
    unsigned width; /* 4 or 8 */
    uint64_t value;
};

/* Offsets in make_victim()'s image: header fields, then the backing
 * format extension at 104 (length at 108), its end marker at 120 and the
 * name at 128. */
static const struct header_damage header_damage[] = {
    {"bad-magic", 0, 4, 0x514649fa},
    {"version-1", 4, 4, 1},
    {"version-4", 4, 4, 4},
    {"cluster-bits-30", 20, 4, 30},
    {"cluster-bits-8", 20, 4, 8},
    {"huge-virtual-size", 24, 8, UINT64_C(1) << 60},
    {"encrypted", 32, 4, 1},
    {"huge-l1", 36, 4, 0x7fffffff},
    {"l1-larger-than-file", 36, 4, 100000},
    {"l1-too-small-for-size", 24, 8, TiB},
    {"unaligned-l1", 40, 8, 5 * 64 * KiB + 8},
    {"l1-past-eof", 40, 8, 1000 * 64 * KiB},
    {"l1-at-zero", 40, 8, 0},
    {"incompatible-corrupt", 72, 8, 1 << 1},
    {"incompatible-external-data", 72, 8, 1 << 2},
    {"incompatible-compression-type", 72, 8, 1 << 3},
    {"incompatible-extended-l2", 72, 8, 1 << 4},
    {"incompatible-unknown", 72, 8, UINT64_C(1) << 40},
    {"refcount-order-7", 96, 4, 7},
    {"header-length-small", 100, 4, 72},
    {"header-length-huge", 100, 4, 128 * KiB},
    {"backing-name-too-long", 16, 4, 2000},
    {"backing-name-past-cluster", 8, 8, 64 * KiB + 8},
    {"backing-name-overruns-cluster", 8, 8, 64 * KiB - 4},
    {"extension-overruns-header", 108, 4, 0x10000},
};

/* A valid image whose backing file exists, so that only the damage can
 * make opening it fail. */
static char *
make_victim_over_target(const char *dir, const char *name)
{
    g_autofree char *target = g_build_filename(dir, "target.qcow2", NULL);

    if (!g_file_test(target, G_FILE_TEST_EXISTS)) {
        g_free(make_victim(dir, "target.qcow2", NULL));
    }
    return make_victim(dir, name, "target.qcow2");
}

static void
test_reader_rejects_header(gconstpointer data)
{
    const struct header_damage *d = data;
    g_autofree char *dir = tmpdir_new();
    g_autofree char *path = make_victim_over_target(dir, "victim.qcow2");
    GError *err = NULL;

    /* Undamaged, it opens. */
    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
    g_assert_no_error(err);
    qcow2_reader_free(r);

    if (d->width == 4) {
        patch_be32(path, d->offset, (uint32_t)d->value);
    } else {
        patch_be64(path, d->offset, d->value);
    }
    assert_open_fails(AT_FDCWD, path, d->name);
    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_reader_rejects_other_headers(void)
{
    g_autofree char *dir = tmpdir_new();
    GError *err = NULL;

    /* The dirty bit only concerns refcounts: readable. */
    g_autofree char *dirty = make_victim(dir, "dirty.qcow2", NULL);
    patch_be64(dirty, 72, 1);
    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, dirty, &err);
    g_assert_no_error(err);
    qcow2_reader_free(r);

    /* A backing format other than qcow2. */
    g_autofree char *raw = make_victim_over_target(dir, "raw-backing.qcow2");
    patch(raw, 104 + 8, "raw\0\0", 5);
    patch_be32(raw, 104 + 4, 3);
    assert_open_fails(AT_FDCWD, raw, "raw backing format");

    /* A NUL inside the backing name. */
    g_autofree char *nul = make_victim_over_target(dir, "nul-name.qcow2");
    patch(nul, 128 + 1, "", 1);
    assert_open_fails(AT_FDCWD, nul, "NUL in backing name");

    /* Truncated files. */
    const unsigned lengths[] = {0, 50, 71, 100, 103};
    for (unsigned i = 0; i < G_N_ELEMENTS(lengths); i++) {
        g_autofree char *name = g_strdup_printf("trunc%u.qcow2", lengths[i]);
        g_autofree char *path = make_victim(dir, name, NULL);
        g_assert_cmpint(truncate(path, lengths[i]), ==, 0);
        assert_open_fails(AT_FDCWD, path, name);
    }
    /* Cut inside the L1 table. */
    g_autofree char *cut = make_victim(dir, "cut.qcow2", NULL);
    g_assert_cmpint(truncate(cut, (off_t)peek_be64(cut, 40) + 4), ==, 0);
    assert_open_fails(AT_FDCWD, cut, "file ends inside the L1 table");

    g_assert_null(qcow2_reader_open(AT_FDCWD, "/nonexistent.qcow2", &err));
    g_clear_error(&err);
    g_assert_null(qcow2_reader_open(AT_FDCWD, dir, &err));
    g_clear_error(&err);
    tmpdir_remove(g_steal_pointer(&dir));
}

struct table_damage {
    const char *name;
    bool l1; /* patch the L1 entry, else the L2 entry of guest cluster 1 */
    uint64_t value;
};

#define CS64K (64 * KiB)
#define COPIED (UINT64_C(1) << 63)
static const struct table_damage table_damage[] = {
    {"l2-past-eof", true, (100 * CS64K) | COPIED},
    {"unaligned-l2", true, (4 * CS64K + 512) | COPIED},
    {"l1-reserved-bits", true, 4 * CS64K | 1},
    {"l1-reserved-high-bits", true, 4 * CS64K | (UINT64_C(1) << 60)},
    {"unaligned-data", false, (2 * CS64K + 512) | COPIED},
    {"data-past-eof", false, (1000 * CS64K) | COPIED},
    {"data-offset-too-large", false, UINT64_C(0x00ffffffffff0000)},
    {"compressed-cluster", false, UINT64_C(1) << 62 | 2 * CS64K},
    {"l2-reserved-bits", false, 2 * CS64K | 0x10},
    {"l2-reserved-high-bits", false, 2 * CS64K | (UINT64_C(1) << 57)},
    {"unaligned-zero-cluster", false, (2 * CS64K + 512) | 1},
};

static void
test_reader_rejects_table(gconstpointer data)
{
    const struct table_damage *d = data;
    g_autofree char *dir = tmpdir_new();
    g_autofree char *path = make_victim(dir, "victim.qcow2", NULL);
    uint64_t l1_offset = peek_be64(path, 40);
    uint64_t l2_offset = peek_be64(path, l1_offset) & ~COPIED;
    g_autofree uint8_t *buf = g_malloc(MiB);
    GError *err = NULL;

    g_assert_cmpuint(l2_offset, ==, 4 * CS64K); /* make_victim's layout */
    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
    g_assert_true(qcow2_reader_pread(r, 0, buf, MiB, &err));
    g_assert_no_error(err);
    qcow2_reader_free(r);

    if (d->l1) {
        patch_be64(path, l1_offset, d->value);
    } else {
        patch_be64(path, l2_offset + 8, d->value);
    }
    assert_read_fails(path, d->name);
    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_reader_rejects_bad_chains(void)
{
    g_autofree char *dir = tmpdir_new();
    GError *err = NULL;
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    g_assert_cmpint(dirfd, >=, 0);
    g_free(make_victim(dir, "self.qcow2", "self.qcow2"));
    assert_open_fails(dirfd, "self.qcow2", "backing file is itself");
    g_free(make_victim(dir, "a.qcow2", "b.qcow2"));
    g_free(make_victim(dir, "b.qcow2", "c.qcow2"));
    g_free(make_victim(dir, "c.qcow2", "a.qcow2"));
    assert_open_fails(dirfd, "a.qcow2", "backing chain loop");
    g_free(make_victim(dir, "missing.qcow2", "nothing-here.qcow2"));
    assert_open_fails(dirfd, "missing.qcow2", "backing file missing");

    /* Untrusted names do not follow symlinks nor block on FIFOs. */
    g_free(make_victim(dir, "target.qcow2", NULL));
    g_autofree char *link = g_build_filename(dir, "link.qcow2", NULL);
    g_assert_cmpint(symlink("target.qcow2", link), ==, 0);
    g_free(make_victim(dir, "via-link.qcow2", "link.qcow2"));
    assert_open_fails(dirfd, "via-link.qcow2", "backing file is a symlink");
    g_autofree char *fifo = g_build_filename(dir, "fifo", NULL);
    g_assert_cmpint(mkfifo(fifo, 0600), ==, 0);
    g_free(make_victim(dir, "via-fifo.qcow2", "fifo"));
    assert_open_fails(dirfd, "via-fifo.qcow2", "backing file is a FIFO");
    g_free(make_victim(dir, "via-dev.qcow2", "/dev/zero"));
    assert_open_fails(dirfd, "via-dev.qcow2", "backing file is a device");
    g_free(make_victim(dir, "via-dir.qcow2", ".."));
    assert_open_fails(dirfd, "via-dir.qcow2", "backing file is a directory");

    /* Absolute names are accepted, as stock tools accept them. */
    g_autofree char *abs = g_build_filename(dir, "target.qcow2", NULL);
    g_free(make_victim(dir, "absolute.qcow2", abs));
    struct qcow2_reader *r = qcow2_reader_open(dirfd, "absolute.qcow2", &err);
    g_assert_no_error(err);
    g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 2);
    qcow2_reader_free(r);

    /* QCOW2_MAX_CHAIN_DEPTH images open; one more does not. */
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) != 0 ||
        nofile.rlim_cur < QCOW2_MAX_CHAIN_DEPTH + 64) {
        close(dirfd);
        tmpdir_remove(g_steal_pointer(&dir));
        g_test_skip("RLIMIT_NOFILE too low for the deepest chain");
        return;
    }
    g_autofree char *deep = g_build_filename(dir, "deep", NULL);
    g_assert_cmpint(g_mkdir(deep, 0755), ==, 0);
    for (unsigned i = 0; i <= QCOW2_MAX_CHAIN_DEPTH; i++) {
        g_autofree char *name = g_strdup_printf("%u.qcow2", i);
        g_autofree char *below = g_strdup_printf("%u.qcow2", i - 1);
        g_autofree char *path = g_build_filename(deep, name, NULL);
        struct image img = {.fd = -1};

        image_begin(&img, path, 512, 9, i > 0 ? below : NULL, NULL, NULL, 0);
        image_finish(&img);
        image_clear(&img);
    }
    g_autofree char *top_ok =
        g_strdup_printf("deep/%u.qcow2", QCOW2_MAX_CHAIN_DEPTH - 1);
    r = qcow2_reader_open(dirfd, top_ok, &err);
    g_assert_no_error(err);
    g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, QCOW2_MAX_CHAIN_DEPTH);
    qcow2_reader_free(r);
    g_autofree char *top_deep =
        g_strdup_printf("deep/%u.qcow2", QCOW2_MAX_CHAIN_DEPTH);
    assert_open_fails(dirfd, top_deep, "chain too deep");

    close(dirfd);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* Random damage anywhere in the metadata: an error or a read, never a
 * crash (the fuzzer does this at scale; this keeps a cheap version in
 * every test run). */
static void
test_reader_survives_random_damage(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autofree char *path = make_victim(dir, "victim.qcow2", NULL);
    g_autoptr(GRand) rand = g_rand_new_with_seed(37);
    g_autofree uint8_t *buf = g_malloc(MiB);
    /* Metadata: the header, the L2 table (cluster 4), the L1 table (5). */
    const uint64_t cs = 64 * KiB;
    const uint64_t regions[][2] = {{0, 160}, {4 * cs, 64}, {5 * cs, 16}};
    int fd = open(path, O_RDWR | O_CLOEXEC);

    g_assert_cmpint(fd, >=, 0);
    for (unsigned i = 0; i < 400; i++) {
        uint64_t at[4];
        uint8_t old[4];

        for (unsigned k = 0; k < 4; k++) {
            const uint64_t *reg = regions[g_rand_int_range(rand, 0, 3)];
            uint8_t flipped;

            at[k] =
                reg[0] + (uint64_t)g_rand_int_range(rand, 0, (gint32)reg[1]);
            g_assert_cmpint(pread(fd, &old[k], 1, (off_t)at[k]), ==, 1);
            flipped = old[k] ^ (uint8_t)(1u << g_rand_int_range(rand, 0, 8));
            g_assert_cmpint(pwrite(fd, &flipped, 1, (off_t)at[k]), ==, 1);
        }
        GError *err = NULL;
        struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
        if (r == NULL) {
            g_assert_nonnull(err);
            g_error_free(err);
        } else {
            uint64_t size = MIN(qcow2_reader_virtual_size(r), MiB);
            if (!qcow2_reader_pread(r, 0, buf, size, &err)) {
                g_assert_nonnull(err);
                g_error_free(err);
            }
            qcow2_reader_free(r);
        }
        for (unsigned k = 4; k-- > 0;) {
            g_assert_cmpint(pwrite(fd, &old[k], 1, (off_t)at[k]), ==, 1);
        }
    }
    close(fd);
    tmpdir_remove(g_steal_pointer(&dir));
}

static void
test_reader_map_coalesces(void)
{
    const uint64_t cs = 64 * KiB;
    g_autofree char *dir = tmpdir_new();
    g_autofree char *path = g_build_filename(dir, "disk.qcow2", NULL);
    struct image img = {.fd = -1};
    GError *err = NULL;
    struct qcow2_map m;

    image_begin(&img, path, 4 * MiB, 16, NULL, NULL, NULL, 0);
    image_pattern(&img, 0, (size_t)(8 * cs), 1); /* host 1..8 */
    image_zero(&img, 8 * cs, 4 * cs);
    image_pattern(&img, 20 * cs, (size_t)cs, 2); /* host 9 */
    image_pattern(&img, 22 * cs, (size_t)cs, 3); /* host 10 */
    image_finish(&img);

    struct qcow2_reader *r = qcow2_reader_open(AT_FDCWD, path, &err);
    g_assert_no_error(err);
    g_assert_true(qcow2_reader_map(r, 100, UINT64_MAX, &m, &err));
    g_assert_cmpint(m.kind, ==, QCOW2_MAP_DATA);
    g_assert_cmpuint(m.host_offset, ==, cs + 100);
    g_assert_cmpuint(m.len, ==, 8 * cs - 100);
    g_assert_cmpuint(m.depth, ==, 0);
    g_assert_true(qcow2_reader_map(r, 100, 1000, &m, &err));
    g_assert_cmpuint(m.len, ==, 1000);
    /* Zero clusters and unallocated clusters are one zero run. */
    g_assert_true(qcow2_reader_map(r, 8 * cs, UINT64_MAX, &m, &err));
    g_assert_cmpint(m.kind, ==, QCOW2_MAP_ZERO);
    g_assert_cmpuint(m.len, ==, 12 * cs);
    g_assert_true(qcow2_reader_map(r, 20 * cs, UINT64_MAX, &m, &err));
    g_assert_cmpint(m.kind, ==, QCOW2_MAP_DATA);
    g_assert_cmpuint(m.len, ==, cs);
    g_assert_true(qcow2_reader_map(r, 4 * MiB - 1, UINT64_MAX, &m, &err));
    g_assert_cmpuint(m.len, ==, 1);
    g_assert_no_error(err);
    g_assert_false(qcow2_reader_map(r, 4 * MiB, 1, &m, &err));
    g_clear_error(&err);
    g_assert_false(qcow2_reader_map(r, 0, 0, &m, &err));
    g_clear_error(&err);
    uint8_t b;
    g_assert_false(qcow2_reader_pread(r, 4 * MiB, &b, 1, &err));
    g_clear_error(&err);
    qcow2_reader_free(r);

    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

int
main(int argc, char **argv)
{
    static const unsigned cluster_bits[] = {9, 12, 16, 21};
    /* The fixed layout of partial-clusters-in-middle needs 24 clusters:
     * 48 MiB at 2 MiB clusters is not worth the time, random_ops covers
     * pieces of 2 MiB clusters. */
    static const unsigned partial_bits[] = {9, 12, 16};
    struct rlimit nofile;

    g_test_init(&argc, &argv, NULL);
    /* A chain of QCOW2_MAX_CHAIN_DEPTH images holds as many fds. */
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 &&
        nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(cluster_bits); i++) {
        g_autofree char *full = g_strdup_printf(
            "/qcow2/writer/full-random-clusters/cluster-bits-%u",
            cluster_bits[i]);
        g_test_add_data_func(full, GUINT_TO_POINTER(cluster_bits[i]),
                             test_full_random_clusters);
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(partial_bits); i++) {
        g_autofree char *partial = g_strdup_printf(
            "/qcow2/writer/partial-clusters-in-middle/cluster-bits-%u",
            partial_bits[i]);
        g_test_add_data_func(partial, GUINT_TO_POINTER(partial_bits[i]),
                             test_partial_clusters_in_middle);
    }
    /* Odd sizes: not a multiple of the cluster size; the first not even
     * of the sector size (only our reader sees all of it). */
    static const uint64_t odd_sizes[] = {10 * MiB + 12345, 10 * MiB + 12800};
    g_test_add_data_func("/qcow2/writer/partial-cluster-at-odd-end",
                         &odd_sizes[0], test_partial_cluster_at_odd_end);
    g_test_add_data_func("/qcow2/writer/partial-cluster-at-odd-end/sector-"
                         "multiple",
                         &odd_sizes[1], test_partial_cluster_at_odd_end);
    g_test_add_func("/qcow2/writer/incremental-partial-clusters-from-backing",
                    test_incremental_partial_over_backing);
    g_test_add_func("/qcow2/writer/incremental-over-backing-zero-not-"
                    "unallocated",
                    test_incremental_zero_not_unallocated);
    g_test_add_func("/qcow2/writer/overwrite-written-cluster-in-place",
                    test_overwrite_written_cluster);
    g_test_add_func("/qcow2/writer/zero-written-cluster-no-leak",
                    test_zero_written_cluster);
    g_test_add_func("/qcow2/writer/chain-of-four-relative-backing",
                    test_chain_relative_backing);
    g_test_add_func("/qcow2/writer/more-partial-clusters-than-kept",
                    test_many_partial_clusters);
    g_test_add_func("/qcow2/writer/shorter-backing-reads-zero",
                    test_shorter_backing_reads_zero);
    g_test_add_func("/qcow2/writer/1tib-sparse-disk", test_large_sparse_disk);
    g_test_add_func("/qcow2/writer/rejects-bad-arguments",
                    test_writer_rejects_bad_arguments);
    g_test_add_func("/qcow2/writer/write-error-is-sticky",
                    test_write_error_is_sticky);
    g_test_add_func("/qcow2/reader/qemu-img-created",
                    test_reader_qemu_img_created);
    for (unsigned i = 0; i < G_N_ELEMENTS(header_damage); i++) {
        g_autofree char *name =
            g_strdup_printf("/qcow2/reader/rejects-%s", header_damage[i].name);
        g_test_add_data_func(name, &header_damage[i],
                             test_reader_rejects_header);
    }
    g_test_add_func("/qcow2/reader/rejects-truncated-and-odd-headers",
                    test_reader_rejects_other_headers);
    for (unsigned i = 0; i < G_N_ELEMENTS(table_damage); i++) {
        g_autofree char *name =
            g_strdup_printf("/qcow2/reader/rejects-%s", table_damage[i].name);
        g_test_add_data_func(name, &table_damage[i], test_reader_rejects_table);
    }
    g_test_add_func("/qcow2/reader/rejects-bad-chains",
                    test_reader_rejects_bad_chains);
    g_test_add_func("/qcow2/reader/survives-random-damage",
                    test_reader_survives_random_damage);
    g_test_add_func("/qcow2/reader/map-coalesces", test_reader_map_coalesces);
    return g_test_run();
}

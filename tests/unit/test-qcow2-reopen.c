/* Merging into an existing image writes what the merge changes, not the
 * image's tables: the bytes the merge writes (wchar in /proc/self/io, all
 * its pwrite()s) stay within the data merged and a few tables, on an image
 * whose tables alone are megabytes; qemu-img check and compare are the
 * oracle of the result.  Also the refcount table growing when the merge
 * appends past what it covers. */
#include "io/qcow2_sums.h"
#include "tests/unit/qcow2_testlib.h"

/* The header's refcount_table_clusters (32 bits). */
#define HDR_REFTABLE_CLUSTERS 56

/* Bytes this process has passed to write calls so far. */
static uint64_t
wchar(void)
{
    g_autofree char *text = NULL;
    const char *p;

    g_assert_true(g_file_get_contents("/proc/self/io", &text, NULL, NULL));
    p = strstr(text, "wchar:");
    g_assert_nonnull(p);
    return g_ascii_strtoull(p + 6, NULL, 10);
}

static void
assert_qemu_equal(const char *qcow2, const char *raw)
{
    const char *argv[] = {"qemu-img", "compare", "-f", "qcow2", "-F",
                          "raw",      qcow2,     raw,  NULL};
    g_autofree char *out = NULL;
    int rc = run(argv, &out);

    if (rc != 0) {
        g_error("qemu-img compare %s %s: exit %d\n%s", qcow2, raw, rc, out);
    }
}

/* One operation of a layer: data of a byte pattern, or zeroes. */
struct op {
    uint64_t off, len;
    int byte; /* -1: zeroes */
};

/* A layer at path over the image at backing_path (named backing_name in
 * its header; NULL for none), with checksums beside it; the same operations go
 * into the raw file raw_fd, the guest content expected. */
static void
make_layer(const char *path, const char *backing_name, const char *backing_path,
           uint64_t size, unsigned bits, const struct op *ops, size_t n_ops,
           int raw_fd)
{
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *backing =
        backing_path ? qcow2_reader_open(AT_FDCWD, backing_path, &err) : NULL;
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    struct qcow2_writer *w;
    g_autofree char *sums = g_strconcat(path, QCOW2_SUMS_SUFFIX, NULL);

    g_assert_no_error(err);
    g_assert_cmpint(fd, >=, 0);
    w = qcow2_writer_new(fd, size, bits, backing_name, backing, &err);
    g_assert_no_error(err);
    for (size_t i = 0; i < n_ops; i++) {
        const struct op *o = &ops[i];
        g_autofree uint8_t *buf = g_malloc(o->len);
        g_autofree struct qcow2_extent *ext =
            g_new(struct qcow2_extent, qcow2_writer_max_extents(w, o->len));
        size_t n = 0;

        memset(buf, o->byte < 0 ? 0 : o->byte, o->len);
        /* A different byte in each 512: every cluster's hash differs. */
        for (uint64_t k = 0; o->byte >= 0 && k < o->len; k += 512) {
            buf[k] = (uint8_t)(k >> 9);
        }
        if (o->byte < 0) {
            g_assert_true(qcow2_writer_zero(w, o->off, o->len, &err));
        } else {
            g_assert_true(
                qcow2_writer_write(w, o->off, buf, o->len, ext, &n, &err));
            for (size_t e = 0; e < n; e++) {
                g_assert_cmpint(pwrite(fd, buf + ext[e].buf_offset, ext[e].len,
                                       (off_t)ext[e].host_offset),
                                ==, (ssize_t)ext[e].len);
            }
        }
        g_assert_no_error(err);
        g_assert_cmpint(pwrite(raw_fd, buf, o->len, (off_t)o->off), ==,
                        (ssize_t)o->len);
    }
    g_assert_true(qcow2_writer_finish(w, &err));
    g_assert_no_error(err);
    g_assert_true(qcow2_sums_write(AT_FDCWD, sums, qcow2_writer_sums(w), &err));
    g_assert_no_error(err);
    qcow2_writer_free(w);
    close(fd);
    qcow2_reader_free(backing);
}

/* Merges the layer at top into the image at parent; returns the bytes
 * the merge wrote. */
static uint64_t
merge_counting(const char *top, const char *parent,
               struct qcow2_merge_stats *st)
{
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *chain =
        qcow2_reader_open_with_sums(AT_FDCWD, top, &err);
    struct qcow2_sums *sums = NULL;
    int fd = open(parent, O_RDWR | O_CLOEXEC);
    uint64_t before;
    bool ok;

    g_assert_no_error(err);
    g_assert_cmpint(fd, >=, 0);
    before = wchar();
    ok = qcow2_merge_top(chain, fd, &sums, st, NULL, NULL, &err);
    before = wchar() - before;
    g_assert_no_error(err);
    g_assert_true(ok);
    qcow2_sums_free(sums);
    close(fd);
    qcow2_reader_free(chain);
    return before;
}

static uint64_t
file_size(const char *path)
{
    struct stat st;

    g_assert_cmpint(stat(path, &st), ==, 0);
    return (uint64_t)st.st_size;
}

/* A 1 GiB disk in 4 KiB clusters, every cluster allocated (qemu-img's
 * metadata preallocation: the file is sparse, the tables are whole): 2 MiB
 * of L2 tables and 512 KiB of refcount blocks, which a merge that rewrote
 * all tables would write each time. */
static void
test_reopen_writes_what_changes(void)
{
    const uint64_t size = GiB, cs = 4 * KiB;
    const unsigned bits = 12;
    g_autofree char *dir = tmpdir_new();
    g_autofree char *p0 = g_build_filename(dir, "p0", "vd0.qcow2", NULL);
    g_autofree char *p1 = g_build_filename(dir, "p1", "vd0.qcow2", NULL);
    g_autofree char *p2 = g_build_filename(dir, "p2", "vd0.qcow2", NULL);
    g_autofree char *raw = g_build_filename(dir, "want.raw", NULL);
    const char *create[] = {"qemu-img",
                            "create",
                            "-q",
                            "-f",
                            "qcow2",
                            "-o",
                            "cluster_size=4096,preallocation=metadata",
                            p0,
                            "1G",
                            NULL};
    /* Data over the parent's data (in place: 64 KiB at 700 MiB + 4 KiB is
     * already allocated, like everything), and zeroes over it. */
    const struct op ops1[] = {
        {300 * MiB, 1 * MiB, 0x5a},
        {700 * MiB + 4 * KiB, 64 * KiB, 0xa5},
        {100 * MiB, 256 * KiB, -1},
    };
    const struct op ops2[] = {
        {300 * MiB + 128 * KiB, 512 * KiB, 0x33},
        {900 * MiB, 256 * KiB, 0x44},
        {700 * MiB + 4 * KiB, 32 * KiB, -1},
    };
    struct qcow2_merge_stats st;
    uint64_t written, grown;
    g_autofree char *out = NULL;
    int raw_fd;

    for (const char *d = "p0"; d != NULL; d = d[1] == '0'   ? "p1"
                                              : d[1] == '1' ? "p2"
                                                            : NULL) {
        g_autofree char *sub = g_build_filename(dir, d, NULL);
        g_assert_cmpint(g_mkdir(sub, 0755), ==, 0);
    }
    g_assert_cmpint(run(create, &out), ==, 0);
    raw_fd = open(raw, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    g_assert_cmpint(raw_fd, >=, 0);
    g_assert_cmpint(ftruncate(raw_fd, (off_t)size), ==, 0);

    make_layer(p1, "../p0/vd0.qcow2", p0, size, bits, ops1, G_N_ELEMENTS(ops1),
               raw_fd);
    assert_qemu_equal(p1, raw); /* the chain reads as the raw file */
    written = merge_counting(p1, p0, &st);
    g_test_message("merge 1: %" PRIu64 " data bytes, %" PRIu64 " written",
                   st.data_bytes, written);
    g_assert_cmpuint(st.data_bytes, ==, 1 * MiB + 64 * KiB);
    g_assert_cmpuint(st.zero_bytes, ==, 256 * KiB);
    /* The data, and a few tables: the changed L2 tables (three), the L1
     * table, the refcount blocks that changed and the refcount table.
     * All tables rewritten would be 2.5 MiB more. */
    g_assert_cmpuint(written, <=, st.data_bytes + 32 * cs);
    assert_qemu_check(p0);
    assert_qemu_equal(p0, raw);

    /* Again, on the merged image: it reuses what the first merge freed. */
    grown = file_size(p0);
    make_layer(p2, "../p0/vd0.qcow2", p0, size, bits, ops2, G_N_ELEMENTS(ops2),
               raw_fd);
    assert_qemu_equal(p2, raw);
    written = merge_counting(p2, p0, &st);
    g_test_message("merge 2: %" PRIu64 " data bytes, %" PRIu64 " written",
                   st.data_bytes, written);
    g_assert_cmpuint(st.data_bytes, ==, 768 * KiB);
    g_assert_cmpuint(written, <=, st.data_bytes + 32 * cs);
    g_assert_cmpuint(file_size(p0), <=, grown + 256 * KiB + 32 * cs);
    assert_qemu_check(p0);
    assert_qemu_equal(p0, raw);
    close(raw_fd);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* 512-byte clusters: a refcount table cluster covers 8 MiB of file, so
 * a merge that appends past that needs a longer refcount table (and new
 * refcount blocks); the L1 table spans several clusters. */
static void
test_reopen_refcount_table_grows(void)
{
    const uint64_t size = 16 * MiB;
    const unsigned bits = 9;
    g_autofree char *dir = tmpdir_new();
    g_autofree char *p0 = g_build_filename(dir, "p0", "vd0.qcow2", NULL);
    g_autofree char *p1 = g_build_filename(dir, "p1", "vd0.qcow2", NULL);
    g_autofree char *raw = g_build_filename(dir, "want.raw", NULL);
    g_autofree char *d0 = g_build_filename(dir, "p0", NULL);
    g_autofree char *d1 = g_build_filename(dir, "p1", NULL);
    const struct op full[] = {
        {0, 7 * MiB, 0x11},
        {12 * MiB, 512 * KiB, 0x22},
    };
    const struct op top[] = {
        {1 * MiB, 1 * MiB, 0x66},      /* in place */
        {8 * MiB, 4 * MiB, 0x77},      /* appended */
        {12 * MiB + 512, 1 * KiB, -1}, /* zero over data */
    };
    struct qcow2_merge_stats st;
    uint64_t rt_before;
    int raw_fd;

    g_assert_cmpint(g_mkdir(d0, 0755), ==, 0);
    g_assert_cmpint(g_mkdir(d1, 0755), ==, 0);
    raw_fd = open(raw, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    g_assert_cmpint(raw_fd, >=, 0);
    g_assert_cmpint(ftruncate(raw_fd, (off_t)size), ==, 0);
    make_layer(p0, NULL, NULL, size, bits, full, G_N_ELEMENTS(full), raw_fd);
    g_assert_cmpuint(file_size(p0), <, 8 * MiB);
    make_layer(p1, "../p0/vd0.qcow2", p0, size, bits, top, G_N_ELEMENTS(top),
               raw_fd);
    rt_before = peek_be64(p0, HDR_REFTABLE_CLUSTERS) >> 32;
    (void)merge_counting(p1, p0, &st);
    g_assert_cmpuint(file_size(p0), >, 8 * MiB);
    g_assert_cmpuint(peek_be64(p0, HDR_REFTABLE_CLUSTERS) >> 32, >, rt_before);
    assert_qemu_check(p0);
    assert_qemu_equal(p0, raw);
    close(raw_fd);
    tmpdir_remove(g_steal_pointer(&dir));
}

int
main(int argc, char **argv)
{
    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");

    g_test_init(&argc, &argv, NULL);
    if (qemu_img == NULL) {
        fprintf(stderr, "SKIP: qemu-img not installed\n");
        return 77;
    }
    g_test_add_func("/qcow2/reopen/writes-what-changes",
                    test_reopen_writes_what_changes);
    g_test_add_func("/qcow2/reopen/refcount-table-grows",
                    test_reopen_refcount_table_grows);
    return g_test_run();
}

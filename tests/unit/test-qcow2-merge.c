/* Checksums, per-layer views and merging, with qemu-img as the oracle:
 * every checksum file describes its layer exactly, a merge leaves the
 * parent image reading as the chain did (and qemu-img check clean), and
 * an interrupted or refused merge leaves the chain reading as before. */
#include <signal.h>

#include "io/qcow2_sums.h"
#include "tests/unit/qcow2_testlib.h"

#define DISK_SIZE (8 * MiB + 3 * 512) /* an odd last cluster */

/* The per-cluster truth of one layer: what the test did to it. */
enum truth { T_UNSET, T_DATA, T_ZERO };

static void
write_sums_beside(struct qcow2_writer *w, const char *path)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *name = g_strconcat(path, QCOW2_SUMS_SUFFIX, NULL);

    g_assert_nonnull(qcow2_writer_sums(w));
    g_assert_true(qcow2_sums_write(AT_FDCWD, name, qcow2_writer_sums(w), &err));
    g_assert_no_error(err);
}

/* Finish img and write its checksums beside it. */
static void
image_finish_with_sums(struct image *img)
{
    g_autoptr(GError) err = NULL;

    g_assert_true(qcow2_writer_finish(img->w, &err));
    g_assert_no_error(err);
    write_sums_beside(img->w, img->path);
    qcow2_writer_free(img->w);
    img->w = NULL;
    close(img->fd);
    img->fd = -1;
}

/* Every cluster of layer depth as the checksums describe it: data clusters
 * hash to their entry, zero runs are the layer's zero clusters, nothing
 * else is listed. */
static void
assert_sums_describe_layer(struct qcow2_reader *r, unsigned depth)
{
    g_autoptr(GError) err = NULL;
    const char *why = NULL;
    const struct qcow2_sums *s = qcow2_reader_layer_sums(r, depth, &why);
    unsigned bits = qcow2_reader_layer_cluster_bits(r, depth);
    uint64_t cs = UINT64_C(1) << bits;
    uint64_t size = qcow2_reader_layer_virtual_size(r, depth);
    g_autofree uint8_t *buf = g_malloc(cs);
    uint64_t listed = 0, off = 0;

    g_assert_null(why);
    g_assert_nonnull(s);
    while (off < size) {
        struct qcow2_layer_run run;

        g_assert_true(
            qcow2_reader_layer_map(r, depth, off, size - off, &run, &err));
        g_assert_no_error(err);
        for (uint64_t d = 0; d < run.len; d += cs) {
            uint64_t c = (off + d) >> bits;
            const struct qcow2_sum *e = qcow2_sums_find(s, c);

            if (run.kind == QCOW2_LAYER_UNALLOCATED) {
                g_assert_null(e);
                continue;
            }
            g_assert_nonnull(e);
            listed++;
            if (run.kind == QCOW2_LAYER_ZERO) {
                g_assert_true(e->zero);
                continue;
            }
            g_assert_false(e->zero);
            memset(buf, 0, cs);
            g_assert_cmpint(pread(qcow2_reader_layer_fd(r, depth), buf, cs,
                                  (off_t)(run.host_offset + d)),
                            >, 0);
            g_assert_cmpuint(qcow2_sums_hash(buf, cs), ==, e->hash);
            g_assert_true(qcow2_reader_check_cluster(r, depth, c, buf, &err));
            g_assert_no_error(err);
        }
        off += run.len;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < qcow2_sums_count(s); i++) {
        total += qcow2_sums_at(s, i)->count;
    }
    g_assert_cmpuint(total, ==, listed);
}

static struct qcow2_reader *
open_sums(const char *path)
{
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *r = qcow2_reader_open_with_sums(AT_FDCWD, path, &err);

    g_assert_no_error(err);
    g_assert_nonnull(r);
    return r;
}

/* A full of random data with holes and zeroes (partial writes too). */
static void
make_full(struct image *img, const char *path, GRand *rand)
{
    image_begin(img, path, DISK_SIZE, 16, NULL, NULL, NULL, 0);
    random_ops(img, rand, 80, true);
    image_zero(img, 3 * MiB, 256 * KiB);
    image_finish_with_sums(img);
}

/* An incremental over the chain at backing_path, named backing_name. */
static void
make_incremental(struct image *img, const char *path, const char *backing_name,
                 const char *backing_path, const uint8_t *base, GRand *rand,
                 unsigned n_ops)
{
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *backing =
        qcow2_reader_open(AT_FDCWD, backing_path, &err);

    g_assert_no_error(err);
    image_begin(img, path, DISK_SIZE, 16, backing_name, backing, base,
                DISK_SIZE);
    random_ops(img, rand, n_ops, true);
    image_finish_with_sums(img);
    qcow2_reader_free(backing);
}

/* A full and n - 1 incrementals, one per point directory dir/pI, each
 * layer backed by the one before with a relative name, as qbak lays them
 * out. */
static void
make_chain(const char *dir, unsigned n, struct image *img, char **path,
           GRand *rand)
{
    for (unsigned i = 0; i < n; i++) {
        g_autofree char *d = g_strdup_printf("%s/p%u", dir, i);
        g_assert_cmpint(g_mkdir(d, 0755), ==, 0);
        path[i] = g_strdup_printf("%s/vd0.qcow2", d);
        img[i] = (struct image){.fd = -1};
    }
    make_full(&img[0], path[0], rand);
    for (unsigned i = 1; i < n; i++) {
        g_autofree char *name = g_strdup_printf("../p%u/vd0.qcow2", i - 1);
        make_incremental(&img[i], path[i], name, path[i - 1], img[i - 1].want,
                         rand, 30);
    }
}

/* ------------------------------------------------------------------ */

static void
test_sums_describe_written_layers(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autofree char *p0 = g_build_filename(dir, "full.qcow2", NULL);
    g_autofree char *p1 = g_build_filename(dir, "inc.qcow2", NULL);
    g_autoptr(GRand) rand = g_rand_new_with_seed(11);
    struct image full = {.fd = -1}, inc = {.fd = -1};
    struct qcow2_reader *r;

    make_full(&full, p0, rand);
    make_incremental(&inc, p1, "full.qcow2", p0, full.want, rand, 40);
    r = open_sums(p1);
    g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 2);
    assert_sums_describe_layer(r, 0);
    assert_sums_describe_layer(r, 1);
    qcow2_reader_free(r);
    assert_reader_content(AT_FDCWD, p1, inc.want, inc.size);
    image_clear(&full);
    image_clear(&inc);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* A whole-disk TRIM is one entry, not one per cluster. */
static void
test_sums_zero_runs_coalesce(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autofree char *p = g_build_filename(dir, "z.qcow2", NULL);
    struct image img = {.fd = -1};
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *r;

    image_begin(&img, p, 64 * MiB, 16, NULL, NULL, NULL, 0);
    image_zero(&img, 0, 64 * MiB);
    image_finish_with_sums(&img);
    r = open_sums(p);
    g_assert_cmpuint(qcow2_sums_count(qcow2_reader_layer_sums(r, 0, NULL)), ==,
                     1);
    assert_sums_describe_layer(r, 0);
    qcow2_reader_free(r);
    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* Any single flipped byte, a truncation or an appended byte makes the file
 * damaged; nothing crashes. */
static void
test_sums_damage_detected(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autofree char *p = g_build_filename(dir, "d.qcow2", NULL);
    g_autofree char *sp = g_strconcat(p, QCOW2_SUMS_SUFFIX, NULL);
    g_autoptr(GRand) rand = g_rand_new_with_seed(5);
    struct image img = {.fd = -1};
    g_autofree char *bytes = NULL;
    gsize len = 0;

    make_full(&img, p, rand);
    g_assert_true(g_file_get_contents(sp, &bytes, &len, NULL));
    g_assert_cmpuint(len, >, 80);
    for (gsize i = 0; i < len; i++) {
        g_autoptr(GError) err = NULL;
        g_autofree uint8_t *copy = g_memdup2(bytes, len);
        struct qcow2_sums *s;

        copy[i] ^= 0x20;
        s = qcow2_sums_parse(copy, len, "x", &err);
        g_assert_null(s);
        g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_INVAL);
    }
    for (gsize cut = 0; cut < len; cut += 7) {
        g_autoptr(GError) err = NULL;
        g_assert_null(qcow2_sums_parse((uint8_t *)bytes, cut, "x", &err));
        g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_INVAL);
    }
    /* A reader opened with sums keeps the image readable and says why. */
    patch(sp, len - 1, "\x55", 1);
    struct qcow2_reader *r = open_sums(p);
    const char *why = NULL;
    g_assert_null(qcow2_reader_layer_sums(r, 0, &why));
    g_assert_nonnull(strstr(why, "damaged checksum file"));
    qcow2_reader_free(r);
    g_unlink(sp);
    r = open_sums(p);
    g_assert_null(qcow2_reader_layer_sums(r, 0, &why));
    g_assert_nonnull(strstr(why, "no checksum file"));
    qcow2_reader_free(r);
    image_clear(&img);
    tmpdir_remove(g_steal_pointer(&dir));
}

/* overlay(base, top) against a per-cluster model, with runs split by top
 * entries at every position. */
static void
test_sums_overlay_model(void)
{
    g_autoptr(GRand) rand = g_rand_new_with_seed(3);

    for (unsigned round = 0; round < 200; round++) {
        const uint64_t n = 64;
        struct qcow2_sums *b = qcow2_sums_new(9, n * 512);
        struct qcow2_sums *t = qcow2_sums_new(9, n * 512);
        int model[64];
        uint64_t hash[64];

        for (uint64_t c = 0; c < n; c++) {
            model[c] = -1;
        }
        for (struct qcow2_sums *s = b;; s = t) {
            uint64_t c = (uint64_t)g_rand_int_range(rand, 0, 4);
            while (c < n) {
                struct qcow2_sum e = {.cluster = c, .count = 1};
                if (g_rand_boolean(rand)) {
                    uint64_t want = (uint64_t)g_rand_int_range(rand, 1, 9);
                    e.zero = true;
                    e.count = MIN(want, n - c);
                } else {
                    e.hash = g_rand_int(rand) | 1;
                }
                g_assert_true(qcow2_sums_append(s, &e));
                for (uint64_t k = c; k < c + e.count; k++) {
                    model[k] = e.zero ? 0 : 1;
                    hash[k] = e.hash;
                }
                c += e.count + (uint64_t)g_rand_int_range(rand, 0, 5);
            }
            if (s == t) {
                break;
            }
        }
        struct qcow2_sums *o = qcow2_sums_overlay(b, t);
        for (uint64_t c = 0; c < n; c++) {
            const struct qcow2_sum *e = qcow2_sums_find(o, c);
            if (model[c] < 0) {
                g_assert_null(e);
            } else {
                g_assert_nonnull(e);
                g_assert_cmpint(e->zero, ==, model[c] == 0);
                if (!e->zero) {
                    g_assert_cmpuint(e->hash, ==, hash[c]);
                }
            }
        }
        qcow2_sums_free(b);
        qcow2_sums_free(t);
        qcow2_sums_free(o);
    }
}

/* ------------------------------------------------------------------ */
/* Merge                                                                */

struct merge_case {
    char *dir;
    char *p0, *p1; /* full and incremental, in sibling directories */
    struct image full, inc;
};

static void
merge_case_init(struct merge_case *m, unsigned seed, unsigned n_ops)
{
    g_autoptr(GRand) rand = g_rand_new_with_seed(seed);
    g_autofree char *d0 = NULL, *d1 = NULL;

    m->dir = tmpdir_new();
    d0 = g_build_filename(m->dir, "p0", NULL);
    d1 = g_build_filename(m->dir, "p1", NULL);
    g_assert_cmpint(g_mkdir(d0, 0755), ==, 0);
    g_assert_cmpint(g_mkdir(d1, 0755), ==, 0);
    m->p0 = g_build_filename(d0, "vd0.qcow2", NULL);
    m->p1 = g_build_filename(d1, "vd0.qcow2", NULL);
    m->full.fd = m->inc.fd = -1;
    make_full(&m->full, m->p0, rand);
    make_incremental(&m->inc, m->p1, "../p0/vd0.qcow2", m->p0, m->full.want,
                     rand, n_ops);
}

static void
merge_case_clear(struct merge_case *m)
{
    image_clear(&m->full);
    image_clear(&m->inc);
    g_free(m->p0);
    g_free(m->p1);
    tmpdir_remove(g_steal_pointer(&m->dir));
}

/* Merges p1 into p0's file; returns the merged sums (or NULL) and fails
 * the test on error unless want_error. */
static bool
run_merge(struct merge_case *m, struct qcow2_sums **sums,
          struct qcow2_merge_stats *st, qcow2_merge_progress_fn *fn,
          GError **errp)
{
    struct qcow2_reader *chain = open_sums(m->p1);
    int fd = open(m->p0, O_RDWR | O_CLOEXEC);
    bool ok;

    g_assert_cmpint(fd, >=, 0);
    ok = qcow2_merge_top(chain, fd, sums, st, fn, NULL, errp);
    close(fd);
    qcow2_reader_free(chain);
    return ok;
}

static void
test_merge_folds_top_into_parent(void)
{
    struct merge_case m;
    g_autoptr(GError) err = NULL;
    struct qcow2_sums *sums = NULL;
    struct qcow2_merge_stats st;
    struct stat before, after;

    merge_case_init(&m, 21, 40);
    g_assert_cmpint(stat(m.p0, &before), ==, 0);
    g_assert_true(run_merge(&m, &sums, &st, NULL, &err));
    g_assert_no_error(err);
    g_assert_nonnull(sums);
    g_assert_cmpuint(st.data_bytes, >, 0);

    /* The parent alone now reads as the chain did, and so does the chain. */
    assert_qemu_check(m.p0);
    assert_qemu_content(m.p0, m.inc.want, DISK_SIZE);
    assert_reader_content(AT_FDCWD, m.p0, m.inc.want, DISK_SIZE);
    assert_reader_content(AT_FDCWD, m.p1, m.inc.want, DISK_SIZE);

    /* The merged checksums describe the merged image. */
    g_autofree char *sp = g_strconcat(m.p0, QCOW2_SUMS_SUFFIX, NULL);
    g_unlink(sp);
    g_assert_true(qcow2_sums_write(AT_FDCWD, sp, sums, &err));
    g_assert_no_error(err);
    struct qcow2_reader *r = open_sums(m.p0);
    assert_sums_describe_layer(r, 0);
    qcow2_reader_free(r);

    /* Cost follows the top layer: the parent grew by at most the top's
     * data plus fresh tables, it was not rewritten. */
    g_assert_cmpint(stat(m.p0, &after), ==, 0);
    g_assert_cmpuint((uint64_t)after.st_size, <=,
                     (uint64_t)before.st_size + st.data_bytes + 1 * MiB);
    qcow2_sums_free(sums);
    merge_case_clear(&m);
}

/* A merge killed in the middle (here: the child process exits at the
 * first progress report, as SIGKILL would leave it) leaves the chain
 * reading as before; running it again completes it. */
static void
exit_now(void *opaque, uint64_t done)
{
    _exit(0);
}

static void
test_merge_interrupted_then_redone(void)
{
    struct merge_case m;
    g_autoptr(GError) err = NULL;
    struct qcow2_sums *sums = NULL;
    struct qcow2_merge_stats st;
    int status;

    merge_case_init(&m, 33, 60);
    for (unsigned i = 0; i < 2; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            GError *e = NULL;
            run_merge(&m, &sums, &st, exit_now, &e);
            _exit(3); /* the merge had no data to report: test broken */
        }
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);
        /* The chain reads as before; the parent's header is the old one. */
        assert_reader_content(AT_FDCWD, m.p1, m.inc.want, DISK_SIZE);
        assert_qemu_content(m.p1, m.inc.want, DISK_SIZE);
    }
    g_assert_true(run_merge(&m, &sums, &st, NULL, &err));
    g_assert_no_error(err);
    assert_qemu_check(m.p0);
    assert_qemu_content(m.p0, m.inc.want, DISK_SIZE);
    /* Once more on the merged parent: the same content (a crash after the
     * header, before the caller's rename, is redone this way). */
    qcow2_sums_free(sums);
    g_assert_true(run_merge(&m, &sums, &st, NULL, &err));
    g_assert_no_error(err);
    assert_qemu_check(m.p0);
    assert_qemu_content(m.p0, m.inc.want, DISK_SIZE);
    qcow2_sums_free(sums);
    merge_case_clear(&m);
}

/* A flipped bit in the top layer's data: the merge fails as damage and
 * the parent's header is not rewritten. */
static void
test_merge_refuses_damaged_top(void)
{
    struct merge_case m;
    g_autoptr(GError) err = NULL;
    struct qcow2_sums *sums = NULL;
    struct qcow2_merge_stats st;
    g_autoptr(GError) e2 = NULL;
    struct qcow2_reader *r;
    struct qcow2_layer_run run = {0};
    uint64_t off = 0, header_l1;

    merge_case_init(&m, 44, 40);
    r = open_sums(m.p1);
    while (off < DISK_SIZE) {
        g_assert_true(
            qcow2_reader_layer_map(r, 0, off, DISK_SIZE - off, &run, &e2));
        if (run.kind == QCOW2_LAYER_DATA) {
            break;
        }
        off += run.len;
    }
    g_assert_cmpint(run.kind, ==, QCOW2_LAYER_DATA);
    qcow2_reader_free(r);
    uint8_t byte;
    int fd = open(m.p1, O_RDWR);
    g_assert_cmpint(pread(fd, &byte, 1, (off_t)run.host_offset + 100), ==, 1);
    byte ^= 0x01;
    g_assert_cmpint(pwrite(fd, &byte, 1, (off_t)run.host_offset + 100), ==, 1);
    close(fd);

    header_l1 = peek_be64(m.p0, 40);
    g_assert_false(run_merge(&m, &sums, &st, NULL, &err));
    g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_INVAL);
    g_assert_nonnull(strstr(err->message, "checksum mismatch"));
    g_assert_cmpuint(peek_be64(m.p0, 40), ==, header_l1);
    g_assert_null(sums);
    assert_qemu_check(m.p0);
    /* Every cluster is checked before the first is written: the parent
     * reads as before. */
    assert_qemu_content(m.p0, m.full.want, DISK_SIZE);
    merge_case_clear(&m);
}

/* A chain pruned as prune does it: fold each incremental into the image
 * below, move the result into the incremental's place; the newest point
 * reads the same throughout, and the result stands alone. */
static void
test_merge_chain_oldest_first(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autoptr(GRand) rand = g_rand_new_with_seed(55);
    struct image img[4];
    char *path[4];

    make_chain(dir, 4, img, path, rand);
    for (unsigned i = 1; i < 4; i++) {
        g_autoptr(GError) err = NULL;
        struct qcow2_reader *chain = open_sums(path[i]);
        int fd = open(path[i - 1], O_RDWR | O_CLOEXEC);
        struct qcow2_sums *sums = NULL;
        struct qcow2_merge_stats st;
        g_autofree char *sp = g_strconcat(path[i], QCOW2_SUMS_SUFFIX, NULL);
        g_autofree char *tmp = g_strconcat(sp, ".new", NULL);

        g_assert_true(qcow2_merge_top(chain, fd, &sums, &st, NULL, NULL, &err));
        g_assert_no_error(err);
        close(fd);
        qcow2_reader_free(chain);
        g_assert_true(qcow2_sums_write(AT_FDCWD, tmp, sums, &err));
        g_assert_no_error(err);
        g_assert_cmpint(rename(tmp, sp), ==, 0);
        g_assert_cmpint(rename(path[i - 1], path[i]), ==, 0);
        qcow2_sums_free(sums);
        /* The newest point reads the same after every step. */
        assert_reader_content(AT_FDCWD, path[3], img[3].want, DISK_SIZE);
        struct qcow2_reader *r = open_sums(path[i]);
        g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 1);
        assert_sums_describe_layer(r, 0);
        qcow2_reader_free(r);
        r = open_sums(path[3]);
        g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 4 - i);
        qcow2_reader_free(r);
    }
    assert_qemu_check(path[3]);
    assert_qemu_content(path[3], img[3].want, DISK_SIZE);
    for (unsigned i = 0; i < 4; i++) {
        image_clear(&img[i]);
        g_free(path[i]);
    }
    tmpdir_remove(g_steal_pointer(&dir));
}

/* The same chain folded at once: the three incrementals into the full in
 * one merge, newest data winning; killed at its first progress report it
 * leaves the chain reading as it did; redone, the
 * full alone reads as the newest point, and a bad cluster in a middle
 * layer is named by its depth. */
static void
test_merge_layers_at_once(void)
{
    g_autofree char *dir = tmpdir_new();
    g_autoptr(GRand) rand = g_rand_new_with_seed(56);
    g_autoptr(GError) err = NULL;
    struct image img[4];
    char *path[4];
    struct qcow2_sums *sums = NULL;
    struct qcow2_merge_stats st;
    struct qcow2_reader *chain, *r;
    int fd, status;
    pid_t pid;

    make_chain(dir, 4, img, path, rand);
    pid = fork();
    if (pid == 0) {
        GError *e = NULL;
        chain = open_sums(path[3]);
        fd = open(path[0], O_RDWR | O_CLOEXEC);
        qcow2_merge_layers(chain, 3, fd, &sums, &st, exit_now, NULL, &e);
        _exit(3);
    }
    g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
    g_assert_true(WIFEXITED(status));
    g_assert_cmpint(WEXITSTATUS(status), ==, 0);
    assert_reader_content(AT_FDCWD, path[3], img[3].want, DISK_SIZE);
    assert_qemu_check(path[0]);

    chain = open_sums(path[3]);
    fd = open(path[0], O_RDWR | O_CLOEXEC);
    g_assert_true(
        qcow2_merge_layers(chain, 3, fd, &sums, &st, NULL, NULL, &err));
    g_assert_no_error(err);
    close(fd);
    qcow2_reader_free(chain);
    g_assert_cmpuint(st.data_bytes, >, 0);
    /* Every point of the chain still reads through (the full is now the
     * newest's content under all three), and the full alone reads as the
     * newest point. */
    assert_reader_content(AT_FDCWD, path[3], img[3].want, DISK_SIZE);
    assert_qemu_check(path[0]);
    assert_qemu_content(path[0], img[3].want, DISK_SIZE);
    g_autofree char *sp = g_strconcat(path[0], QCOW2_SUMS_SUFFIX, NULL);
    g_unlink(sp);
    g_assert_true(qcow2_sums_write(AT_FDCWD, sp, sums, &err));
    g_assert_no_error(err);
    qcow2_sums_free(sums);
    r = open_sums(path[0]);
    g_assert_cmpuint(qcow2_reader_chain_depth(r), ==, 1);
    assert_sums_describe_layer(r, 0);
    qcow2_reader_free(r);

    /* A flipped bit in p2's data, found when p1 and p2 are folded into p0
     * (p2 on top: nothing covers the cluster); p0 keeps its content. */
    struct qcow2_layer_run run = {0};
    uint64_t off = 0;
    r = open_sums(path[2]);
    while (off < DISK_SIZE) {
        g_assert_true(
            qcow2_reader_layer_map(r, 0, off, DISK_SIZE - off, &run, &err));
        if (run.kind == QCOW2_LAYER_DATA) {
            break;
        }
        off += run.len;
    }
    qcow2_reader_free(r);
    g_assert_cmpint(run.kind, ==, QCOW2_LAYER_DATA);
    uint8_t byte;
    fd = open(path[2], O_RDWR);
    g_assert_cmpint(pread(fd, &byte, 1, (off_t)run.host_offset + 7), ==, 1);
    byte ^= 0x40;
    g_assert_cmpint(pwrite(fd, &byte, 1, (off_t)run.host_offset + 7), ==, 1);
    close(fd);
    chain = open_sums(path[2]);
    fd = open(path[0], O_RDWR | O_CLOEXEC);
    g_assert_false(
        qcow2_merge_layers(chain, 2, fd, &sums, &st, NULL, NULL, &err));
    g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_INVAL);
    g_assert_cmpint(st.damaged_depth, ==, 0);
    g_assert_false(st.parent_changed);
    g_assert_null(sums);
    close(fd);
    qcow2_reader_free(chain);
    assert_qemu_content(path[0], img[3].want, DISK_SIZE);
    for (unsigned i = 0; i < 4; i++) {
        image_clear(&img[i]);
        g_free(path[i]);
    }
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
    g_test_add_func("/qcow2/sums/describe-written-layers",
                    test_sums_describe_written_layers);
    g_test_add_func("/qcow2/sums/zero-runs-coalesce",
                    test_sums_zero_runs_coalesce);
    g_test_add_func("/qcow2/sums/damage-detected", test_sums_damage_detected);
    g_test_add_func("/qcow2/sums/overlay-model", test_sums_overlay_model);
    g_test_add_func("/qcow2/merge/folds-top-into-parent",
                    test_merge_folds_top_into_parent);
    g_test_add_func("/qcow2/merge/interrupted-then-redone",
                    test_merge_interrupted_then_redone);
    g_test_add_func("/qcow2/merge/refuses-damaged-top",
                    test_merge_refuses_damaged_top);
    g_test_add_func("/qcow2/merge/chain-oldest-first",
                    test_merge_chain_oldest_first);
    g_test_add_func("/qcow2/merge/layers-at-once", test_merge_layers_at_once);
    return g_test_run();
}

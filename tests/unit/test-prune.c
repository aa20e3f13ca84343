/* prune's merges and their checksums, on a repository this test writes
 * itself (a full and two incrementals, each layer with its checksum
 * file, as io/ writes them), independent of QEMU:
 *
 *   /prune/merge/carries-checksums: --keep-last 1 leaves one full whose
 *     checksum file describes it (every data cluster checks), which reads
 *     as the newest point did (our reader and qemu-img), and whose
 *     manifest says so;
 *   /prune/merge/checksum-mismatch-is-damage: a flipped bit in a data
 *     cluster of the layer to fold fails the prune as damaged, naming the
 *     point and the disk, records the damage, changes no kept layer; once
 *     repaired, the next prune completes the work.
 */
#include <jansson.h>

#include "agent/error.h"
#include "agent/prune.h"
#include "io/qcow2_sums.h"
#include "tests/unit/qcow2_testlib.h"

#define SIZE (4 * MiB)
#define BITS 16
#define NPOINTS 3

struct fixture {
    char *dir;
    char *vmdir;
    char *ids[NPOINTS];
    uint8_t *want[NPOINTS];
};

static char *
layer_path(struct fixture *f, int i)
{
    return g_strdup_printf("%s/%s/vd0.qcow2", f->vmdir, f->ids[i]);
}

static void
write_manifest(struct fixture *f, int i)
{
    g_autofree char *path =
        g_strdup_printf("%s/%s/manifest.json", f->vmdir, f->ids[i]);
    g_autofree char *backing =
        i ? g_strdup_printf("../%s/vd0.qcow2", f->ids[i - 1]) : NULL;
    json_t *m = json_pack(
        "{s:i, s:s, s:s, s:s?, s:s, s:s, s:[{s:s, s:s, s:s, s:I, s:I, s:s, "
        "s:s?, s:s}]}",
        "format", 1, "vm", "vm1", "point", f->ids[i], "parent",
        i ? f->ids[i - 1] : NULL, "time", "2026-12-05T10:00:00Z", "consistency",
        "crash", "disks", "disk", "vd0", "type", i ? "incremental" : "full",
        "file", "vd0.qcow2", "virtual_size", (json_int_t)SIZE, "cluster_size",
        (json_int_t)(1 << BITS), "chain", "c1", "backing", backing, "bitmap",
        "qbak-test");

    g_assert_cmpint(json_dump_file(m, path, JSON_INDENT(2)), ==, 0);
    json_decref(m);
}

static void
finish_with_sums(struct image *img)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *sums = g_strconcat(img->path, QCOW2_SUMS_SUFFIX, NULL);

    g_assert_true(qcow2_writer_finish(img->w, &err));
    g_assert_no_error(err);
    g_assert_true(
        qcow2_sums_write(AT_FDCWD, sums, qcow2_writer_sums(img->w), &err));
    g_assert_no_error(err);
    qcow2_writer_free(img->w);
    img->w = NULL;
    close(img->fd);
    img->fd = -1;
}

/* A full, then two incrementals that overwrite some of what is below,
 * write where nothing was, and zero some. */
static void
fixture_init(struct fixture *f)
{
    GRand *rand = g_rand_new_with_seed(9);

    f->dir = tmpdir_new();
    f->vmdir = g_strdup_printf("%s/vm1", f->dir);
    g_assert_cmpint(mkdir(f->vmdir, 0750), ==, 0);
    for (int i = 0; i < NPOINTS; i++) {
        struct image img;
        g_autofree char *path = NULL;
        g_autofree char *pdir = NULL;
        g_autofree char *backing_name = NULL;
        struct qcow2_reader *backing = NULL;
        g_autoptr(GError) err = NULL;

        f->ids[i] = g_strdup_printf("20261205T1000%02dZ-%04d", i, i + 1);
        pdir = g_strdup_printf("%s/%s", f->vmdir, f->ids[i]);
        g_assert_cmpint(mkdir(pdir, 0750), ==, 0);
        path = layer_path(f, i);
        if (i > 0) {
            g_autofree char *below = layer_path(f, i - 1);
            backing_name = g_strdup_printf("../%s/vd0.qcow2", f->ids[i - 1]);
            backing = qcow2_reader_open(AT_FDCWD, below, &err);
            g_assert_no_error(err);
        }
        image_begin(&img, path, SIZE, BITS, backing_name, backing,
                    i ? f->want[i - 1] : NULL, SIZE);
        if (i == 0) {
            image_fill(&img, rand, 0, 1 * MiB);
            image_zero(&img, 2 * MiB, 128 * KiB);
        } else {
            image_fill(&img, rand, (64 + 128 * i) * KiB, 192 * KiB);
            image_fill(&img, rand, (1 + i) * MiB + 512 * KiB, 256 * KiB);
            image_zero(&img, (i - 1) * 64 * KiB, 64 * KiB);
        }
        finish_with_sums(&img);
        f->want[i] = g_memdup2(img.want, SIZE);
        image_clear(&img);
        qcow2_reader_free(backing);
        write_manifest(f, i);
    }
    g_rand_free(rand);
}

static void
fixture_clear(struct fixture *f)
{
    tmpdir_remove(f->dir);
    g_free(f->vmdir);
    for (int i = 0; i < NPOINTS; i++) {
        g_free(f->ids[i]);
        g_free(f->want[i]);
    }
}

static json_t *
prune_keep_last_1(struct fixture *f, GError **errp)
{
    struct prune_opts o = {.repo = f->dir, .vm = "vm1"};

    o.policy.keep[RETENTION_LAST] = 1;
    return prune_run(&o, errp);
}

static char *
read_file(const char *path, gsize *len)
{
    char *buf = NULL;

    g_assert_true(g_file_get_contents(path, &buf, len, NULL));
    return buf;
}

/* Every data cluster of the top layer checks against its checksums,
 * which cover as many data and zero clusters as the layer has. */
static void
assert_layer_checks(const char *path)
{
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *r = qcow2_reader_open_with_sums(AT_FDCWD, path, &err);
    const char *why = NULL;
    const struct qcow2_sums *s;
    uint8_t *buf = g_malloc(1 << BITS);
    uint64_t off = 0, clusters = 0, listed = 0;

    g_assert_no_error(err);
    s = qcow2_reader_layer_sums(r, 0, &why);
    g_assert_null(why);
    g_assert_nonnull(s);
    while (off < SIZE) {
        struct qcow2_layer_run run;

        g_assert_true(
            qcow2_reader_layer_map(r, 0, off, SIZE - off, &run, &err));
        g_assert_no_error(err);
        for (uint64_t k = 0; run.kind != QCOW2_LAYER_UNALLOCATED && k < run.len;
             k += 1 << BITS) {
            if (run.kind == QCOW2_LAYER_DATA) {
                g_assert_cmpint(pread(qcow2_reader_layer_fd(r, 0), buf,
                                      1 << BITS, run.host_offset + k),
                                ==, 1 << BITS);
                g_assert_true(qcow2_reader_check_cluster(
                    r, 0, (off + k) >> BITS, buf, &err));
                g_assert_no_error(err);
            }
            clusters++;
        }
        off += run.len;
    }
    for (size_t i = 0; i < qcow2_sums_count(s); i++) {
        listed += qcow2_sums_at(s, i)->count;
    }
    g_assert_cmpuint(listed, ==, clusters);
    g_free(buf);
    qcow2_reader_free(r);
}

static void
test_merge_carries_checksums(void)
{
    struct fixture f;
    g_autoptr(GError) err = NULL;
    g_autofree char *top = NULL;
    g_autofree char *mpath = NULL;
    json_t *res, *m, *d;

    if (!have_qemu_img()) {
        return;
    }
    fixture_init(&f);
    res = prune_keep_last_1(&f, &err);
    g_assert_no_error(err);
    g_assert_cmpint(json_integer_value(json_object_get(res, "removed")), ==, 2);
    g_assert_cmpint(json_integer_value(json_object_get(res, "merged_bytes")), >,
                    0);
    json_decref(res);
    for (int i = 0; i < NPOINTS - 1; i++) {
        g_autofree char *pdir = g_strdup_printf("%s/%s", f.vmdir, f.ids[i]);
        g_assert_false(g_file_test(pdir, G_FILE_TEST_EXISTS));
    }
    top = layer_path(&f, NPOINTS - 1);
    assert_qemu_check(top);
    assert_qemu_content(top, f.want[NPOINTS - 1], SIZE);
    assert_reader_content(AT_FDCWD, top, f.want[NPOINTS - 1], SIZE);
    assert_layer_checks(top);
    mpath = g_strdup_printf("%s/%s/manifest.json", f.vmdir, f.ids[NPOINTS - 1]);
    m = json_load_file(mpath, 0, NULL);
    g_assert_nonnull(m);
    g_assert_true(json_is_null(json_object_get(m, "parent")));
    d = json_array_get(json_object_get(m, "disks"), 0);
    g_assert_cmpstr(json_string_value(json_object_get(d, "type")), ==, "full");
    g_assert_true(json_is_null(json_object_get(d, "backing")));
    g_assert_cmpstr(json_string_value(json_object_get(d, "sums")), ==,
                    "vd0.qcow2.sums");
    json_decref(m);
    fixture_clear(&f);
}

static void
test_checksum_mismatch_is_damage(void)
{
    struct fixture f;
    g_autoptr(GError) err = NULL;
    g_autofree char *mid = NULL;
    g_autofree char *top = NULL;
    g_autofree char *damaged = NULL;
    g_autofree char *mid_before = NULL;
    g_autofree char *top_before = NULL;
    g_autofree char *mid_after = NULL;
    g_autofree char *top_after = NULL;
    gsize mid_len, top_len, len;
    struct qcow2_reader *r;
    struct qcow2_layer_run run;
    uint64_t off = 0;
    uint8_t byte;
    json_t *res;

    if (!have_qemu_img()) {
        return;
    }
    fixture_init(&f);
    mid = layer_path(&f, 1);
    top = layer_path(&f, 2);
    /* The first data cluster of the middle layer, one bit flipped. */
    r = qcow2_reader_open(AT_FDCWD, mid, &err);
    g_assert_no_error(err);
    do {
        g_assert_true(
            qcow2_reader_layer_map(r, 0, off, SIZE - off, &run, &err));
        off += run.len;
    } while (run.kind != QCOW2_LAYER_DATA);
    qcow2_reader_free(r);
    mid_before = read_file(mid, &mid_len);
    byte = (uint8_t)mid_before[run.host_offset + 77] ^ 0x04;
    patch(mid, run.host_offset + 77, &byte, 1);
    g_free(mid_before);
    mid_before = read_file(mid, &mid_len);
    top_before = read_file(top, &top_len);

    res = prune_keep_last_1(&f, &err);
    g_assert_null(res);
    g_assert_error(err, QBAK_ERROR, QBAK_ERROR_DAMAGED);
    g_assert_nonnull(strstr(err->message, f.ids[1]));
    g_assert_nonnull(strstr(err->message, "vd0"));
    damaged = g_strdup_printf("%s/%s/damaged.json", f.vmdir, f.ids[1]);
    g_assert_true(g_file_test(damaged, G_FILE_TEST_IS_REGULAR));
    {
        json_t *d = json_load_file(damaged, 0, NULL);
        g_assert_nonnull(d);
        g_assert_cmpstr(json_string_value(json_object_get(d, "disk")), ==,
                        "vd0");
        g_assert_cmpstr(json_string_value(json_object_get(d, "found_by")), ==,
                        "prune");
        /* The flipped cluster is where the middle layer's first data run
         * starts. */
        g_assert_cmpint(json_integer_value(json_object_get(d, "offset")), ==,
                        (json_int_t)(off - run.len));
        json_decref(d);
    }
    mid_after = read_file(mid, &len);
    g_assert_true(len == mid_len && !memcmp(mid_after, mid_before, len));
    top_after = read_file(top, &len);
    g_assert_true(len == top_len && !memcmp(top_after, top_before, len));
    g_clear_error(&err);

    /* Refused at once the next time, before anything changes. */
    res = prune_keep_last_1(&f, &err);
    g_assert_null(res);
    g_assert_error(err, QBAK_ERROR, QBAK_ERROR_DAMAGED);
    g_clear_error(&err);

    /* Repaired, the next prune completes the interrupted removal and the
     * policy. */
    byte ^= 0x04;
    patch(mid, run.host_offset + 77, &byte, 1);
    g_assert_cmpint(unlink(damaged), ==, 0);
    res = prune_keep_last_1(&f, &err);
    g_assert_no_error(err);
    g_assert_cmpint(json_array_size(json_object_get(res, "recovered")), >=, 1);
    json_decref(res);
    assert_qemu_check(top);
    assert_reader_content(AT_FDCWD, top, f.want[2], SIZE);
    assert_layer_checks(top);
    fixture_clear(&f);
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/prune/merge/carries-checksums",
                    test_merge_carries_checksums);
    g_test_add_func("/prune/merge/checksum-mismatch-is-damage",
                    test_checksum_mismatch_is_damage);
    return g_test_run();
}

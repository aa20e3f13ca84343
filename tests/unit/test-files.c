/* Guest names (agent/files/names.c) and catalogs (agent/files/catalog.c):
 * the pure parts of file-level access, table-driven. */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "agent/error.h"
#include "agent/files/catalog.h"
#include "agent/files/names.h"

struct name_case {
    const char *name;
    size_t len; /* 0: strlen */
    bool safe;
};

static void
test_name_unsafe(void)
{
    static char long_ok[256], long_bad[257];
    const struct name_case cases[] = {
        {"a.txt", 0, true},
        {"..a", 0, true},
        {"a..", 0, true},
        {"-rf", 0, true},
        {"caf\xc3\xa9", 0, true},
        {"\xff\xfe", 0, true}, /* not UTF-8, still one safe component */
        {"", 0, false},
        {".", 0, false},
        {"..", 0, false},
        {"a/b", 0, false},
        {"/", 0, false},
        {"new\nline", 0, false},
        {"esc\x1b[31m", 0, false},
        {"del\x7f", 0, false},
        {"tab\t", 0, false},
        {"nul\0x", 5, false},
        {long_ok, 0, true},
        {long_bad, 0, false},
    };

    memset(long_ok, 'L', 255);
    memset(long_bad, 'L', 256);
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].name);
        const char *why = files_name_unsafe(cases[i].name, len);
        if (cases[i].safe != (why == NULL)) {
            g_error("case %zu: %s", i, why ? why : "accepted");
        }
    }
}

static void
test_path_split(void)
{
    const char *why;
    g_auto(GStrv) ok = files_path_split("/a//b/c.txt", 11, 8, &why);
    g_auto(GStrv) dots = files_path_split("a/../b", 6, 8, &why);
    g_auto(GStrv) deep = files_path_split("a/b/c", 5, 2, &why);
    g_auto(GStrv) empty = files_path_split("///", 3, 8, &why);
    g_auto(GStrv) nul = files_path_split("a\0b", 3, 8, &why);
    g_auto(GStrv) ctl = files_path_split("a/\n/b", 5, 8, &why);

    g_assert_nonnull(ok);
    g_assert_cmpuint(g_strv_length(ok), ==, 3);
    g_assert_cmpstr(ok[2], ==, "c.txt");
    g_assert_null(dots);
    g_assert_null(deep);
    g_assert_null(empty);
    g_assert_null(nul);
    g_assert_null(ctl);
}

static void
test_name_display(void)
{
    g_autofree char *u1 = files_name_utf8("caf\xc3\xa9", 5);
    g_autofree char *u2 = files_name_utf8("a\xff\\b", 4);
    g_autofree char *p1 = files_name_printable("new\nline\x1b[1m", 12);
    g_autofree char *p2 = files_name_printable("caf\xc3\xa9\\", 6);

    g_assert_cmpstr(u1, ==, "caf\xc3\xa9");
    g_assert_cmpstr(u2, ==, "a\\xff\\\\b");
    g_assert_cmpstr(p1, ==, "new\\nline\\x1b[1m");
    g_assert_cmpstr(p2, ==, "caf\xc3\xa9\\\\");
}

static void
test_drive_name(void)
{
    const struct {
        unsigned index;
        const char *dev;
    } cases[] = {
        {0, "/dev/sda"},       {1, "/dev/sdb"},        {25, "/dev/sdz"},
        {26, "/dev/sdaa"},     {27, "/dev/sdab"},      {51, "/dev/sdaz"},
        {52, "/dev/sdba"},     {701, "/dev/sdzz"},     {702, "/dev/sdaaa"},
        {18277, "/dev/sdzzz"}, {18278, "/dev/sdaaaa"},
    };

    for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *d = files_drive_name(cases[i].index);
        g_assert_cmpstr(d, ==, cases[i].dev);
    }
    g_free(files_drive_name(UINT_MAX)); /* fits */
}

static struct files_catalog *
sample_catalog(void)
{
    struct files_catalog *c = g_new0(struct files_catalog, 1);
    struct files_fs *fs = files_fs_new();
    struct files_fs *bad = files_fs_new();
    static const char *paths[] = {"/docs/sub/b.txt", "/docs", "/docs/a.txt",
                                  "/docs/sub", "/z\xff\nname"};

    c->point = g_strdup("20260101T000000Z-0001");
    c->disk = g_strdup("vd0");
    c->fss = g_ptr_array_new_with_free_func((GDestroyNotify)files_fs_free);
    fs->name = g_strdup("1");
    fs->type = g_strdup("ext4");
    fs->label = g_strdup("lab\xff"
                         "el"); /* not UTF-8: must still encode */
    fs->size = 104857600;
    fs->entries = files_entries_new();
    for (size_t i = 0; i < G_N_ELEMENTS(paths); i++) {
        struct files_entry e = {
            .path = g_strdup(paths[i]),
            .type = strstr(paths[i], ".txt") ? 'f' : 'd',
            .mode = strstr(paths[i], ".txt") ? 0100644 : 040755,
            .size = i * 1000,
            .mtime = i == 4 ? -5 : 1600000000 + (int64_t)i,
        };
        g_array_append_val(fs->entries, e);
    }
    files_entries_sort(fs->entries);
    bad->name = g_strdup("vg0/lv0");
    bad->type = g_strdup("ntfs");
    bad->label = g_strdup("");
    bad->error = g_strdup("mount: unknown filesystem");
    g_ptr_array_add(c->fss, fs);
    g_ptr_array_add(c->fss, bad);
    return c;
}

static void
test_catalog_roundtrip(void)
{
    struct files_catalog *c = sample_catalog();
    g_autoptr(GBytes) b = files_catalog_encode(c);
    g_autoptr(GError) err = NULL;
    gsize len;
    const uint8_t *p = g_bytes_get_data(b, &len);
    struct files_catalog *d = files_catalog_decode(p, len, true, &err);
    struct files_fs *fs, *orig = c->fss->pdata[0];

    g_assert_no_error(err);
    g_assert_cmpstr(d->point, ==, c->point);
    g_assert_cmpuint(d->fss->len, ==, 2);
    fs = d->fss->pdata[0];
    g_assert_cmpstr(fs->label, ==, "lab\\xffel");
    g_assert_cmpuint(fs->entries->len, ==, orig->entries->len);
    for (guint i = 0; i < fs->entries->len; i++) {
        struct files_entry *x =
            &g_array_index(fs->entries, struct files_entry, i);
        struct files_entry *y =
            &g_array_index(orig->entries, struct files_entry, i);
        g_assert_cmpstr(x->path, ==, y->path);
        g_assert_cmpint(x->type, ==, y->type);
        g_assert_cmpuint(x->mode, ==, y->mode);
        g_assert_cmpuint(x->size, ==, y->size);
        g_assert_cmpint(x->mtime, ==, y->mtime);
    }
    fs = d->fss->pdata[1];
    g_assert_cmpstr(fs->error, ==, "mount: unknown filesystem");
    g_assert_cmpuint(fs->entries->len, ==, 0);
    files_catalog_free(d);
    files_catalog_free(c);
}

static void
test_catalog_damage(void)
{
    struct files_catalog *c = sample_catalog();
    g_autoptr(GBytes) b = files_catalog_encode(c);
    gsize len;
    const uint8_t *p = g_bytes_get_data(b, &len);
    g_autofree uint8_t *copy = g_memdup2(p, len);

    /* every single flipped byte and every truncation is caught */
    for (gsize i = 0; i < len; i++) {
        g_autoptr(GError) err = NULL;
        copy[i] ^= 0x40;
        g_assert_null(files_catalog_decode(copy, len, true, &err));
        g_assert_error(err, QBAK_ERROR, QBAK_ERROR_DAMAGED);
        copy[i] ^= 0x40;
    }
    for (gsize n = 0; n < len; n++) {
        g_autoptr(GError) err = NULL;
        g_assert_null(files_catalog_decode(copy, n, true, &err));
        g_assert_error(err, QBAK_ERROR, QBAK_ERROR_DAMAGED);
    }
    files_catalog_free(c);
}

static void
test_catalog_file(void)
{
    g_autofree char *dir = g_dir_make_tmp("qbak-files-XXXXXX", NULL);
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    struct files_catalog *c = sample_catalog(), *d;
    g_autoptr(GError) err = NULL;
    g_autoptr(GError) err2 = NULL;
    g_autofree char *path = g_build_filename(dir, "vd0.catalog", NULL);
    g_autofree char *link = g_build_filename(dir, "vd1.catalog", NULL);

    g_assert_null(files_catalog_read(fd, "vd0", &err2));
    g_assert_error(err2, QBAK_ERROR, QBAK_ERROR_NOT_FOUND);
    g_assert_cmpint(files_catalog_write(fd, c, &err), >, 0);
    g_assert_no_error(err);
    d = files_catalog_read(fd, "vd0", &err);
    g_assert_no_error(err);
    g_assert_cmpuint(d->fss->len, ==, 2);
    files_catalog_free(d);
    /* a symlink in the point directory is never followed */
    g_assert_cmpint(symlink(path, link), ==, 0);
    g_clear_error(&err2);
    d = files_catalog_read(fd, "vd1", &err2);
    g_assert_null(d);
    g_assert_nonnull(err2);
    unlink(link);
    unlink(path);
    g_rmdir(dir);
    close(fd);
    files_catalog_free(c);
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/files/names/unsafe-components", test_name_unsafe);
    g_test_add_func("/files/names/path-split", test_path_split);
    g_test_add_func("/files/names/display-escapes", test_name_display);
    g_test_add_func("/files/names/drive-names", test_drive_name);
    g_test_add_func("/files/catalog/roundtrip", test_catalog_roundtrip);
    g_test_add_func("/files/catalog/every-flip-and-cut-is-damage",
                    test_catalog_damage);
    g_test_add_func("/files/catalog/durable-file-no-symlink",
                    test_catalog_file);
    return g_test_run();
}

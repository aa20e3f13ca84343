/* The manifest schema (agent/manifest.h): what validates, what is damage,
 * and that what a backup builds reads back. */
#include <string.h>

#include "agent/error.h"
#include "agent/manifest.h"

#define GOOD_DISK                                                              \
    "{\"disk\": \"vd0\", \"type\": \"incremental\", \"reason\": null, "        \
    "\"file\": \"vd0.qcow2\", \"virtual_size\": 1048576, "                     \
    "\"cluster_size\": 65536, \"chain\": \"c1\", \"bitmap\": \"b\", "          \
    "\"backing\": \"../P0/vd0.qcow2\"%s}"
#define SUMS ", \"sums\": \"vd0.qcow2.sums\", \"sums_algorithm\": \"xxh3-64\""
#define DOC                                                                    \
    "{\"format\": %d, \"vm\": \"vm1\", \"point\": \"P1\", \"parent\": "        \
    "\"P0\", \"time\": \"t\", \"consistency\": \"crash-consistent\", "         \
    "\"disks\": [%s]%s}"

static struct manifest *
parse(const char *text, GError **errp)
{
    json_t *j = json_loads(text, 0, NULL);
    struct manifest *m;

    g_assert_nonnull(j);
    m = manifest_parse(j, "vm1", "P1", errp);
    json_decref(j);
    return m;
}

static char *
doc(int format, const char *disk_extra, const char *extra)
{
    g_autofree char *disk = g_strdup_printf(GOOD_DISK, disk_extra);
    return g_strdup_printf(DOC, format, disk, extra);
}

static void
test_formats_read(void)
{
    g_autofree char *v2 = doc(2, SUMS, "");
    g_autofree char *v1 = doc(1, "", ", \"later_key\": [1, 2]");
    struct manifest *m;
    GError *err = NULL;

    m = parse(v2, &err);
    g_assert_no_error(err);
    g_assert_cmpint(m->format, ==, 2);
    g_assert_cmpstr(m->parent, ==, "P0");
    g_assert_cmpuint(m->n_disks, ==, 1);
    g_assert_cmpstr(manifest_disk(m, "vd0")->sums, ==, "vd0.qcow2.sums");
    g_assert_false(manifest_disk(m, "vd0")->full);
    g_assert_null(manifest_disk(m, "vd1"));
    manifest_free(m);
    m = parse(v1, &err);
    g_assert_no_error(err);
    g_assert_null(m->disks[0].sums);
    manifest_free(m);
}

static void
test_damage(void)
{
    static const struct {
        int format;
        const char *disk_extra, *extra, *why;
    } cases[] = {
        {3, SUMS, "", "format 3"},
        {0, SUMS, "", "format 0"},
        {2, ", \"sums\": \"vd0.qcow2.sums\"", "",
         "\"sums_algorithm\" is missing"},
        {2, ", \"sums\": \"vd0.qcow2.sums\", \"sums_algorithm\": \"md5\"", "",
         "unknown sums_algorithm"},
        {2, ", \"sums\": \"../x\", \"sums_algorithm\": \"xxh3-64\"", "",
         "invalid file name"},
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *text =
            doc(cases[i].format, cases[i].disk_extra, cases[i].extra);
        GError *err = NULL;

        g_assert_null(parse(text, &err));
        g_assert_error(err, QBAK_ERROR, QBAK_ERROR_DAMAGED);
        if (!strstr(err->message, cases[i].why)) {
            g_error("case %zu: %s", i, err->message);
        }
        g_error_free(err);
    }
}

static void
test_damage_raw(void)
{
    static const char *cases[] = {
        "[]",
        "{\"format\": 2}",
        "{\"format\": \"2\", \"vm\": \"vm1\"}",
        /* another point's manifest copied here */
        "{\"format\": 1, \"vm\": \"vm1\", \"point\": \"P9\", \"time\": \"t\", "
        "\"consistency\": \"c\", \"disks\": [{\"disk\": \"vd0\", \"type\": "
        "\"full\", \"file\": \"vd0.qcow2\", \"virtual_size\": 1, "
        "\"cluster_size\": 512, \"chain\": \"c\"}]}",
        /* a full with a backing file */
        "{\"format\": 1, \"vm\": \"vm1\", \"point\": \"P1\", \"time\": \"t\", "
        "\"consistency\": \"c\", \"disks\": [{\"disk\": \"vd0\", \"type\": "
        "\"full\", \"file\": \"vd0.qcow2\", \"virtual_size\": 1, "
        "\"cluster_size\": 512, \"chain\": \"c\", \"backing\": \"../x/y\"}]}",
        /* a bad cluster size */
        "{\"format\": 1, \"vm\": \"vm1\", \"point\": \"P1\", \"time\": \"t\", "
        "\"consistency\": \"c\", \"disks\": [{\"disk\": \"vd0\", \"type\": "
        "\"full\", \"file\": \"vd0.qcow2\", \"virtual_size\": 1, "
        "\"cluster_size\": 3000, \"chain\": \"c\"}]}",
        /* one disk twice */
        "{\"format\": 1, \"vm\": \"vm1\", \"point\": \"P1\", \"time\": \"t\", "
        "\"consistency\": \"c\", \"disks\": [{\"disk\": \"vd0\", \"type\": "
        "\"full\", \"file\": \"a\", \"virtual_size\": 1, \"cluster_size\": "
        "512, \"chain\": \"c\"}, {\"disk\": \"vd0\", \"type\": \"full\", "
        "\"file\": \"b\", \"virtual_size\": 1, \"cluster_size\": 512, "
        "\"chain\": \"c\"}]}",
        /* no disks */
        "{\"format\": 1, \"vm\": \"vm1\", \"point\": \"P1\", \"time\": \"t\", "
        "\"consistency\": \"c\", \"disks\": []}",
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        GError *err = NULL;
        g_assert_null(parse(cases[i], &err));
        g_assert_error(err, QBAK_ERROR, QBAK_ERROR_DAMAGED);
        g_error_free(err);
    }
}

static void
test_build_reads_back(void)
{
    json_t *m = manifest_new("vm1", "P1", NULL, "t", "7.2.0",
                             "filesystem-frozen", NULL, 1.5);
    struct manifest_disk d = {.disk = "vd1",
                              .full = true,
                              .file = "vd1.qcow2",
                              .chain = "c",
                              .sums = "vd1.qcow2.sums",
                              .virtual_size = 4096,
                              .cluster_size = 65536};
    struct manifest *back;
    GError *err = NULL;

    manifest_add_disk(m, &d, json_pack("{s:I}", "bytes_written", 7));
    back = manifest_parse(m, "vm1", "P1", &err);
    g_assert_no_error(err);
    g_assert_cmpint(back->format, ==, MANIFEST_FORMAT);
    g_assert_null(back->parent);
    g_assert_true(back->disks[0].full);
    g_assert_null(back->disks[0].backing);
    g_assert_cmpstr(back->disks[0].sums, ==, "vd1.qcow2.sums");
    g_assert_cmpint(
        json_integer_value(json_object_get(
            json_array_get(json_object_get(m, "disks"), 0), "bytes_written")),
        ==, 7);
    manifest_free(back);
    json_decref(m);
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/manifest/formats-1-and-2-read", test_formats_read);
    g_test_add_func("/manifest/schema-breaks-are-damage", test_damage);
    g_test_add_func("/manifest/malformed-documents-are-damage",
                    test_damage_raw);
    g_test_add_func("/manifest/built-manifest-reads-back",
                    test_build_reads_back);
    return g_test_run();
}

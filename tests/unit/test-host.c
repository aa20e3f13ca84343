/* Unit tests for agent/host: durations, sizes, the configuration file's
 * inheritance and its FILE:LINE errors, the last-run record, and the
 * progress lines a backup sends to a run. */
#include <glib.h>
#include <glib/gstdio.h>
#include <string.h>

#include "agent/host/config.h"
#include "agent/host/state.h"
#include "agent/progress.h"

static void
test_durations(void)
{
    static const struct {
        const char *s;
        bool ok;
        int64_t secs;
    } cases[] = {
        {"90s", true, 90},
        {"5m", true, 300},
        {"1h", true, 3600},
        {"1d", true, 86400},
        {"42", true, 42},
        {"0", true, 0},
        {"5x", false, 0},
        {"m", false, 0},
        {"", false, 0},
        {"-5m", false, 0},
        {"5 m", false, 0},
        {"5mm", false, 0},
        {" 5m", false, 0},
        {"99999999999999999999d", false, 0},
        {"9999999999999d", false, 0},
    };

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        int64_t v = -1;
        bool ok = host_parse_duration(cases[i].s, &v);

        g_assert_cmpint(ok, ==, cases[i].ok);
        if (ok) {
            g_assert_cmpint(v, ==, cases[i].secs);
        }
    }
}

static void
test_sizes(void)
{
    static const struct {
        const char *s;
        bool ok;
        int64_t bytes;
    } cases[] = {
        {"200M", true, 200 << 20}, {"4k", true, 4096},
        {"1G", true, 1 << 30},     {"2T", true, (int64_t)2 << 40},
        {"512", true, 512},        {"1.5G", false, 0},
        {"M", false, 0},           {"1MB", false, 0},
        {"9000000000T", false, 0},
    };

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        int64_t v = -1;
        bool ok = host_parse_size(cases[i].s, &v);

        g_assert_cmpint(ok, ==, cases[i].ok);
        if (ok) {
            g_assert_cmpint(v, ==, cases[i].bytes);
        }
    }
}

static char *
write_conf(const char *dir, const char *text)
{
    char *path = g_build_filename(dir, "qbak.conf", NULL);

    g_assert_true(g_file_set_contents(path, text, -1, NULL));
    return path;
}

static void
test_config_inherits(void)
{
    g_autofree char *dir = g_dir_make_tmp("qbak-unit-XXXXXX", NULL);
    g_autofree char *path =
        write_conf(dir, "[defaults]\nrepo = /r\nrpo = 15m\nkeep-last = 8\n"
                        "# comment\n\n[vm a]\nqmp = /a.qmp\n"
                        "[vm b]\nqmp = /b.qmp\nrpo = 1h\nkeep-last = 2\n"
                        "keep-weekly = 4\ndisks = vd0, vd1;vd2\n");
    g_autoptr(GError) err = NULL;
    struct host_config *c = host_config_load(path, &err);
    struct host_vm *a, *b;

    g_assert_no_error(err);
    g_assert_cmpuint(c->vms->len, ==, 2);
    a = host_config_find(c, "a");
    b = host_config_find(c, "b");
    g_assert_cmpstr(a->repo, ==, "/r");
    g_assert_cmpint(a->rpo_s, ==, 900);
    g_assert_cmpint(a->keep[HOST_KEEP_LAST], ==, 8);
    g_assert_cmpint(a->keep[HOST_KEEP_WEEKLY], ==, -1);
    g_assert_null(a->disks);
    g_assert_cmpint(b->rpo_s, ==, 3600);
    g_assert_cmpint(b->keep[HOST_KEEP_LAST], ==, 2);
    g_assert_cmpint(b->keep[HOST_KEEP_WEEKLY], ==, 4);
    g_assert_cmpstr(b->disks[0], ==, "vd0");
    g_assert_cmpstr(b->disks[2], ==, "vd2");
    g_assert_null(b->disks[3]);
    g_assert_true(host_vm_has_retention(a));
    g_assert_null(host_config_find(c, "c"));
    host_config_free(c);
    g_unlink(path);
    g_rmdir(dir);
}

static void
test_config_errors(void)
{
    static const struct {
        const char *text;
        const char *msg; /* after "PATH" */
    } cases[] = {
        {"[defaults]\nrepo = /r\n[vm a]\nqmp = /a\nbogus = 1\n",
         ":5: [vm a] bogus: unknown key"},
        {"[defaults]\nrepo = /r\n[vm a]\nqmp = /a\n[vm a]\nqmp = /b\n",
         ":5: [vm a]: duplicate section (first on line 3)"},
        {"[defaults]\nrepo = /r\n\n[vm a]\n", ":4: [vm a] qmp: not set"},
        {"[defaults]\nrpo = soon\n", ":2: [defaults] rpo: 'soon' is not a "
                                     "duration"},
        {"qmp = /a\n", ":1: qmp: a key before any [group]"},
        {"[defaults\n", ":1: a group line must be [NAME]"},
        {"[vm a]\nqmp = /a\nqmp = /b\n",
         ":3: [vm a] qmp: set twice (first on line 2)"},
        {"[vm a]\nqmp = /a\n", ":1: [vm a] repo: not set"},
        {"[vm a]\nrepo = /r\nqmp = /a\nquiesce = require\n",
         ":4: [vm a] quiesce: require needs qga"},
        {"[vm a]\nrepo = /r\nqmp = /a\nkeep-daily = 0\n",
         ":4: [vm a] keep-daily: '0': must be a count"},
    };
    g_autofree char *dir = g_dir_make_tmp("qbak-unit-XXXXXX", NULL);

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *path = write_conf(dir, cases[i].text);
        g_autofree char *want = g_strconcat(path, cases[i].msg, NULL);
        g_autoptr(GError) err = NULL;

        g_assert_null(host_config_load(path, &err));
        g_assert_nonnull(err);
        if (!g_str_has_prefix(err->message, want)) {
            g_error("case %zu: '%s' does not start with '%s'", i, err->message,
                    want);
        }
        g_unlink(path);
    }
    g_rmdir(dir);
}

static void
test_record_round_trip(void)
{
    g_autofree char *dir = g_dir_make_tmp("qbak-unit-XXXXXX", NULL);
    g_autofree char *repo = g_build_filename(dir, "repo", NULL);
    g_autofree char *vmdir = g_build_filename(repo, "vm1", NULL);
    g_autofree char *rec = g_build_filename(vmdir, HOST_RECORD_NAME, NULL);
    json_t *in = json_pack("{s:s, s:s}", "outcome", "busy", "error", "x");
    json_t *out;
    g_autoptr(GError) err = NULL;

    g_assert_null(host_record_read(repo, "vm1"));
    g_assert_true(host_record_write(repo, "vm1", in, &err));
    g_assert_no_error(err);
    out = host_record_read(repo, "vm1");
    g_assert_true(json_equal(in, out));
    /* Nothing but the record is left: the temporary file was renamed. */
    {
        g_autoptr(GDir) d = g_dir_open(vmdir, 0, NULL);
        g_assert_cmpstr(g_dir_read_name(d), ==, HOST_RECORD_NAME);
        g_assert_null(g_dir_read_name(d));
    }
    g_assert_false(host_record_write(repo, "../x", in, NULL));
    json_decref(in);
    json_decref(out);
    g_unlink(rec);
    g_rmdir(vmdir);
    g_rmdir(repo);
    g_rmdir(dir);
}

static void
test_progress_lines(void)
{
    int fds[2];
    struct progress *p;
    char buf[256] = {0}, item[128];
    uint64_t done, total;
    g_auto(GStrv) lines = NULL;

    g_assert_cmpint(pipe(fds), ==, 0);
    p = progress_new_fd(fds[1]);
    progress_set(p, "vd0", 1 << 20, 4 << 20);
    progress_set(p, "vd1", 0, 512);
    progress_end(p, true);
    close(fds[1]);
    g_assert_cmpint(read(fds[0], buf, sizeof(buf) - 1), >, 0);
    close(fds[0]);
    lines = g_strsplit(buf, "\n", -1);
    g_assert_true(progress_parse_line(lines[0], item, &done, &total));
    g_assert_cmpstr(item, ==, "vd0");
    g_assert_cmpuint(done, ==, 1 << 20);
    g_assert_cmpuint(total, ==, 4 << 20);
    g_assert_true(progress_parse_line(lines[1], item, &done, &total));
    g_assert_cmpstr(item, ==, "vd1");
    g_assert_cmpstr(lines[2], ==, "");
    g_assert_false(progress_parse_line("vd0 1", item, &done, &total));
    g_assert_false(progress_parse_line("vd0 1 2 3", item, &done, &total));
    g_assert_false(progress_parse_line("vd0 x 2", item, &done, &total));
    g_assert_null(progress_new("x", false));
    g_assert_null(progress_new_fd(-1));
    progress_set(NULL, "vd0", 1, 2); /* NULL does nothing */
    progress_end(NULL, true);
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/host/duration/units-and-rejects", test_durations);
    g_test_add_func("/host/size/powers-of-1024-and-rejects", test_sizes);
    g_test_add_func("/host/config/defaults-are-inherited-key-by-key",
                    test_config_inherits);
    g_test_add_func("/host/config/errors-name-file-line-and-key",
                    test_config_errors);
    g_test_add_func("/host/record/written-atomically-and-read-back",
                    test_record_round_trip);
    g_test_add_func("/host/progress/fd-lines-parse-back", test_progress_lines);
    return g_test_run();
}

/* qbak verify: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/verify.h"

static void
print_human(json_t *res)
{
    size_t i, k, n;
    json_t *v, *p, *d;
    double secs = json_real_value(json_object_get(res, "duration_s"));
    double bytes =
        (double)json_integer_value(json_object_get(res, "bytes_read"));

    json_array_foreach(json_object_get(res, "vms"), i, v)
    {
        if (json_is_true(json_object_get(v, "busy"))) {
            printf("%s  busy: another qbak holds its lock; not verified\n",
                   json_string_value(json_object_get(v, "vm")));
        }
        json_array_foreach(json_object_get(v, "points"), k, p)
        {
            const char *state = json_string_value(json_object_get(p, "state"));

            printf("%s %s  %s\n", json_string_value(json_object_get(v, "vm")),
                   json_string_value(json_object_get(p, "point")), state);
            if (strcmp(state, "good") == 0) {
                continue;
            }
            json_array_foreach(json_object_get(p, "disks"), n, d)
            {
                const char *disk =
                    json_string_value(json_object_get(d, "disk"));
                json_t *off = json_object_get(d, "offset");

                if (strcmp(json_string_value(json_object_get(d, "state")),
                           "good") == 0) {
                    continue;
                }
                printf("    %s", disk ? disk : "manifest");
                if (json_is_integer(off)) {
                    printf(" at guest offset %" JSON_INTEGER_FORMAT,
                           json_integer_value(off));
                }
                printf(": %s\n",
                       json_string_value(json_object_get(d, "reason")));
            }
        }
    }
    printf("%d good, %d damaged, %d unverifiable; %.1f MiB read in %.2f s "
           "(%.0f MiB/s), checksums %.2f s CPU\n",
           (int)json_integer_value(json_object_get(res, "good")),
           (int)json_integer_value(json_object_get(res, "damaged")),
           (int)json_integer_value(json_object_get(res, "unverifiable")),
           bytes / 1048576.0, secs, secs > 0 ? bytes / 1048576.0 / secs : 0,
           json_real_value(json_object_get(res, "checksum_cpu_s")));
}

int
cmd_verify(int argc, char **argv)
{
    struct verify_opts o = {0};
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    g_autofree gchar *point = NULL;
    g_autofree gchar *disk = NULL;
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res;
    int status;
    GOptionEntry entries[] = {
        CLI_OPT_REPO(repo),
        CLI_OPT_VM(vm, "only this VM (default: all)"),
        CLI_OPT_POINT(point,
                      "only this restore point (and the chain it needs)"),
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk, "only this disk", "NAME"},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when another qbak holds a VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        CLI_OPT_JSON(json),
        {NULL}};

    cli_parse("verify",
              "Re-read every stored cluster and check it against its "
              "checksums; check every chain's structure.",
              NULL, entries, &argc, &argv);
    cli_require("verify", repo, "--repo");
    if (point && !vm) {
        cli_usage_error("verify", "--point needs --vm");
    }
    o.repo = repo;
    o.vm = vm;
    o.point = point;
    o.disk = disk;
    o.wait_ms = cli_wait_ms("verify", wait);
    o.progress = cli_progress_wanted(json);
    res = verify_run(&o, &err);
    if (!res) {
        return cli_fail("verify", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_human(res);
    }
    status = json_integer_value(json_object_get(res, "damaged")) > 0
                 ? QBAK_EXIT_FAILED
             : json_integer_value(json_object_get(res, "busy")) > 0
                 ? QBAK_EXIT_BUSY
                 : 0;
    json_decref(res);
    return status;
}

/* qbak run: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/host/config.h"
#include "agent/host/run.h"

static void
print_run_human(json_t *res)
{
    size_t i;
    json_t *v;

    json_array_foreach(json_object_get(res, "vms"), i, v)
    {
        const char *outcome = json_string_value(json_object_get(v, "outcome"));
        const char *err = json_string_value(json_object_get(v, "error"));
        const char *point = json_string_value(json_object_get(v, "point"));

        printf("%-16s %-12s", json_string_value(json_object_get(v, "vm")),
               outcome ? outcome : "?");
        if (point) {
            printf(" point %s (%.2f s, %.1f MiB written)", point,
                   json_real_value(json_object_get(v, "duration_s")),
                   (double)json_integer_value(
                       json_object_get(v, "bytes_written")) /
                       1048576.0);
        }
        if (err) {
            printf(" %s", err);
        }
        putchar('\n');
    }
    printf("%d due, %d ok, %d failed\n",
           (int)json_integer_value(json_object_get(res, "due")),
           (int)json_integer_value(json_object_get(res, "ok")),
           (int)json_integer_value(json_object_get(res, "failed")));
}

int
cmd_run(int argc, char **argv)
{
    g_autofree gchar *config = NULL;
    g_auto(GStrv) vms = NULL;
    gboolean all = FALSE, json = FALSE;
    gint jobs = 0;
    GError *err = NULL;
    struct host_config *c = NULL;
    struct host_run_opts o = {0};
    bool all_ok = false;
    json_t *res;
    GOptionEntry entries[] = {
        {"config", 0, 0, G_OPTION_ARG_FILENAME, &config,
         "the host's configuration (default " HOST_CONFIG_DEFAULT ")", "FILE"},
        {"vm", 0, 0, G_OPTION_ARG_STRING_ARRAY, &vms,
         "only this VM of the configuration; repeatable", "NAME"},
        {"all", 0, 0, G_OPTION_ARG_NONE, &all,
         "back up every selected VM now, whether due or not", NULL},
        {"jobs", 'j', 0, G_OPTION_ARG_INT, &jobs,
         "back up at most N VMs at once (default: one per CPU, 2 to 16)", "N"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json,
         "print the result as one JSON object", NULL},
        {NULL}};

    cli_parse("run",
              "Back up every VM that is due by its RPO, then prune it by its "
              "retention rules.",
              NULL, entries, &argc, &argv);
    if (jobs < 0 || jobs > 1024) {
        cli_usage_error("run", "--jobs must be 1 to 1024");
    }
    c = host_config_load(config ? config : HOST_CONFIG_DEFAULT, &err);
    if (!c) {
        cli_fail("run", err);
        return QBAK_EXIT_USAGE;
    }
    o.config = c;
    o.vms = vms;
    o.all = all;
    o.jobs = jobs ? jobs : host_run_default_jobs();
    o.progress = cli_progress_wanted(json);
    o.self = "/proc/self/exe";
    res = host_run(&o, &all_ok, &err);
    host_config_free(c);
    if (!res) {
        return cli_fail("run", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_run_human(res);
    }
    json_decref(res);
    return all_ok ? 0 : QBAK_EXIT_FAILED;
}

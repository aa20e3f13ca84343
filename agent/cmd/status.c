/* qbak status: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/host/config.h"
#include "agent/host/status.h"

static void
print_age(json_t *age)
{
    char buf[32];
    int64_t s = json_integer_value(age);

    if (!json_is_integer(age)) {
        snprintf(buf, sizeof(buf), "-");
    } else if (s < 120) {
        snprintf(buf, sizeof(buf), "%" G_GINT64_FORMAT "s", s);
    } else if (s < 7200) {
        snprintf(buf, sizeof(buf), "%" G_GINT64_FORMAT "m", s / 60);
    } else if (s < 2 * 86400) {
        snprintf(buf, sizeof(buf), "%" G_GINT64_FORMAT "h", s / 3600);
    } else {
        snprintf(buf, sizeof(buf), "%" G_GINT64_FORMAT "d", s / 86400);
    }
    printf(" %6s", buf);
}

static void
print_status_human(json_t *res)
{
    size_t i;
    json_t *v;

    printf("%-16s %-8s %-22s %6s %6s %10s  %s\n", "VM", "STATE", "NEWEST POINT",
           "AGE", "RPO", "USED MiB", "LAST ERROR");
    json_array_foreach(json_object_get(res, "vms"), i, v)
    {
        const char *point =
            json_string_value(json_object_get(v, "newest_point"));
        const char *err = json_string_value(json_object_get(v, "error"));

        printf("%-16s %-8s %-22s", json_string_value(json_object_get(v, "vm")),
               json_string_value(json_object_get(v, "state")),
               point ? point : "-");
        print_age(json_object_get(v, "age_s"));
        print_age(json_object_get(v, "rpo_s"));
        printf(" %10.1f  %s\n",
               (double)json_integer_value(json_object_get(v, "repo_bytes")) /
                   1048576.0,
               err ? err : "");
    }
}

int
cmd_status(int argc, char **argv)
{
    g_autofree gchar *config = NULL;
    g_autofree gchar *prometheus = NULL;
    gboolean json = FALSE;
    GError *err = NULL;
    struct host_config *c = NULL;
    bool all_ok = false;
    json_t *res;
    GOptionEntry entries[] = {
        {"config", 0, 0, G_OPTION_ARG_FILENAME, &config,
         "the host's configuration (default " HOST_CONFIG_DEFAULT ")", "FILE"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json,
         "print the status as one JSON object", NULL},
        {"prometheus", 0, 0, G_OPTION_ARG_FILENAME, &prometheus,
         "also write the status as node_exporter textfile metrics to FILE "
         "(atomically)",
         "FILE"},
        {NULL}};

    cli_parse("status",
              "Show each VM's newest point against its RPO: OK, LATE, "
              "FAILING or NEVER.",
              NULL, entries, &argc, &argv);
    c = host_config_load(config ? config : HOST_CONFIG_DEFAULT, &err);
    if (!c) {
        cli_fail("status", err);
        return QBAK_EXIT_USAGE;
    }
    res = host_status(c, &all_ok);
    host_config_free(c);
    if (prometheus && !host_metrics_write(res, prometheus, &err)) {
        json_decref(res);
        return cli_fail("status", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_status_human(res);
    }
    json_decref(res);
    return all_ok ? 0 : QBAK_EXIT_FAILED;
}

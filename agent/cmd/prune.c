/* qbak prune: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/prune.h"

static void
print_human(json_t *res)
{
    bool dry = json_is_true(json_object_get(res, "dry_run"));
    size_t i, k;
    json_t *p, *d, *s;

    json_array_foreach(json_object_get(res, "recovered"), i, s)
    {
        printf("recovered: %s\n", json_string_value(s));
    }
    printf("%s: %s %d points, %s %d%s\n",
           json_string_value(json_object_get(res, "vm")),
           dry ? "would keep" : "kept",
           (int)json_integer_value(json_object_get(res, "kept")),
           dry ? "remove" : "removed",
           (int)json_integer_value(json_object_get(res, "removed")),
           dry ? " (dry run: nothing changed)" : "");
    json_array_foreach(json_object_get(res, "points"), i, p)
    {
        GString *how = g_string_new(NULL);
        json_array_foreach(json_object_get(p, "disks"), k, d)
        {
            const char *into = json_string_value(json_object_get(d, "into"));
            g_string_append_printf(
                how, "; %s %s%s", json_string_value(json_object_get(d, "disk")),
                into ? "merged into " : "deleted", into ? into : "");
        }
        printf("  %-6s  %s  %s  %s%s\n",
               json_is_true(json_object_get(p, "keep")) ? "keep" : "remove",
               json_string_value(json_object_get(p, "point")),
               json_string_value(json_object_get(p, "time"))
                   ? json_string_value(json_object_get(p, "time"))
                   : "-",
               json_string_value(json_object_get(p, "reason")), how->str);
        g_string_free(how, true);
    }
}

int
cmd_prune(int argc, char **argv)
{
    struct prune_opts o = {0};
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    gint keep[RETENTION_N_RULES];
    gboolean dry_run = FALSE, json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        CLI_OPT_REPO(repo),
        CLI_OPT_VM(vm, "VM name"),
        {"keep-last", 0, 0, G_OPTION_ARG_INT, &keep[RETENTION_LAST],
         "keep the N newest points", "N"},
        {"keep-hourly", 0, 0, G_OPTION_ARG_INT, &keep[RETENTION_HOURLY],
         "keep the newest point of each of the last N hours that have one",
         "N"},
        {"keep-daily", 0, 0, G_OPTION_ARG_INT, &keep[RETENTION_DAILY],
         "the same for days", "N"},
        {"keep-weekly", 0, 0, G_OPTION_ARG_INT, &keep[RETENTION_WEEKLY],
         "the same for ISO weeks (Monday to Sunday)", "N"},
        {"keep-monthly", 0, 0, G_OPTION_ARG_INT, &keep[RETENTION_MONTHLY],
         "the same for months", "N"},
        {"keep-yearly", 0, 0, G_OPTION_ARG_INT, &keep[RETENTION_YEARLY],
         "the same for years", "N"},
        {"dry-run", 0, 0, G_OPTION_ARG_NONE, &dry_run,
         "say what would be kept and removed, and why; change nothing", NULL},
        CLI_OPT_WAIT(wait),
        CLI_OPT_JSON(json),
        {NULL}};

    for (int r = 0; r < RETENTION_N_RULES; r++) {
        keep[r] = -1;
    }
    cli_parse("prune",
              "Keep the points a retention policy selects, remove the rest "
              "(merging what kept points build on).",
              NULL, entries, &argc, &argv);
    cli_require("prune", repo, "--repo");
    cli_require("prune", vm, "--vm");
    for (int r = 0; r < RETENTION_N_RULES; r++) {
        if (keep[r] == -1) {
            continue;
        }
        if (keep[r] < 1 || keep[r] > 1000000) {
            cli_usage_error("prune", "--%s must be 1 to 1000000",
                            retention_rule_name((enum retention_rule)r));
        }
        o.policy.keep[r] = (unsigned)keep[r];
    }
    if (!retention_policy_any(&o.policy)) {
        cli_usage_error("prune", "give at least one --keep-* rule (with none, "
                                 "nothing would be kept)");
    }
    o.repo = repo;
    o.vm = vm;
    o.dry_run = dry_run;
    o.wait_ms = cli_wait_ms("prune", wait);
    res = prune_run(&o, &err);
    if (!res) {
        return cli_fail("prune", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_human(res);
    }
    json_decref(res);
    return 0;
}

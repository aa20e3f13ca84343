/* qbak list: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/list.h"

int
cmd_list(int argc, char **argv)
{
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    gboolean json = FALSE;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "only this VM", "NAME"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("list", "List committed restore points, oldest first.", NULL,
              entries, &argc, &argv);
    cli_require("list", repo, "--repo");
    res = list_run(repo, vm, &err);
    if (!res) {
        return cli_fail("list", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        list_print_human(res);
    }
    json_decref(res);
    return 0;
}

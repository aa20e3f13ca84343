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
    GOptionEntry entries[] = {CLI_OPT_REPO(repo),
                              CLI_OPT_VM(vm, "only this VM"),
                              CLI_OPT_JSON(json),
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

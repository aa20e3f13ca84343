/* qbak protect and unprotect: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/prune.h"

static int
protect_main(const char *cmd, bool protect, int argc, char **argv)
{
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    g_autofree gchar *point = NULL;
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {CLI_OPT_REPO(repo),
                              CLI_OPT_VM(vm, "VM name"),
                              CLI_OPT_POINT(point, "restore point id"),
                              CLI_OPT_WAIT(wait),
                              CLI_OPT_JSON(json),
                              {NULL}};

    cli_parse(cmd,
              protect ? "Protect a restore point from prune."
                      : "Let prune remove a restore point again.",
              NULL, entries, &argc, &argv);
    cli_require(cmd, repo, "--repo");
    cli_require(cmd, vm, "--vm");
    cli_require(cmd, point, "--point");
    res = prune_protect(repo, vm, point, protect, cli_wait_ms(cmd, wait), &err);
    if (!res) {
        return cli_fail(cmd, err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        printf("%s: point %s %s%s\n", vm, point,
               protect ? "protected" : "not protected",
               json_is_true(json_object_get(res, "changed")) ? ""
                                                             : " (already)");
    }
    json_decref(res);
    return 0;
}

int
cmd_protect(int argc, char **argv)
{
    return protect_main("protect", true, argc, argv);
}

int
cmd_unprotect(int argc, char **argv)
{
    return protect_main("unprotect", false, argc, argv);
}

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
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name", "NAME"},
        {"point", 0, 0, G_OPTION_ARG_STRING, &point, "restore point id", "ID"},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "while a prune holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
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

/* qbak restore: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/restore.h"

int
cmd_restore(int argc, char **argv)
{
    struct restore_opts o = {0};
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    g_autofree gchar *disk = NULL;
    g_autofree gchar *point = NULL;
    g_autofree gchar *output = NULL;
    g_autofree gchar *format = NULL;
    gboolean force = FALSE, json = FALSE, no_verify = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name", "NAME"},
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk, "disk to restore", "NAME"},
        {"point", 0, 0, G_OPTION_ARG_STRING, &point,
         "restore point id (default: the newest)", "ID"},
        {"output", 0, 0, G_OPTION_ARG_FILENAME, &output, "image to write",
         "FILE"},
        {"format", 0, 0, G_OPTION_ARG_STRING, &format,
         "raw (sparse, default) or qcow2", "FMT"},
        {"force", 0, 0, G_OPTION_ARG_NONE, &force,
         "overwrite an existing output", NULL},
        {"no-verify", 0, 0, G_OPTION_ARG_NONE, &no_verify,
         "do not check the data read against its checksums", NULL},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when another qbak holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("restore", "Write one disk at one restore point as an image.",
              NULL, entries, &argc, &argv);
    cli_require("restore", repo, "--repo");
    cli_require("restore", vm, "--vm");
    cli_require("restore", disk, "--disk");
    cli_require("restore", output, "--output");
    if (format && strcmp(format, "raw") && strcmp(format, "qcow2")) {
        fprintf(stderr, "qbak restore: --format must be raw or qcow2\n");
        return QBAK_EXIT_USAGE;
    }
    o.repo = repo;
    o.vm = vm;
    o.disk = disk;
    o.point = point;
    o.output = output;
    o.qcow2 = format && strcmp(format, "qcow2") == 0;
    o.force = force;
    o.no_verify = no_verify;
    o.wait_ms = cli_wait_ms("restore", wait);
    o.progress = cli_progress_wanted(json);
    res = restore_run(&o, &err);
    if (!res) {
        return cli_fail("restore", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        printf("%s: %s at %s restored to %s (%s, %.2f s)\n", vm, disk,
               json_string_value(json_object_get(res, "point")), output,
               o.qcow2 ? "qcow2" : "raw",
               json_real_value(json_object_get(res, "duration_s")));
    }
    json_decref(res);
    return 0;
}

/* qbak get: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

int
cmd_get(int argc, char **argv)
{
    struct files_opts o = {0};
    struct files_get_opts go = {0};
    g_autofree gchar *repo = NULL, *vm = NULL, *point = NULL, *disk = NULL,
                     *fs = NULL, *output = NULL;
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res, *s;
    size_t i, nskipped;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name", "NAME"},
        {"point", 0, 0, G_OPTION_ARG_STRING, &point,
         "restore point id (default: the newest)", "ID"},
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk,
         "disk (default: the VM's only disk)", "NAME"},
        {"fs", 0, 0, G_OPTION_ARG_STRING, &fs,
         "file system: partition number, VG/LV, disk or os (default: the only "
         "one, or the guest's view of an OS disk)",
         "FS"},
        {"output", 0, 0, G_OPTION_ARG_FILENAME, &output,
         "where to copy: a new file, an existing directory, or - (one file "
         "to standard output)",
         "DEST"},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when a prune holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("get", "Copy files or directories out of a restore point.",
              "PATH...", entries, &argc, &argv);
    cli_require("get", repo, "--repo");
    cli_require("get", vm, "--vm");
    cli_require("get", output, "--output");
    if (argc < 2) {
        cli_usage_error("get", "at least one PATH is required");
    }
    if (json && strcmp(output, "-") == 0) {
        cli_usage_error("get", "--json and --output - both want stdout");
    }
    o.repo = repo;
    o.vm = vm;
    o.point = point;
    o.disk = disk;
    o.fs = fs;
    o.wait_ms = cli_wait_ms("get", wait);
    go.paths = argv + 1;
    go.output = output;
    res = files_get(&o, &go, &err);
    if (!res) {
        return cli_fail("get", err);
    }
    nskipped = json_array_size(json_object_get(res, "skipped"));
    json_array_foreach(json_object_get(res, "skipped"), i, s)
    {
        const char *p = json_string_value(json_object_get(s, "path"));
        g_autofree char *pp = files_name_printable(p, strlen(p));
        fprintf(stderr, "qbak get: not copied: %s: %s\n", pp,
                json_string_value(json_object_get(s, "reason")));
    }
    if (json) {
        cli_print_json(res);
    } else if (strcmp(output, "-") != 0) {
        printf("%s: %" JSON_INTEGER_FORMAT " file(s), %" JSON_INTEGER_FORMAT
               " dir(s), %" JSON_INTEGER_FORMAT
               " symlink(s), %" JSON_INTEGER_FORMAT " bytes from %s to %s\n",
               vm, json_integer_value(json_object_get(res, "files")),
               json_integer_value(json_object_get(res, "dirs")),
               json_integer_value(json_object_get(res, "symlinks")),
               json_integer_value(json_object_get(res, "bytes")),
               json_string_value(json_object_get(res, "point")), output);
    }
    json_decref(res);
    return nskipped ? QBAK_EXIT_FAILED : 0;
}

/* qbak find: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

int
cmd_find(int argc, char **argv)
{
    struct files_opts o = {0};
    g_autofree gchar *repo = NULL, *vm = NULL, *points = NULL, *disk = NULL,
                     *fs = NULL, *name = NULL, *path = NULL;
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res, *m;
    size_t i;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name", "NAME"},
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk,
         "disk (default: the VM's only disk)", "NAME"},
        {"fs", 0, 0, G_OPTION_ARG_STRING, &fs,
         "file system: partition number, VG/LV or disk (default: the only one)",
         "FS"},
        {"points", 0, 0, G_OPTION_ARG_STRING, &points,
         "points to search: all (default), ID, or FROM..TO", "SPEC"},
        {"name", 0, 0, G_OPTION_ARG_STRING, &name,
         "file names matching this glob (fnmatch)", "GLOB"},
        {"path", 0, 0, G_OPTION_ARG_STRING, &path,
         "paths matching this glob ('*' matches '/' too)", "GLOB"},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when a prune holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("find",
              "Find files across restore points (catalogs where present; "
              "points without one are indexed).",
              NULL, entries, &argc, &argv);
    cli_require("find", repo, "--repo");
    cli_require("find", vm, "--vm");
    o.repo = repo;
    o.vm = vm;
    o.points = points;
    o.disk = disk;
    o.fs = fs;
    o.wait_ms = cli_wait_ms("find", wait);
    o.progress = cli_progress_wanted(json);
    res = files_find(&o, name, path, &err);
    if (!res) {
        return cli_fail("find", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        json_array_foreach(json_object_get(res, "matches"), i, m)
        {
            const char *p = json_string_value(json_object_get(m, "path"));
            g_autofree char *pp = files_name_printable(p, strlen(p));
            printf("%s  %-7s %12" JSON_INTEGER_FORMAT "  %s  %s\n",
                   json_string_value(json_object_get(m, "point")),
                   json_string_value(json_object_get(m, "change")),
                   json_integer_value(json_object_get(m, "size")),
                   json_string_value(json_object_get(m, "mtime")), pp);
        }
    }
    json_decref(res);
    return 0;
}

/* qbak index: options and output. */
#include <stdio.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/files/files.h"

int
cmd_index(int argc, char **argv)
{
    struct files_opts o = {0};
    g_autofree gchar *repo = NULL, *vm = NULL, *points = NULL, *disk = NULL;
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res, *p;
    size_t i, made = 0;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name", "NAME"},
        {"points", 0, 0, G_OPTION_ARG_STRING, &points,
         "points to index: all (default), ID, or FROM..TO", "SPEC"},
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk,
         "only this disk (default: every disk)", "NAME"},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when a prune holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("index",
              "Write the file catalog of each point and disk that lacks one.",
              NULL, entries, &argc, &argv);
    cli_require("index", repo, "--repo");
    cli_require("index", vm, "--vm");
    o.repo = repo;
    o.vm = vm;
    o.points = points;
    o.disk = disk;
    o.wait_ms = cli_wait_ms("index", wait);
    o.progress = cli_progress_wanted(json);
    res = files_index(&o, &err);
    if (!res) {
        return cli_fail("index", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        json_array_foreach(json_object_get(res, "points"), i, p)
        {
            if (json_is_true(json_object_get(p, "indexed"))) {
                made++;
                printf("%s %s: %" JSON_INTEGER_FORMAT
                       " entries, %" JSON_INTEGER_FORMAT " bytes\n",
                       json_string_value(json_object_get(p, "point")),
                       json_string_value(json_object_get(p, "disk")),
                       json_integer_value(json_object_get(p, "entries")),
                       json_integer_value(json_object_get(p, "bytes")));
            }
        }
        printf("%zu catalog(s) written, %zu already present (%.1f s)\n", made,
               json_array_size(json_object_get(res, "points")) - made,
               json_real_value(json_object_get(res, "duration_s")));
    }
    json_decref(res);
    return 0;
}

/* qbak index: options and output. */
#include <stdio.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/cmd/files_cli.h"
#include "agent/files/files.h"

int
cmd_index(int argc, char **argv)
{
    struct files_cli c FILES_CLI_AUTO = {0};
    struct files_opts o;
    GError *err = NULL;
    json_t *res, *p;
    size_t i, made = 0;
    GOptionEntry entries[] = {
        CLI_OPT_REPO(c.repo),
        CLI_OPT_VM(c.vm, "VM name"),
        FILES_CLI_POINTS(c, "points to index: all (default), ID, or FROM..TO"),
        FILES_CLI_DISK(c, "only this disk (default: every disk)"),
        CLI_OPT_WAIT(c.wait),
        CLI_OPT_JSON(c.json),
        {NULL}};

    cli_parse("index",
              "Write the file catalog of each point and disk that lacks one.",
              NULL, entries, &argc, &argv);
    files_cli_opts("index", &c, &o);
    res = files_index(&o, &err);
    if (!res) {
        return cli_fail("index", err);
    }
    if (c.json) {
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

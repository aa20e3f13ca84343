/* qbak find: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/cmd/files_cli.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

int
cmd_find(int argc, char **argv)
{
    struct files_cli c FILES_CLI_AUTO = {0};
    struct files_opts o;
    g_autofree gchar *name = NULL, *path = NULL;
    GError *err = NULL;
    json_t *res, *m;
    size_t i;
    GOptionEntry entries[] = {
        CLI_OPT_REPO(c.repo),
        CLI_OPT_VM(c.vm, "VM name"),
        FILES_CLI_DISK(c, "disk (default: the VM's only disk)"),
        FILES_CLI_FS(c, "file system: partition number, VG/LV or disk "
                        "(default: the only one)"),
        FILES_CLI_POINTS(c, "points to search: all (default), ID, or FROM..TO"),
        {"name", 0, 0, G_OPTION_ARG_STRING, &name,
         "file names matching this glob (fnmatch)", "GLOB"},
        {"path", 0, 0, G_OPTION_ARG_STRING, &path,
         "paths matching this glob ('*' matches '/' too)", "GLOB"},
        CLI_OPT_WAIT(c.wait),
        CLI_OPT_JSON(c.json),
        {NULL}};

    cli_parse("find",
              "Find files across restore points (catalogs where present; "
              "points without one are indexed).",
              NULL, entries, &argc, &argv);
    files_cli_opts("find", &c, &o);
    res = files_find(&o, name, path, &err);
    if (!res) {
        return cli_fail("find", err);
    }
    if (c.json) {
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

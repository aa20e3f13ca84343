/* qbak get: options and output. */
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
cmd_get(int argc, char **argv)
{
    struct files_cli c FILES_CLI_AUTO = {0};
    struct files_opts o;
    struct files_get_opts go = {0};
    g_autofree gchar *output = NULL;
    GError *err = NULL;
    json_t *res, *s;
    size_t i, nskipped;
    GOptionEntry entries[] = {
        FILES_CLI_ONE_POINT(c),
        {"output", 0, 0, G_OPTION_ARG_FILENAME, &output,
         "where to copy: a new file, an existing directory, or - (one file "
         "to standard output)",
         "DEST"},
        CLI_OPT_WAIT(c.wait),
        CLI_OPT_JSON(c.json),
        {NULL}};

    cli_parse("get", "Copy files or directories out of a restore point.",
              "PATH...", entries, &argc, &argv);
    files_cli_opts("get", &c, &o);
    cli_require("get", output, "--output");
    if (argc < 2) {
        cli_usage_error("get", "at least one PATH is required");
    }
    if (c.json && strcmp(output, "-") == 0) {
        cli_usage_error("get", "--json and --output - both want stdout");
    }
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
    if (c.json) {
        cli_print_json(res);
    } else if (strcmp(output, "-") != 0) {
        printf("%s: %" JSON_INTEGER_FORMAT " file(s), %" JSON_INTEGER_FORMAT
               " dir(s), %" JSON_INTEGER_FORMAT
               " symlink(s), %" JSON_INTEGER_FORMAT " bytes from %s to %s\n",
               c.vm, json_integer_value(json_object_get(res, "files")),
               json_integer_value(json_object_get(res, "dirs")),
               json_integer_value(json_object_get(res, "symlinks")),
               json_integer_value(json_object_get(res, "bytes")),
               json_string_value(json_object_get(res, "point")), output);
    }
    json_decref(res);
    return nskipped ? QBAK_EXIT_FAILED : 0;
}

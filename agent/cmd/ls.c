/* qbak ls: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/cmd/files_cli.h"
#include "agent/files/files.h"
#include "agent/files/names.h"

static const char *
jstr(json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static void
print_human(json_t *res)
{
    size_t i;
    json_t *e;

    if (json_object_get(res, "filesystems")) {
        printf("%s %s: several file systems; choose one with --fs\n",
               jstr(res, "point"), jstr(res, "disk"));
        printf("%-16s %-10s %14s  %s\n", "FS", "TYPE", "SIZE", "LABEL");
        json_array_foreach(json_object_get(res, "filesystems"), i, e)
        {
            g_autofree char *label = files_name_printable(
                jstr(e, "label"), strlen(jstr(e, "label")));
            printf("%-16s %-10s %14" JSON_INTEGER_FORMAT "  %s\n",
                   jstr(e, "fs"), jstr(e, "type"),
                   json_integer_value(json_object_get(e, "size")), label);
        }
        return;
    }
    json_array_foreach(json_object_get(res, "entries"), i, e)
    {
        const char *type = jstr(e, "type");
        const char *mode = jstr(e, "mode");
        unsigned m = (unsigned)strtoul(mode, NULL, 8);
        char ms[11];
        g_autofree char *name =
            files_name_printable(jstr(e, "name"), strlen(jstr(e, "name")));

        files_mode_string(m, ms);
        ms[0] = strcmp(type, "dir") == 0       ? 'd'
                : strcmp(type, "symlink") == 0 ? 'l'
                : strcmp(type, "file") == 0    ? '-'
                                               : '?';
        printf("%s %12" JSON_INTEGER_FORMAT " %s %s", ms,
               json_integer_value(json_object_get(e, "size")), jstr(e, "mtime"),
               name);
        if (jstr(e, "target")) {
            g_autofree char *t = files_name_printable(
                jstr(e, "target"), strlen(jstr(e, "target")));
            printf(" -> %s", t);
        }
        putchar('\n');
    }
}

int
cmd_ls(int argc, char **argv)
{
    struct files_cli c FILES_CLI_AUTO = {0};
    struct files_opts o;
    GError *err = NULL;
    json_t *res, *errors, *e;
    size_t i;
    int ret;
    GOptionEntry entries[] = {FILES_CLI_ONE_POINT(c),
                              CLI_OPT_WAIT(c.wait),
                              CLI_OPT_JSON(c.json),
                              {NULL}};

    cli_parse("ls", "List a directory of a restore point.", "[PATH]", entries,
              &argc, &argv);
    files_cli_opts("ls", &c, &o);
    if (argc > 2) {
        cli_usage_error("ls", "one PATH at most");
    }
    res = files_ls(&o, argc > 1 ? argv[1] : NULL, &err);
    if (!res) {
        return cli_fail("ls", err);
    }
    if (c.json) {
        cli_print_json(res);
    } else {
        print_human(res);
    }
    /* As ls(1): what can be read is listed, each name that cannot is
     * said, and the status says the listing is not whole. */
    errors = json_object_get(res, "errors");
    json_array_foreach(errors, i, e)
    {
        g_autofree char *line = files_name_printable(
            json_string_value(e), strlen(json_string_value(e)));
        fprintf(stderr, "qbak ls: %s\n", line);
    }
    ret = json_array_size(errors) ? 1 : 0;
    json_decref(res);
    return ret;
}

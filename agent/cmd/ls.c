/* qbak ls: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
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
    struct files_opts o = {0};
    g_autofree gchar *repo = NULL, *vm = NULL, *point = NULL, *disk = NULL,
                     *fs = NULL;
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res;
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
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when a prune holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("ls", "List a directory of a restore point.", "[PATH]", entries,
              &argc, &argv);
    cli_require("ls", repo, "--repo");
    cli_require("ls", vm, "--vm");
    if (argc > 2) {
        cli_usage_error("ls", "one PATH at most");
    }
    o.repo = repo;
    o.vm = vm;
    o.point = point;
    o.disk = disk;
    o.fs = fs;
    o.wait_ms = cli_wait_ms("ls", wait);
    res = files_ls(&o, argc > 1 ? argv[1] : NULL, &err);
    if (!res) {
        return cli_fail("ls", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_human(res);
    }
    json_decref(res);
    return 0;
}

/* qbak restore: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/restore.h"
#include "agent/vm/restore_vm.h"

static void
print_start_human(json_t *res, bool dry_run)
{
    size_t i;
    json_t *d;

    if (dry_run) {
        json_array_foreach(json_object_get(res, "command"), i, d)
        {
            g_autofree char *q = g_shell_quote(json_string_value(d));
            printf("%s%s", i ? " " : "", q);
        }
        putchar('\n');
        return;
    }
    printf("%s: point %s running as pid %" JSON_INTEGER_FORMAT " (%s)\n",
           json_string_value(json_object_get(res, "vm")),
           json_string_value(json_object_get(res, "point")),
           json_integer_value(json_object_get(res, "pid")),
           json_is_true(json_object_get(res, "memory"))
               ? "resumed from its memory state"
               : "booted from its disks");
    printf("  qmp  %s\n", json_string_value(json_object_get(res, "qmp")));
    if (json_is_string(json_object_get(res, "qga"))) {
        printf("  qga  %s\n", json_string_value(json_object_get(res, "qga")));
    }
    json_array_foreach(json_object_get(res, "disks"), i, d)
    {
        printf("  %-12s %s%s\n", json_string_value(json_object_get(d, "disk")),
               json_string_value(json_object_get(d, "file")),
               json_is_true(json_object_get(res, "live"))
                   ? " (streaming from the repository)"
                   : "");
    }
}

static int
restore_start(const char *repo, const char *vm, const char *point,
              const char *to, gboolean live, gboolean cold, gboolean dry_run,
              gboolean json, int wait)
{
    struct restore_vm_opts o = {.repo = repo,
                                .vm = vm,
                                .point = point,
                                .dir = to,
                                .live = live,
                                .cold = cold,
                                .dry_run = dry_run,
                                .timeout_ms = 60000};
    GError *err = NULL;
    json_t *res;

    o.wait_ms = cli_wait_ms("restore", wait);
    res = restore_vm_run(&o, &err);
    if (!res) {
        return cli_fail("restore", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_start_human(res, dry_run);
    }
    json_decref(res);
    return 0;
}

int
cmd_restore(int argc, char **argv)
{
    g_autofree gchar *to = NULL;
    gboolean start = FALSE, live = FALSE, cold = FALSE, dry_run = FALSE;
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
        CLI_OPT_REPO(repo),
        CLI_OPT_VM(vm, "VM name"),
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk, "disk to restore", "NAME"},
        CLI_OPT_POINT(point, "restore point id (default: the newest)"),
        {"output", 0, 0, G_OPTION_ARG_FILENAME, &output, "image to write",
         "FILE"},
        {"format", 0, 0, G_OPTION_ARG_STRING, &format,
         "raw (sparse, default) or qcow2", "FMT"},
        {"force", 0, 0, G_OPTION_ARG_NONE, &force,
         "overwrite an existing output", NULL},
        {"no-verify", 0, 0, G_OPTION_ARG_NONE, &no_verify,
         "do not check the data read against its checksums", NULL},
        CLI_OPT_WAIT(wait),
        {"start", 0, 0, G_OPTION_ARG_NONE, &start,
         "start the whole VM from the point: its disks restored, its "
         "command line rebuilt, its memory loaded when the point holds it",
         NULL},
        {"to", 0, 0, G_OPTION_ARG_FILENAME, &to,
         "with --start: directory for the disks and sockets (default "
         "./VM-POINT)",
         "DIR"},
        {"live", 0, 0, G_OPTION_ARG_NONE, &live,
         "with --start: run at once on thin overlays over the backup while "
         "QEMU copies the rest into them",
         NULL},
        {"cold", 0, 0, G_OPTION_ARG_NONE, &cold,
         "with --start: boot from the disks, ignoring a memory state", NULL},
        {"dry-run", 0, 0, G_OPTION_ARG_NONE, &dry_run,
         "with --start: print the command line, start nothing", NULL},
        CLI_OPT_JSON(json),
        {NULL}};

    cli_parse("restore",
              "Write one disk at one restore point as an image, or start "
              "the whole VM from it (--start).",
              NULL, entries, &argc, &argv);
    cli_require("restore", repo, "--repo");
    cli_require("restore", vm, "--vm");
    if (start) {
        if (disk || output || format || force) {
            cli_usage_error("restore", "--start restores every disk: no "
                                       "--disk, --output, --format, --force");
        }
        return restore_start(repo, vm, point, to, live, cold, dry_run, json,
                             wait);
    }
    if (to || live || cold || dry_run) {
        cli_usage_error("restore", "--to, --live, --cold and --dry-run go "
                                   "with --start");
    }
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

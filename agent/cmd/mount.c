/* qbak mount and qbak umount: options and output. */
#include <stdio.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/cmd/files_cli.h"
#include "agent/files/files.h"

int
cmd_mount(int argc, char **argv)
{
    struct files_cli c FILES_CLI_AUTO = {0};
    struct files_opts o;
    gboolean allow_other = FALSE;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        FILES_CLI_ONE_POINT(c),
        {"allow-other", 0, 0, G_OPTION_ARG_NONE, &allow_other,
         "let other users enter the mount (FUSE allow_other)", NULL},
        CLI_OPT_WAIT(c.wait),
        CLI_OPT_JSON(c.json),
        {NULL}};

    cli_parse("mount",
              "Show a restore point as a read-only directory (served in the "
              "background until qbak umount).",
              "MOUNTPOINT", entries, &argc, &argv);
    files_cli_opts("mount", &c, &o);
    if (argc != 2) {
        cli_usage_error("mount", "one MOUNTPOINT is required");
    }
    res = files_mount_point(&o, argv[1], allow_other, &err);
    if (!res) {
        return cli_fail("mount", err);
    }
    if (c.json) {
        cli_print_json(res);
    } else {
        printf("%s: %s %s fs %s mounted read-only on %s (qbak umount %s "
               "ends it)\n",
               c.vm, json_string_value(json_object_get(res, "point")),
               json_string_value(json_object_get(res, "disk")),
               json_string_value(json_object_get(res, "fs")),
               json_string_value(json_object_get(res, "mountpoint")),
               json_string_value(json_object_get(res, "mountpoint")));
    }
    json_decref(res);
    return 0;
}

int
cmd_umount(int argc, char **argv)
{
    gboolean json = FALSE;
    gint wait = 0;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "wait up to SECS (default and at least 120) for the serving "
         "process to end",
         "SECS"},
        CLI_OPT_JSON(json),
        {NULL}};

    cli_parse("umount",
              "Unmount a qbak mount and wait for its serving process to end.",
              "MOUNTPOINT", entries, &argc, &argv);
    if (argc != 2) {
        cli_usage_error("umount", "one MOUNTPOINT is required");
    }
    res = files_umount_point(argv[1], cli_wait_ms("umount", wait), &err);
    if (!res) {
        return cli_fail("umount", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        printf("%s unmounted\n",
               json_string_value(json_object_get(res, "mountpoint")));
    }
    json_decref(res);
    return 0;
}

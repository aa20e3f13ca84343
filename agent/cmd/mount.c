/* qbak mount and qbak umount: options and output. */
#include <stdio.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/files/files.h"

int
cmd_mount(int argc, char **argv)
{
    struct files_opts o = {0};
    g_autofree gchar *repo = NULL, *vm = NULL, *point = NULL, *disk = NULL,
                     *fs = NULL;
    gboolean json = FALSE, allow_other = FALSE;
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
        {"allow-other", 0, 0, G_OPTION_ARG_NONE, &allow_other,
         "let other users enter the mount (FUSE allow_other)", NULL},
        {"wait", 0, 0, G_OPTION_ARG_INT, &wait,
         "when a prune holds this VM's lock, wait up to SECS for it "
         "(default 0: fail at once with exit status 75)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    cli_parse("mount",
              "Show a restore point as a read-only directory (served in the "
              "background until qbak umount).",
              "MOUNTPOINT", entries, &argc, &argv);
    cli_require("mount", repo, "--repo");
    cli_require("mount", vm, "--vm");
    if (argc != 2) {
        cli_usage_error("mount", "one MOUNTPOINT is required");
    }
    o.repo = repo;
    o.vm = vm;
    o.point = point;
    o.disk = disk;
    o.fs = fs;
    o.wait_ms = cli_wait_ms("mount", wait);
    res = files_mount_point(&o, argv[1], allow_other, &err);
    if (!res) {
        return cli_fail("mount", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        printf("%s: %s %s fs %s mounted read-only on %s (qbak umount %s "
               "ends it)\n",
               vm, json_string_value(json_object_get(res, "point")),
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
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
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

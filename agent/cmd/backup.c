/* qbak backup: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/backup.h"
#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/host/config.h"
#include "io/qcow2.h"
#include "qmp/parser.h"

static void
print_backup_human(json_t *res)
{
    size_t i;
    json_t *d, *w;

    json_t *fr = json_object_get(res, "freeze");
    json_t *mem = json_object_get(res, "memory");

    printf("%s: point %s (%.2f s), %s-consistent",
           json_string_value(json_object_get(res, "vm")),
           json_string_value(json_object_get(res, "point")),
           json_real_value(json_object_get(res, "duration_s")),
           json_string_value(json_object_get(res, "consistency")));
    if (json_is_real(json_object_get(fr, "window_ms"))) {
        printf(" (%d file systems frozen for %.1f ms)",
               (int)json_integer_value(json_object_get(fr, "filesystems")),
               json_real_value(json_object_get(fr, "window_ms")));
    }
    putchar('\n');
    if (json_is_object(mem)) {
        printf("  memory       %.1f MiB state, guest paused %.1f ms, captured "
               "in %.2f s\n",
               (double)json_integer_value(json_object_get(mem, "bytes")) /
                   1048576.0,
               json_real_value(json_object_get(mem, "downtime_ms")),
               json_real_value(json_object_get(mem, "capture_s")));
    }
    json_array_foreach(json_object_get(res, "disks"), i, d)
    {
        const char *reason = json_string_value(json_object_get(d, "reason"));
        printf("  %-12s %-11s %10.1f MiB written of %.1f MiB%s%s\n",
               json_string_value(json_object_get(d, "disk")),
               json_string_value(json_object_get(d, "type")),
               (double)json_integer_value(json_object_get(d, "bytes_written")) /
                   1048576.0,
               (double)json_integer_value(json_object_get(d, "virtual_size")) /
                   1048576.0,
               reason ? ": " : "", reason ? reason : "");
    }
    json_array_foreach(json_object_get(res, "recovered"), i, w)
    {
        g_autofree char *msg = qmp_parser_printable(json_string_value(w));
        fprintf(stderr, "qbak backup: recovered: %s\n", msg);
    }
    json_array_foreach(json_object_get(res, "warnings"), i, w)
    {
        g_autofree char *msg = qmp_parser_printable(json_string_value(w));
        fprintf(stderr, "qbak backup: warning: %s\n", msg);
    }
}

static enum vmstate_mode memory_mode = VMSTATE_OFF;

/* --memory takes an optional value, which GOption only offers through a
 * callback. */
static gboolean
parse_memory(const gchar *name, const gchar *value, gpointer data,
             GError **error)
{
    if (!value || strcmp(value, "on") == 0) {
        memory_mode = VMSTATE_ON;
    } else if (strcmp(value, "try") == 0) {
        memory_mode = VMSTATE_TRY;
    } else if (strcmp(value, "off") == 0) {
        memory_mode = VMSTATE_OFF;
    } else {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--memory must be on, try or off");
        return FALSE;
    }
    return TRUE;
}

int
cmd_backup(int argc, char **argv)
{
    struct backup_opts o = {.cluster_bits = QCOW2_DEFAULT_CLUSTER_BITS,
                            .timeout_ms = 60000};
    g_autofree gchar *qmp = NULL;
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    g_auto(GStrv) disks = NULL;
    gboolean full = FALSE, json = FALSE, verbose = FALSE;
    g_autofree gchar *speed = NULL;
    gint64 speed_bytes = 0;
    gint timeout = 60;
    gint stall = 30;
    g_autofree gchar *qga = NULL;
    g_autofree gchar *quiesce = NULL;
    g_autofree gchar *mode = NULL;
    g_autofree gchar *scratch = NULL;
    g_autofree gchar *scratch_max = NULL;
    int64_t scratch_bytes = 0;
    gint wait = 0;
    gint nice_v = 19;
    gint progress_fd = -1;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"qmp", 0, 0, G_OPTION_ARG_FILENAME, &qmp,
         "QMP monitor socket of the VM", "PATH"},
        CLI_OPT_REPO(repo),
        CLI_OPT_VM(vm, "VM name in the repository"),
        {"qga", 0, 0, G_OPTION_ARG_FILENAME, &qga,
         "guest agent socket: freeze the guest's file systems at the point",
         "PATH"},
        {"quiesce", 0, 0, G_OPTION_ARG_STRING, &quiesce,
         "auto (default with --qga): freeze if the agent answers, else "
         "crash-consistent; require: fail if the freeze fails; off",
         "MODE"},
        {"disk", 0, 0, G_OPTION_ARG_STRING_ARRAY, &disks,
         "back up only this disk (device id or node name); repeatable", "NAME"},
        {"full", 0, 0, G_OPTION_ARG_NONE, &full,
         "start a new chain with a full backup", NULL},
        {"speed", 0, 0, G_OPTION_ARG_STRING, &speed,
         "limit each disk's copy to SIZE per second (K, M, G, T: binary "
         "units)",
         "SIZE"},
        {"timeout", 0, 0, G_OPTION_ARG_INT, &timeout,
         "seconds to wait for any one answer from QEMU (default 60)", "SECS"},
        {"stall-timeout", 0, 0, G_OPTION_ARG_INT, &stall,
         "fail the backup, rather than hold up guest writes, when a write "
         "to the repository takes longer (default 30)",
         "SECS"},
        CLI_OPT_WAIT(wait),
        {"memory", 0, G_OPTION_FLAG_OPTIONAL_ARG, G_OPTION_ARG_CALLBACK,
         (gpointer)parse_memory,
         "also capture the guest's memory and device state at the disks' "
         "point in time (on); try: if that fails, commit the disks alone "
         "and say so; off (default)",
         "on|try|off"},
        {"mode", 0, 0, G_OPTION_ARG_STRING, &mode,
         "auto (default): pull on QEMU 7.1 or later without --memory and "
         "with QEMU's NBD server free, else push; push: QEMU's backup job "
         "sends the point to qbak; pull: QEMU keeps the point in scratch, "
         "qbak reads it",
         "MODE"},
        {"scratch", 0, 0, G_OPTION_ARG_FILENAME, &scratch,
         "pull mode: directory for QEMU's copies of data the guest "
         "overwrites during the backup (default /var/tmp)",
         "DIR"},
        {"scratch-max", 0, 0, G_OPTION_ARG_STRING, &scratch_max,
         "pull mode: at most SIZE bytes of scratch (K, M, G, T suffixes); "
         "past it the backup fails, the guest goes on",
         "SIZE"},
        {"nice", 0, 0, G_OPTION_ARG_INT, &nice_v,
         "pull mode: copy at this CPU nice value, 0 to 19 (default 19): "
         "the guest's vCPUs and QEMU's I/O go first; 0: as started",
         "N"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json,
         "print the result as one JSON object", NULL},
        {"verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose,
         "print each phase and its time on stderr", NULL},
        /* qbak run's: progress as lines on this fd (progress.h). */
        {"progress-fd", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT, &progress_fd,
         NULL, NULL},
        {NULL}};

    cli_parse("backup", "Back up a running VM's disks at one point in time.",
              NULL, entries, &argc, &argv);
    cli_require("backup", qmp, "--qmp");
    cli_require("backup", repo, "--repo");
    cli_require("backup", vm, "--vm");
    if (speed && !host_parse_size(speed, &speed_bytes)) {
        fprintf(stderr, "qbak backup: --speed must be a size per second, "
                        "such as 67108864 or 64M\n");
        return QBAK_EXIT_USAGE;
    }
    if (timeout < 1 || timeout > 86400) {
        fprintf(stderr, "qbak backup: --timeout must be 1 to 86400 seconds\n");
        return QBAK_EXIT_USAGE;
    }
    o.timeout_ms = timeout * 1000;
    if (stall < 1 || stall > 86400) {
        fprintf(stderr,
                "qbak backup: --stall-timeout must be 1 to 86400 seconds\n");
        return QBAK_EXIT_USAGE;
    }
    o.stall_ms = stall * 1000;
    o.qga_path = qga;
    o.quiesce = QUIESCE_AUTO;
    if (quiesce && strcmp(quiesce, "require") == 0) {
        o.quiesce = QUIESCE_REQUIRE;
    } else if (quiesce && strcmp(quiesce, "off") == 0) {
        o.quiesce = QUIESCE_OFF;
    } else if (quiesce && strcmp(quiesce, "auto") != 0) {
        fprintf(stderr,
                "qbak backup: --quiesce must be auto, require or off\n");
        return QBAK_EXIT_USAGE;
    }
    if (o.quiesce == QUIESCE_REQUIRE && !qga) {
        fprintf(stderr, "qbak backup: --quiesce require needs --qga\n");
        return QBAK_EXIT_USAGE;
    }
    /* Auto is the default: pull where it is safe (QEMU 7.1+, no
     * --memory, QEMU's NBD server free; agent/backup_mode.c), as it holds
     * guest writes least; else push. */
    o.mode = BACKUP_MODE_AUTO;
    if (mode && strcmp(mode, "pull") == 0) {
        o.mode = BACKUP_MODE_PULL;
    } else if (mode && strcmp(mode, "push") == 0) {
        o.mode = BACKUP_MODE_PUSH;
    } else if (mode && strcmp(mode, "auto") != 0) {
        fprintf(stderr, "qbak backup: --mode must be auto, push or pull\n");
        return QBAK_EXIT_USAGE;
    }
    if (o.mode == BACKUP_MODE_PULL && memory_mode != VMSTATE_OFF) {
        fprintf(stderr, "qbak backup: --memory needs --mode push or auto\n");
        return QBAK_EXIT_USAGE;
    }
    o.scratch_dir = scratch ? scratch : "/var/tmp";
    if (scratch_max && (!host_parse_size(scratch_max, &scratch_bytes) ||
                        scratch_bytes < (1 << 20))) {
        fprintf(stderr, "qbak backup: --scratch-max must be a size of at "
                        "least 1M\n");
        return QBAK_EXIT_USAGE;
    }
    o.scratch_max = (uint64_t)scratch_bytes;
    if (nice_v < 0 || nice_v > 19) {
        fprintf(stderr, "qbak backup: --nice must be 0 to 19\n");
        return QBAK_EXIT_USAGE;
    }
    o.nice = nice_v;
    o.qmp_path = qmp;
    o.repo = repo;
    o.vm = vm;
    o.disks = disks;
    o.full = full;
    o.speed = (uint64_t)speed_bytes;
    o.wait_ms = cli_wait_ms("backup", wait);
    o.progress = cli_progress_wanted(json);
    o.progress_fd = progress_fd > 0 ? progress_fd : 0;
    o.verbose = verbose;
    o.memory = memory_mode;
    res = backup_run(&o, &err);
    if (!res) {
        return cli_fail("backup", err);
    }
    if (json) {
        cli_print_json(res);
    } else {
        print_backup_human(res);
    }
    json_decref(res);
    return 0;
}

/* qbak: back up running QEMU VMs into plain qcow2 chains. */
#include <errno.h>
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>
#include <jansson.h>

#include "agent/backup.h"
#include "agent/list.h"
#include "agent/restore.h"
#include "io/qcow2.h"
#include "qmp/parser.h"

#define EXIT_USAGE 2

static const char *usage_text =
    "usage: qbak COMMAND [OPTIONS]\n"
    "\n"
    "commands:\n"
    "  backup   back up a running VM's disks into a repository\n"
    "  list     list committed restore points\n"
    "  restore  write one disk at one point as a standalone image\n"
    "\n"
    "qbak COMMAND --help shows the options of a command; man qbak tells "
    "more.\n";

static void
print_json(json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    puts(s);
    free(s);
}

/* Messages carry text from QEMU, the guest agent and the repository: one
 * printable line, whatever those sent. */
static int
fail(const char *cmd, GError *err)
{
    g_autofree char *msg = qmp_parser_printable(err->message);

    fprintf(stderr, "qbak %s: %s\n", cmd, msg);
    g_error_free(err);
    return 1;
}

/* Parses argv with the given entries; exits with a usage error. */
static void
parse(const char *cmd, const char *summary, GOptionEntry *entries, int *argc,
      char ***argv)
{
    g_autoptr(GOptionContext) ctx = g_option_context_new(NULL);
    g_autoptr(GError) err = NULL;
    g_autofree char *prog = g_strdup_printf("qbak %s", cmd);

    g_set_prgname(prog);
    g_option_context_set_summary(ctx, summary);
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, argc, argv, &err)) {
        fprintf(stderr, "qbak %s: %s\n", cmd, err->message);
        exit(EXIT_USAGE);
    }
    if (*argc > 1) {
        fprintf(stderr, "qbak %s: unexpected argument '%s'\n", cmd, (*argv)[1]);
        exit(EXIT_USAGE);
    }
}

static void
require(const char *cmd, const char *value, const char *option)
{
    if (!value) {
        fprintf(stderr, "qbak %s: %s is required (see qbak %s --help)\n", cmd,
                option, cmd);
        exit(EXIT_USAGE);
    }
}

static void
print_backup_human(json_t *res)
{
    size_t i;
    json_t *d, *w;

    json_t *fr = json_object_get(res, "freeze");

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

static int
cmd_backup(int argc, char **argv)
{
    struct backup_opts o = {.cluster_bits = QCOW2_DEFAULT_CLUSTER_BITS,
                            .timeout_ms = 60000};
    g_autofree gchar *qmp = NULL;
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    g_auto(GStrv) disks = NULL;
    gboolean full = FALSE, json = FALSE, verbose = FALSE;
    gint64 speed = 0;
    gint timeout = 60;
    gint stall = 30;
    g_autofree gchar *qga = NULL;
    g_autofree gchar *quiesce = NULL;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"qmp", 0, 0, G_OPTION_ARG_FILENAME, &qmp,
         "QMP monitor socket of the VM", "PATH"},
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name in the repository",
         "NAME"},
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
        {"speed", 0, 0, G_OPTION_ARG_INT64, &speed,
         "limit each disk's job to BYTES per second", "BYTES"},
        {"timeout", 0, 0, G_OPTION_ARG_INT, &timeout,
         "seconds to wait for any one answer from QEMU (default 60)", "SECS"},
        {"stall-timeout", 0, 0, G_OPTION_ARG_INT, &stall,
         "fail the backup, rather than hold up guest writes, when a write "
         "to the repository takes longer (default 30)",
         "SECS"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json,
         "print the result as one JSON object", NULL},
        {"verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose,
         "print each phase and its time on stderr", NULL},
        {NULL}};

    parse("backup", "Back up a running VM's disks at one point in time.",
          entries, &argc, &argv);
    require("backup", qmp, "--qmp");
    require("backup", repo, "--repo");
    require("backup", vm, "--vm");
    if (speed < 0) {
        fprintf(stderr, "qbak backup: --speed must not be negative\n");
        return EXIT_USAGE;
    }
    if (timeout < 1 || timeout > 86400) {
        fprintf(stderr, "qbak backup: --timeout must be 1 to 86400 seconds\n");
        return EXIT_USAGE;
    }
    o.timeout_ms = timeout * 1000;
    if (stall < 1 || stall > 86400) {
        fprintf(stderr,
                "qbak backup: --stall-timeout must be 1 to 86400 seconds\n");
        return EXIT_USAGE;
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
        return EXIT_USAGE;
    }
    if (o.quiesce == QUIESCE_REQUIRE && !qga) {
        fprintf(stderr, "qbak backup: --quiesce require needs --qga\n");
        return EXIT_USAGE;
    }
    o.qmp_path = qmp;
    o.repo = repo;
    o.vm = vm;
    o.disks = disks;
    o.full = full;
    o.speed = (uint64_t)speed;
    o.progress = !json && isatty(STDERR_FILENO);
    o.verbose = verbose;
    res = backup_run(&o, &err);
    if (!res) {
        return fail("backup", err);
    }
    if (json) {
        print_json(res);
    } else {
        print_backup_human(res);
    }
    json_decref(res);
    return 0;
}

static int
cmd_list(int argc, char **argv)
{
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    gboolean json = FALSE;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "only this VM", "NAME"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    parse("list", "List committed restore points, oldest first.", entries,
          &argc, &argv);
    require("list", repo, "--repo");
    res = list_run(repo, vm, &err);
    if (!res) {
        return fail("list", err);
    }
    if (json) {
        print_json(res);
    } else {
        list_print_human(res);
    }
    json_decref(res);
    return 0;
}

static int
cmd_restore(int argc, char **argv)
{
    struct restore_opts o = {0};
    g_autofree gchar *repo = NULL;
    g_autofree gchar *vm = NULL;
    g_autofree gchar *disk = NULL;
    g_autofree gchar *point = NULL;
    g_autofree gchar *output = NULL;
    g_autofree gchar *format = NULL;
    gboolean force = FALSE, json = FALSE;
    GError *err = NULL;
    json_t *res;
    GOptionEntry entries[] = {
        {"repo", 0, 0, G_OPTION_ARG_FILENAME, &repo, "repository directory",
         "DIR"},
        {"vm", 0, 0, G_OPTION_ARG_STRING, &vm, "VM name", "NAME"},
        {"disk", 0, 0, G_OPTION_ARG_STRING, &disk, "disk to restore", "NAME"},
        {"point", 0, 0, G_OPTION_ARG_STRING, &point,
         "restore point id (default: the newest)", "ID"},
        {"output", 0, 0, G_OPTION_ARG_FILENAME, &output, "image to write",
         "FILE"},
        {"format", 0, 0, G_OPTION_ARG_STRING, &format,
         "raw (sparse, default) or qcow2", "FMT"},
        {"force", 0, 0, G_OPTION_ARG_NONE, &force,
         "overwrite an existing output", NULL},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print JSON", NULL},
        {NULL}};

    parse("restore", "Write one disk at one restore point as an image.",
          entries, &argc, &argv);
    require("restore", repo, "--repo");
    require("restore", vm, "--vm");
    require("restore", disk, "--disk");
    require("restore", output, "--output");
    if (format && strcmp(format, "raw") && strcmp(format, "qcow2")) {
        fprintf(stderr, "qbak restore: --format must be raw or qcow2\n");
        return EXIT_USAGE;
    }
    o.repo = repo;
    o.vm = vm;
    o.disk = disk;
    o.point = point;
    o.output = output;
    o.qcow2 = format && strcmp(format, "qcow2") == 0;
    o.force = force;
    o.progress = !json && isatty(STDERR_FILENO);
    res = restore_run(&o, &err);
    if (!res) {
        return fail("restore", err);
    }
    if (json) {
        print_json(res);
    } else {
        printf("%s: %s at %s restored to %s (%s, %.2f s)\n", vm, disk,
               json_string_value(json_object_get(res, "point")), output,
               o.qcow2 ? "qcow2" : "raw",
               json_real_value(json_object_get(res, "duration_s")));
    }
    json_decref(res);
    return 0;
}

static void
on_signal(int sig)
{
    backup_interrupted = sig;
}

int
main(int argc, char **argv)
{
    struct sigaction sa = {.sa_handler = on_signal};

    setlocale(LC_ALL, "");
    /* A backup stops cleanly: jobs cancelled, guest thawed, partial
     * files removed.  Inside the freeze window these are held off. */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : 0;
    }
    if (strcmp(argv[1], "backup") == 0) {
        return cmd_backup(argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "list") == 0) {
        return cmd_list(argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "restore") == 0) {
        return cmd_restore(argc - 1, argv + 1);
    }
    fprintf(stderr, "qbak: unknown command '%s'\n%s", argv[1], usage_text);
    return EXIT_USAGE;
}

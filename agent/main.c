/* qbak: back up running QEMU VMs into plain qcow2 chains. */
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "agent/backup.h"
#include "agent/cli.h"
#include "agent/cmd/cmd.h"

#ifndef QBAK_VERSION
#define QBAK_VERSION "unknown"
#endif

static const struct cli_command commands[] = {
    {"backup", cmd_backup, "back up a running VM's disks into a repository"},
    {"restore", cmd_restore, "write one disk at one point as an image"},
    {"list", cmd_list, "list committed restore points"},
    {"verify", cmd_verify, "check every stored cluster against its checksums"},
    {"prune", cmd_prune,
     "keep what a retention policy selects, remove the "
     "rest"},
    {"protect", cmd_protect, "protect a restore point from prune"},
    {"unprotect", cmd_unprotect, "let prune remove a restore point again"},
    {"ls", cmd_ls, "list a directory of a restore point"},
    {"find", cmd_find, "find files across restore points"},
    {"get", cmd_get, "copy files out of a restore point"},
    {"mount", cmd_mount, "show a restore point as a read-only directory"},
    {"umount", cmd_umount, "end a qbak mount"},
    {"index", cmd_index, "write the file catalogs of restore points"},
    {"run", cmd_run, "back up (and prune) every VM of the host that is due"},
    {"status", cmd_status, "each VM's newest point against its RPO"},
    {"config", cmd_config, "check the host's configuration file"},
};

static void
usage(FILE *f)
{
    fputs("usage: qbak COMMAND [OPTIONS]\n\ncommands:\n", f);
    for (size_t i = 0; i < G_N_ELEMENTS(commands); i++) {
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    }
    fputs("\nqbak COMMAND --help shows the options of a command; "
          "man qbak-COMMAND tells more.\n",
          f);
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
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? QBAK_EXIT_USAGE : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("qbak %s\n", QBAK_VERSION);
        return 0;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(commands); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            return commands[i].main_fn(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "qbak: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return QBAK_EXIT_USAGE;
}

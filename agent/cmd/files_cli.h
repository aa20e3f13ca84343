/* The options qbak ls, find, get, mount and index share, and how they
 * become the struct files_opts the engine takes. */
#ifndef QBAK_AGENT_CMD_FILES_CLI_H
#define QBAK_AGENT_CMD_FILES_CLI_H

#include <glib.h>

#include "agent/cli.h"
#include "agent/files/files.h"

struct files_cli {
    gchar *repo, *vm, *point, *points, *disk, *fs;
    gboolean json;
    gint wait;
};

/* Frees what option parsing stored; for __attribute__((cleanup)). */
void files_cli_clear(struct files_cli *c);
#define FILES_CLI_AUTO __attribute__((cleanup(files_cli_clear)))

/* --repo, --vm, --point, --disk and --fs: the options of the commands that
 * read one point (ls, get, mount). */
#define FILES_CLI_ONE_POINT(c)                                                 \
    CLI_OPT_REPO((c).repo), CLI_OPT_VM((c).vm, "VM name"),                     \
        CLI_OPT_POINT((c).point, "restore point id (default: the newest)"),    \
        FILES_CLI_DISK(c, "disk (default: the VM's only disk)"),               \
        FILES_CLI_FS(c, "file system: partition number, VG/LV, disk or os "    \
                        "(default: the only one, or the guest's view of an "   \
                        "OS disk)")
#define FILES_CLI_DISK(c, help)                                                \
    {                                                                          \
        "disk", 0, 0, G_OPTION_ARG_STRING, &(c).disk, (help), "NAME"           \
    }
#define FILES_CLI_FS(c, help)                                                  \
    {                                                                          \
        "fs", 0, 0, G_OPTION_ARG_STRING, &(c).fs, (help), "FS"                 \
    }
#define FILES_CLI_POINTS(c, help)                                              \
    {                                                                          \
        "points", 0, 0, G_OPTION_ARG_STRING, &(c).points, (help), "SPEC"       \
    }

/* Checks --repo and --vm are there (a usage error otherwise) and fills o
 * with pointers into c. */
void files_cli_opts(const char *cmd, const struct files_cli *c,
                    struct files_opts *o);

#endif

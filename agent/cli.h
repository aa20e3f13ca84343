/* What every qbak command shares on its way in (option parsing) and out
 * (JSON, one-line errors, exit statuses).
 *
 * Exit statuses, the same for every command (the man page lists them):
 *   0  success
 *   1  the command failed (one line on stderr says why)
 *   2  usage error: a bad option or argument, nothing was done
 *  75  busy: another qbak holds this VM's lock; try again later (or --wait)
 */
#ifndef QBAK_AGENT_CLI_H
#define QBAK_AGENT_CLI_H

#include <glib.h>
#include <jansson.h>

#include "agent/error.h"

#define QBAK_EXIT_FAILED 1
#define QBAK_EXIT_USAGE 2
#define QBAK_EXIT_BUSY 75 /* EX_TEMPFAIL */

/* The exit status for an error (see above). */
int cli_exit_status(const GError *err);

/* Parses argv with entries.  Options only, unless positional is non-NULL:
 * then the remaining arguments (argv[1..]) are left in argc and argv for the
 * caller and positional names them in --help ("PATH..."). Exits with
 * QBAK_EXIT_USAGE on a parse error. */
void cli_parse(const char *cmd, const char *summary, const char *positional,
               GOptionEntry *entries, int *argc, char ***argv);

/* Exits with a usage error when value is NULL. */
void cli_require(const char *cmd, const void *value, const char *option);

/* Prints "qbak CMD: MESSAGE" on stderr, one line (message made printable),
 * and exits with a usage error. */
G_GNUC_NORETURN G_GNUC_PRINTF(2, 3) void cli_usage_error(const char *cmd,
                                                         const char *fmt, ...);

/* Prints err as "qbak CMD: MESSAGE" (one printable line), frees it, and
 * returns its exit status. */
int cli_fail(const char *cmd, GError *err);

/* --wait SECS as milliseconds; exits with a usage error when out of range
 * (0 to 86400). */
int cli_wait_ms(const char *cmd, int secs);

/* Prints j (borrowed) indented, in insertion order, with a newline. */
void cli_print_json(json_t *j);

/* Whether progress lines belong on stderr: a terminal, and no --json. */
gboolean cli_progress_wanted(gboolean json);

/* GOptionEntry initialisers for the options most commands share, so that
 * each reads and helps the same way everywhere.  var is the variable the
 * option sets; a command whose --vm means something else ("only this VM")
 * passes its own help. */
#define CLI_OPT_REPO(var)                                                      \
    {                                                                          \
        "repo", 0, 0, G_OPTION_ARG_FILENAME, &(var), "repository directory",   \
            "DIR"                                                              \
    }
#define CLI_OPT_VM(var, help)                                                  \
    {                                                                          \
        "vm", 0, 0, G_OPTION_ARG_STRING, &(var), (help), "NAME"                \
    }
#define CLI_OPT_POINT(var, help)                                               \
    {                                                                          \
        "point", 0, 0, G_OPTION_ARG_STRING, &(var), (help), "ID"               \
    }
#define CLI_OPT_WAIT(var)                                                      \
    {                                                                          \
        "wait", 0, 0, G_OPTION_ARG_INT, &(var),                                \
            "when another qbak holds this VM's lock, wait up to SECS for it "  \
            "(default 0: fail at once with exit status 75)",                   \
            "SECS"                                                             \
    }
#define CLI_OPT_JSON(var)                                                      \
    {                                                                          \
        "json", 0, 0, G_OPTION_ARG_NONE, &(var), "print JSON", NULL            \
    }

/* One entry per command: main() dispatches through this table. */
struct cli_command {
    const char *name;
    int (*main_fn)(int argc, char **argv);
    const char *summary;
};

#endif

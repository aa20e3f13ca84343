/* qbak's command-line conventions: see cli.h. */
#include "agent/cli.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "qmp/parser.h"

int
cli_exit_status(const GError *err)
{
    if (err->domain != QBAK_ERROR) {
        return QBAK_EXIT_FAILED;
    }
    switch ((enum qbak_error)err->code) {
    case QBAK_ERROR_BUSY:
        return QBAK_EXIT_BUSY;
    default:
        return QBAK_EXIT_FAILED;
    }
}

void
cli_parse(const char *cmd, const char *summary, const char *positional,
          GOptionEntry *entries, int *argc, char ***argv)
{
    g_autoptr(GOptionContext) ctx = g_option_context_new(positional);
    g_autoptr(GError) err = NULL;
    g_autofree char *prog = g_strdup_printf("qbak %s", cmd);

    g_set_prgname(prog);
    g_option_context_set_summary(ctx, summary);
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, argc, argv, &err)) {
        cli_usage_error(cmd, "%s", err->message);
    }
    if (!positional && *argc > 1) {
        cli_usage_error(cmd, "unexpected argument '%s'", (*argv)[1]);
    }
}

void
cli_require(const char *cmd, const void *value, const char *option)
{
    if (!value) {
        cli_usage_error(cmd, "%s is required (see qbak %s --help)", option,
                        cmd);
    }
}

void
cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    char *msg, *line;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    line = qmp_parser_printable(msg);
    fprintf(stderr, "qbak %s: %s\n", cmd, line);
    /* exit() runs no g_autofree: freed by hand, or LeakSanitizer
     * reports every usage error. */
    g_free(line);
    g_free(msg);
    exit(QBAK_EXIT_USAGE);
}

/* Messages carry text from QEMU, the guest agent and the repository: one
 * printable line, whatever those sent. */
int
cli_fail(const char *cmd, GError *err)
{
    g_autofree char *msg = qmp_parser_printable(err->message);
    int status = cli_exit_status(err);

    fprintf(stderr, "qbak %s: %s\n", cmd, msg);
    g_error_free(err);
    return status;
}

int
cli_wait_ms(const char *cmd, int secs)
{
    if (secs < 0 || secs > 86400) {
        cli_usage_error(cmd, "--wait must be 0 to 86400 seconds");
    }
    return secs * 1000;
}

void
cli_print_json(json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);

    puts(s);
    free(s);
}

gboolean
cli_progress_wanted(gboolean json)
{
    return !json && isatty(STDERR_FILENO);
}

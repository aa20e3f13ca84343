/* The options the file-level commands share. */
#include "agent/cmd/files_cli.h"

void
files_cli_clear(struct files_cli *c)
{
    g_clear_pointer(&c->repo, g_free);
    g_clear_pointer(&c->vm, g_free);
    g_clear_pointer(&c->point, g_free);
    g_clear_pointer(&c->points, g_free);
    g_clear_pointer(&c->disk, g_free);
    g_clear_pointer(&c->fs, g_free);
}

void
files_cli_opts(const char *cmd, const struct files_cli *c, struct files_opts *o)
{
    cli_require(cmd, c->repo, "--repo");
    cli_require(cmd, c->vm, "--vm");
    *o = (struct files_opts){
        .repo = c->repo,
        .vm = c->vm,
        .point = c->point,
        .points = c->points,
        .disk = c->disk,
        .fs = c->fs,
        .wait_ms = cli_wait_ms(cmd, c->wait),
        .progress = cli_progress_wanted(c->json),
    };
}

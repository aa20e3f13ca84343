/* TEMPORARY, removed when io/'s merge, sums and per-layer reader land on
 * this branch: weak stand-ins so prune links meanwhile.  Every one fails
 * (or is a no-op for free), so no merge can happen through them. */
#include <errno.h>

#include "io/qcow2.h"
/* io/qcow2_sums.h's autoptr cleanup needs this typedef (C11 allows it
 * twice, should the header gain it). */
typedef struct qcow2_sums qcow2_sums;
#include "io/qcow2_sums.h"

__attribute__((weak)) struct qcow2_reader *
qcow2_reader_open_with_sums(int dirfd, const char *path, GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                "%s: merging is not available in this build", path);
    return NULL;
}

__attribute__((weak)) int
qcow2_reader_layer_fd(const struct qcow2_reader *r, unsigned depth)
{
    return -1;
}

__attribute__((weak)) bool
qcow2_merge_top(struct qcow2_reader *chain, int parent_fd,
                struct qcow2_sums **merged_sums,
                struct qcow2_merge_stats *stats,
                qcow2_merge_progress_fn *progress_fn, void *opaque,
                GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                "merging is not available in this build");
    return false;
}

__attribute__((weak)) bool
qcow2_sums_write(int dirfd, const char *name, const struct qcow2_sums *s,
                 GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                "%s: checksums are not available in this build", name);
    return false;
}

__attribute__((weak)) void
qcow2_sums_free(struct qcow2_sums *s)
{
}

/* libFuzzer target: a point's manifest.json (agent/manifest.h) on hostile
 * bytes.  Whatever parses as JSON goes through the schema check; one that
 * passes must give disks that each name a valid file and a sane cluster
 * size, found again by name. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/manifest.h"
#include "agent/repo.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t *j =
        json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, NULL);
    GError *err = NULL;
    struct manifest *m;

    if (!j) {
        return 0;
    }
    m = manifest_parse(j, NULL, NULL, &err);
    json_decref(j);
    if (!m) {
        if (!err) {
            abort();
        }
        g_error_free(err);
        return 0;
    }
    if (m->format < MANIFEST_FORMAT_MIN || m->format > MANIFEST_FORMAT ||
        m->n_disks == 0) {
        abort();
    }
    for (size_t i = 0; i < m->n_disks; i++) {
        const struct manifest_disk *d = &m->disks[i];
        if (!repo_name_valid(d->file, "file", NULL) || d->cluster_size < 512 ||
            (d->cluster_size & (d->cluster_size - 1)) ||
            manifest_disk(m, d->disk) != d || d->full != (d->backing == NULL)) {
            abort();
        }
    }
    manifest_free(m);
    return 0;
}

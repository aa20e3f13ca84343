/* libFuzzer target: the catalog parser (agent/files/catalog.c) on hostile
 * bytes: a catalog is a file in the repository, and repository files are
 * untrusted input.
 *
 * data[0] bit 0 picks whether the checksum is verified (mostly not, so
 * the parser behind it is reached).  Oracles: no crash, leak or
 * overlong loop; what decodes re-encodes into a catalog that decodes
 * (checksum verified) to the same file systems and entries; damaged input
 * fails with QBAK_ERROR_DAMAGED.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/error.h"
#include "agent/files/catalog.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool
same_fs(const struct files_fs *a, const struct files_fs *b)
{
    guint na = a->entries ? a->entries->len : 0;
    guint nb = b->entries ? b->entries->len : 0;

    if (strcmp(a->name, b->name) != 0 || na != nb) {
        return false;
    }
    for (guint i = 0; i < na; i++) {
        struct files_entry *x =
            &g_array_index(a->entries, struct files_entry, i);
        struct files_entry *y =
            &g_array_index(b->entries, struct files_entry, i);
        if (strcmp(x->path, y->path) || x->type != y->type ||
            x->mode != y->mode || x->size != y->size || x->mtime != y->mtime) {
            return false;
        }
    }
    return true;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    GError *err = NULL;
    struct files_catalog *c, *d;
    GBytes *enc;
    gsize len;
    const uint8_t *p;

    if (size < 1) {
        return 0;
    }
    c = files_catalog_decode(data + 1, size - 1, data[0] & 1, &err);
    if (!c) {
        if (!g_error_matches(err, QBAK_ERROR, QBAK_ERROR_DAMAGED)) {
            abort();
        }
        g_error_free(err);
        return 0;
    }
    /* the encoder front-codes sorted paths: sort as a writer would */
    for (guint i = 0; i < c->fss->len; i++) {
        struct files_fs *fs = c->fss->pdata[i];
        if (fs->entries) {
            files_entries_sort(fs->entries);
        }
    }
    enc = files_catalog_encode(c);
    p = g_bytes_get_data(enc, &len);
    d = files_catalog_decode(p, len, true, &err);
    if (!d || d->fss->len != c->fss->len) {
        abort();
    }
    for (guint i = 0; i < c->fss->len; i++) {
        if (!same_fs(c->fss->pdata[i], d->fss->pdata[i])) {
            abort();
        }
    }
    files_catalog_free(d);
    g_bytes_unref(enc);
    files_catalog_free(c);
    return 0;
}

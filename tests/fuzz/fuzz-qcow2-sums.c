/* libFuzzer target: the checksum file parser (io/qcow2_sums.h) on hostile
 * bytes.  A file that parses must keep every promise the interface makes:
 * entries in increasing cluster order without overlap, inside the virtual
 * size, each found again by qcow2_sums_find (at its first and last
 * cluster), data entries one cluster long, and an overlay of the set on
 * itself equal to it. */
#include <stdint.h>
#include <stdlib.h>

#include "io/qcow2_sums.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    GError *err = NULL;
    struct qcow2_sums *s = qcow2_sums_parse(data, size, "fuzz.sums", &err);
    struct qcow2_sums *o;
    uint64_t clusters;

    if (!s) {
        if (!err || !err->message) {
            abort(); /* a failure must say why */
        }
        g_error_free(err);
        return 0;
    }
    if (qcow2_sums_cluster_bits(s) < 9 || qcow2_sums_cluster_bits(s) > 21) {
        abort();
    }
    clusters = (qcow2_sums_virtual_size(s) +
                (UINT64_C(1) << qcow2_sums_cluster_bits(s)) - 1) >>
               qcow2_sums_cluster_bits(s);
    for (size_t i = 0; i < qcow2_sums_count(s); i++) {
        const struct qcow2_sum *e = qcow2_sums_at(s, i);
        if (e->count == 0 || e->cluster >= clusters ||
            e->count > clusters - e->cluster || (!e->zero && e->count != 1) ||
            qcow2_sums_find(s, e->cluster) != e ||
            qcow2_sums_find(s, e->cluster + e->count - 1) != e) {
            abort();
        }
        if (i > 0) {
            const struct qcow2_sum *p = qcow2_sums_at(s, i - 1);
            if (p->cluster + p->count > e->cluster) {
                abort();
            }
        }
    }
    o = qcow2_sums_overlay(s, s);
    if (!o || qcow2_sums_count(o) != qcow2_sums_count(s)) {
        abort();
    }
    qcow2_sums_free(o);
    qcow2_sums_free(s);
    return 0;
}

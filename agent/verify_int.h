/* Internals of verify: the check of one layer (verify_layer.c) for the
 * chain walk (verify.c). */
#ifndef QBAK_AGENT_VERIFY_INT_H
#define QBAK_AGENT_VERIFY_INT_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "io/qcow2.h"
#include "io/ring.h"

enum verify_state {
    VERIFY_GOOD,
    VERIFY_UNVERIFIABLE,
    VERIFY_DAMAGED, /* worst last: a chain takes the worst of its layers */
};

struct verify_finding {
    enum verify_state state;
    int64_t offset; /* guest offset of the first bad cluster, or -1 */
    char *reason;   /* NULL when good */
};

struct verify_stats {
    uint64_t bytes_read;
    double checksum_cpu_s;
};

/* The read buffers, allocated once per run: fresh pages for every layer
 * would cost a page fault and zeroing per 4 KiB read, a chain of small
 * layers mostly that. */
struct verify_pool;
struct verify_pool *verify_pool_new(void);
void verify_pool_free(struct verify_pool *pool);

void verify_finding_set(struct verify_finding *f, enum verify_state state,
                        int64_t offset, const char *fmt, ...)
    G_GNUC_PRINTF(4, 5);

/* Reads every data cluster of layer depth of r (with O_DIRECT where the
 * file system allows, through ring) and checks it against the layer's
 * checksums; checks that zero clusters are recorded as zero and that the
 * checksums list no cluster the layer lacks.  expect_sums: the manifest
 * says the layer has a checksum file (its absence is then damage, not
 * "unverifiable").  label names the layer in progress lines (progress:
 * print them).  The finding goes to *f. */
void verify_layer(struct verify_pool *pool, struct ring *ring,
                  struct qcow2_reader *r, unsigned depth, bool expect_sums,
                  const char *label, bool progress, struct verify_stats *st,
                  struct verify_finding *f);

#endif

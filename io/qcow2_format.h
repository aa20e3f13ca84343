/* The qcow2 format's constants and big-endian helpers, in one place for
 * the writer, the reader, the merge and the checksum file (QEMU's
 * docs/interop/qcow2.txt is the reference).  Private to io/. */
#ifndef QBAK_IO_QCOW2_FORMAT_H
#define QBAK_IO_QCOW2_FORMAT_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbU
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_HEADER_LEN 104
#define QCOW2_EXT_END 0x00000000U
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acaU
#define QCOW2_MAX_BACKING_NAME 1023
/* 16-bit refcounts: what qbak writes. */
#define QCOW2_REFCOUNT_ORDER 4

/* Header fields (byte offsets). */
#define QCOW2_HDR_BACKING_OFFSET 8
#define QCOW2_HDR_BACKING_LEN 16
#define QCOW2_HDR_CLUSTER_BITS 20
#define QCOW2_HDR_SIZE 24
#define QCOW2_HDR_L1_SIZE 36
#define QCOW2_HDR_L1_OFFSET 40
#define QCOW2_HDR_REFTABLE_OFFSET 48
#define QCOW2_HDR_REFTABLE_CLUSTERS 56
#define QCOW2_HDR_INCOMPAT 72
#define QCOW2_HDR_REFCOUNT_ORDER 96
#define QCOW2_HDR_HEADER_LEN 100

#define QCOW2_INCOMPAT_DIRTY (UINT64_C(1) << 0)

/* QEMU's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE): an image past
 * them would not open. */
#define QCOW2_MAX_L1_BYTES (UINT64_C(32) << 20)
#define QCOW2_MAX_REFTABLE_BYTES (UINT64_C(8) << 20)

/* L1 and L2 entries. */
#define QCOW2_OFLAG_COPIED (UINT64_C(1) << 63)
#define QCOW2_OFLAG_COMPRESSED (UINT64_C(1) << 62)
#define QCOW2_OFLAG_ZERO UINT64_C(1)
#define QCOW2_L1E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define QCOW2_L1E_RESERVED_MASK UINT64_C(0x7f000000000001ff)
#define QCOW2_L2E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define QCOW2_L2E_RESERVED_MASK UINT64_C(0x3f000000000001fe)

/* Sets errp to "NAME: message" (G_FILE_ERROR_INVAL) for a layer whose
 * bytes break the format, and returns false, so that checks read
 * "return qcow2_corrupt(...)". */
bool qcow2_corrupt(GError **errp, const char *name, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);

static inline uint32_t
qcow2_load_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           (uint32_t)p[3];
}

static inline uint64_t
qcow2_load_be64(const uint8_t *p)
{
    return (uint64_t)qcow2_load_be32(p) << 32 | qcow2_load_be32(p + 4);
}

static inline void
qcow2_store_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void
qcow2_store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void
qcow2_store_be64(uint8_t *p, uint64_t v)
{
    qcow2_store_be32(p, (uint32_t)(v >> 32));
    qcow2_store_be32(p + 4, (uint32_t)v);
}

#endif

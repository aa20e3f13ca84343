/* Per-cluster checksums of a qcow2 layer: see qcow2_sums.h. */
#include "io/qcow2_sums.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "io/qcow2.h"
#include "io/qcow2_format.h"

#define SUMS_MAGIC "QBAKSUMS"
#define SUMS_HEADER_LEN 64
#define SUMS_ENTRY_LEN 16
#define SUMS_ZERO_FLAG (UINT64_C(1) << 63)
#define SUMS_FILE_MODE 0640
/* A file for the largest disk qbak writes (2^50 bytes of 512-byte
 * clusters) would be absurd; bound what we allocate for one to what a
 * 64 TiB disk of 64 KiB clusters needs. */
#define SUMS_MAX_ENTRIES (UINT64_C(1) << 30)

struct qcow2_sums {
    unsigned cluster_bits;
    uint64_t virtual_size;
    GArray *entries; /* struct qcow2_sum, strictly increasing cluster */
};

struct qcow2_sums *
qcow2_sums_new(unsigned cluster_bits, uint64_t virtual_size)
{
    struct qcow2_sums *s = g_new0(struct qcow2_sums, 1);

    s->cluster_bits = cluster_bits;
    s->virtual_size = virtual_size;
    s->entries = g_array_new(FALSE, FALSE, sizeof(struct qcow2_sum));
    return s;
}

void
qcow2_sums_free(struct qcow2_sums *s)
{
    if (s == NULL) {
        return;
    }
    g_array_unref(s->entries);
    g_free(s);
}

unsigned
qcow2_sums_cluster_bits(const struct qcow2_sums *s)
{
    return s->cluster_bits;
}

uint64_t
qcow2_sums_virtual_size(const struct qcow2_sums *s)
{
    return s->virtual_size;
}

uint64_t
qcow2_sums_hash(const void *buf, size_t len)
{
    return XXH3_64bits(buf, len);
}

static uint64_t
n_clusters(const struct qcow2_sums *s)
{
    uint64_t size = UINT64_C(1) << s->cluster_bits;

    return (s->virtual_size + size - 1) >> s->cluster_bits;
}

bool
qcow2_sums_append(struct qcow2_sums *s, const struct qcow2_sum *e)
{
    guint n = s->entries->len;
    struct qcow2_sum *last =
        n > 0 ? &g_array_index(s->entries, struct qcow2_sum, n - 1) : NULL;
    uint64_t count = e->zero ? e->count : 1;

    if (count == 0 || e->cluster >= n_clusters(s) ||
        count > n_clusters(s) - e->cluster ||
        (last != NULL && e->cluster < last->cluster + last->count)) {
        return false;
    }
    if (e->zero && last != NULL && last->zero &&
        last->cluster + last->count == e->cluster) {
        last->count += count;
        return true;
    }
    struct qcow2_sum copy = *e;
    copy.count = count;
    if (copy.zero) {
        copy.hash = 0;
    }
    g_array_append_val(s->entries, copy);
    return true;
}

size_t
qcow2_sums_count(const struct qcow2_sums *s)
{
    return s->entries->len;
}

const struct qcow2_sum *
qcow2_sums_at(const struct qcow2_sums *s, size_t i)
{
    return &g_array_index(s->entries, struct qcow2_sum, i);
}

const struct qcow2_sum *
qcow2_sums_find(const struct qcow2_sums *s, uint64_t c)
{
    size_t lo = 0, hi = s->entries->len;

    /* The last entry starting at or before c. */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (qcow2_sums_at(s, mid)->cluster <= c) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo == 0) {
        return NULL;
    }
    const struct qcow2_sum *e = qcow2_sums_at(s, lo - 1);
    return c < e->cluster + e->count ? e : NULL;
}

/* Appends the part [start, start+count) of entry e (a data entry is never
 * split: count is then 1). */
static void
append_piece(struct qcow2_sums *s, const struct qcow2_sum *e, uint64_t start,
             uint64_t count)
{
    struct qcow2_sum piece = *e;

    piece.cluster = start;
    piece.count = count;
    qcow2_sums_append(s, &piece);
}

struct qcow2_sums *
qcow2_sums_overlay(const struct qcow2_sums *base, const struct qcow2_sums *top)
{
    if (base->cluster_bits != top->cluster_bits ||
        base->virtual_size != top->virtual_size) {
        return NULL;
    }
    struct qcow2_sums *s = qcow2_sums_new(top->cluster_bits, top->virtual_size);
    size_t i = 0, k = 0;
    size_t nb = qcow2_sums_count(base), nt = qcow2_sums_count(top);
    uint64_t pos = 0; /* clusters below pos are emitted */

    while (i < nb || k < nt) {
        const struct qcow2_sum *t = k < nt ? qcow2_sums_at(top, k) : NULL;
        const struct qcow2_sum *b = i < nb ? qcow2_sums_at(base, i) : NULL;

        if (t != NULL && (b == NULL || t->cluster <= MAX(b->cluster, pos))) {
            append_piece(s, t, t->cluster, t->count);
            pos = t->cluster + t->count;
            k++;
            continue;
        }
        /* What of b lies below the next top entry and above pos. */
        uint64_t b_end = b->cluster + b->count;
        uint64_t start = MAX(b->cluster, pos);
        uint64_t limit = t != NULL ? MIN(b_end, t->cluster) : b_end;

        if (start < limit) {
            append_piece(s, b, start, limit - start);
        }
        if (limit >= b_end) {
            i++;
        } else {
            pos = limit;
        }
    }
    return s;
}

/* The whole file in memory: header, entries, trailer. */
static uint8_t *
serialize(const struct qcow2_sums *s, size_t *len)
{
    size_t n = qcow2_sums_count(s);
    size_t total = SUMS_HEADER_LEN + n * SUMS_ENTRY_LEN + 8;
    uint8_t *buf = g_malloc0(total);
    uint8_t *p = buf + SUMS_HEADER_LEN;

    memcpy(buf, SUMS_MAGIC, 8);
    qcow2_store_be32(buf + 8, QCOW2_SUMS_VERSION);
    qcow2_store_be32(buf + 12, s->cluster_bits);
    qcow2_store_be64(buf + 16, s->virtual_size);
    qcow2_store_be64(buf + 24, n);
    qcow2_store_be64(buf + 56, XXH3_64bits(buf, 56));
    for (size_t i = 0; i < n; i++, p += SUMS_ENTRY_LEN) {
        const struct qcow2_sum *e = qcow2_sums_at(s, i);

        qcow2_store_be64(p, e->cluster | (e->zero ? SUMS_ZERO_FLAG : 0));
        qcow2_store_be64(p + 8, e->zero ? e->count : e->hash);
    }
    qcow2_store_be64(p, XXH3_64bits(buf + SUMS_HEADER_LEN, n * SUMS_ENTRY_LEN));
    *len = total;
    return buf;
}

bool
qcow2_sums_write(int dirfd, const char *name, const struct qcow2_sums *s,
                 GError **errp)
{
    return qcow2_sums_write_sync(dirfd, name, s, true, errp);
}

bool
qcow2_sums_write_sync(int dirfd, const char *name, const struct qcow2_sums *s,
                      bool do_fsync, GError **errp)
{
    size_t len;
    g_autofree uint8_t *buf = serialize(s, &len);
    int fd = openat(dirfd, name,
                    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    SUMS_FILE_MODE);
    size_t done = 0;

    if (fd < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: create: %s", name, g_strerror(err));
        return false;
    }
    while (done < len) {
        ssize_t n = write(fd, buf + done, len - done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : ENOSPC;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: write: %s", name, g_strerror(err));
            close(fd);
            return false;
        }
        done += (size_t)n;
    }
    if (do_fsync && fsync(fd) < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: fsync: %s", name, g_strerror(err));
        close(fd);
        return false;
    }
    close(fd);
    return true;
}

static struct qcow2_sums *
damaged(GError **errp, const char *name, const char *why)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "%s: damaged checksum file: %s", name, why);
    return NULL;
}

struct qcow2_sums *
qcow2_sums_parse(const uint8_t *buf, size_t len, const char *name,
                 GError **errp)
{
    if (len < SUMS_HEADER_LEN + 8) {
        return damaged(errp, name, "too short");
    }
    if (memcmp(buf, SUMS_MAGIC, 8) != 0) {
        return damaged(errp, name, "bad magic");
    }
    if (qcow2_load_be64(buf + 56) != XXH3_64bits(buf, 56)) {
        return damaged(errp, name, "header checksum mismatch");
    }
    if (qcow2_load_be32(buf + 8) != QCOW2_SUMS_VERSION) {
        return damaged(errp, name, "unknown version");
    }
    uint32_t cluster_bits = qcow2_load_be32(buf + 12);
    uint64_t virtual_size = qcow2_load_be64(buf + 16);
    uint64_t n = qcow2_load_be64(buf + 24);

    if (cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        cluster_bits > QCOW2_MAX_CLUSTER_BITS || virtual_size == 0 ||
        virtual_size > QCOW2_MAX_VIRTUAL_SIZE) {
        return damaged(errp, name, "cluster size or virtual size invalid");
    }
    if (n > SUMS_MAX_ENTRIES ||
        len != SUMS_HEADER_LEN + n * SUMS_ENTRY_LEN + 8) {
        return damaged(errp, name, "length does not match the entry count");
    }
    const uint8_t *p = buf + SUMS_HEADER_LEN;
    if (qcow2_load_be64(p + n * SUMS_ENTRY_LEN) !=
        XXH3_64bits(p, n * SUMS_ENTRY_LEN)) {
        return damaged(errp, name, "entries checksum mismatch");
    }

    struct qcow2_sums *s = qcow2_sums_new(cluster_bits, virtual_size);
    /* Sized once: grown by doubling, a 1 TiB disk's entries would pass
     * through copies of up to twice their size. */
    g_array_unref(s->entries);
    s->entries =
        g_array_sized_new(FALSE, FALSE, sizeof(struct qcow2_sum), (guint)n);
    for (uint64_t i = 0; i < n; i++, p += SUMS_ENTRY_LEN) {
        uint64_t key = qcow2_load_be64(p);
        uint64_t value = qcow2_load_be64(p + 8);
        bool zero = (key & SUMS_ZERO_FLAG) != 0;
        struct qcow2_sum e = {.cluster = key & ~SUMS_ZERO_FLAG,
                              .zero = zero,
                              .count = zero ? value : 1,
                              .hash = zero ? 0 : value};
        size_t before = qcow2_sums_count(s);

        /* A stored zero run is never adjacent to the one before (the
         * writer coalesces them), so append must add an entry. */
        if (!qcow2_sums_append(s, &e) || qcow2_sums_count(s) == before) {
            qcow2_sums_free(s);
            return damaged(errp, name, "entries out of order or range");
        }
    }
    return s;
}

struct qcow2_sums *
qcow2_sums_read(int dirfd, const char *name, GError **errp)
{
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    g_autofree uint8_t *buf = NULL;
    size_t done = 0;

    if (fd < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: open: %s", name, g_strerror(err));
        return NULL;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return damaged(errp, name, "not a regular file");
    }
    if ((uint64_t)st.st_size >
        SUMS_HEADER_LEN + SUMS_MAX_ENTRIES * SUMS_ENTRY_LEN + 8) {
        close(fd);
        return damaged(errp, name, "too large");
    }
    buf = g_malloc((size_t)st.st_size + 1);
    while (done < (size_t)st.st_size) {
        ssize_t n =
            pread(fd, buf + done, (size_t)st.st_size - done, (off_t)done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: read: %s", name, g_strerror(err));
            close(fd);
            return NULL;
        }
        if (n == 0) {
            break;
        }
        done += (size_t)n;
    }
    close(fd);
    return qcow2_sums_parse(buf, done, name, errp);
}

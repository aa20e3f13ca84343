/* qcow2 chain reader: restore, verify, NBD READ and the writer's
 * partial-cluster fill.
 *
 * Every byte of every image is untrusted: images come back from a
 * repository that may have been damaged or tampered with, and a backing
 * file name is a path chosen by whoever wrote the file.  Nothing read from
 * a file reaches an assert(), every length is bounded before it is used to
 * allocate, and every offset is checked against the file before it is
 * read.  We never need refcounts to read, so they are not looked at.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/file.h"
#include "io/qcow2.h"
#include "io/qcow2_format.h"
#include "io/qcow2_reader_int.h"
#include "io/qcow2_sums.h"

/* pread() that reads everything or says why not; a file shorter than its
 * own metadata claims is corrupt, not an I/O error. */
bool
qcow2_read_exact(int fd, void *buf, size_t len, uint64_t off, const char *name,
                 const char *what, GError **errp)
{
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pread(fd, p, len, (off_t)off);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: reading %s at %" PRIu64 ": %s", name, what, off,
                        g_strerror(err));
            return false;
        }
        if (n == 0) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: %s at %" PRIu64 " is past the end of the file",
                        name, what, off);
            return false;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

static void
layer_free(struct qcow2_layer *l)
{
    if (l == NULL) {
        return;
    }
    for (unsigned i = 0; i < L2_CACHE_SIZE; i++) {
        g_free(l->cache[i].table);
    }
    g_free(l->l1);
    g_free(l->backing_name);
    qcow2_sums_free(l->sums);
    g_free(l->sums_why);
    if (l->fd >= 0) {
        close(l->fd);
    }
    if (l->direct_fd >= 0) {
        close(l->direct_fd);
    }
    g_free(l->name);
    g_free(l);
}

bool
qcow2_corrupt(GError **errp, const char *name, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *msg = NULL;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL, "%s: %s", name, msg);
    return false;
}

/* Header extensions sit between the header and the backing file name (or
 * the end of cluster 0).  Only the backing format matters to us: a chain
 * over a raw file cannot be read as qcow2. */
static bool
parse_extensions(struct qcow2_layer *l, const uint8_t *hdr, uint64_t start,
                 uint64_t end, GError **errp)
{
    uint64_t off = start;

    while (off < end) {
        if (end - off < 8) {
            return qcow2_corrupt(errp, l->name,
                                 "truncated header extension at %" PRIu64, off);
        }
        uint32_t type = qcow2_load_be32(hdr + off);
        uint32_t len = qcow2_load_be32(hdr + off + 4);
        off += 8;
        if (type == QCOW2_EXT_END) {
            break;
        }
        if (len > end - off) {
            return qcow2_corrupt(errp, l->name,
                                 "header extension 0x%08x of %u bytes overruns "
                                 "the header",
                                 type, len);
        }
        if (type == QCOW2_EXT_BACKING_FORMAT) {
            if (len != 5 || memcmp(hdr + off, "qcow2", 5) != 0) {
                g_autofree char *fmt =
                    g_strndup((const char *)hdr + off, MIN(len, 32u));
                return qcow2_corrupt(
                    errp, l->name,
                    "backing file format '%s' is not supported "
                    "(only qcow2)",
                    fmt);
            }
        }
        off += ((uint64_t)len + 7) & ~UINT64_C(7);
    }
    return true;
}

/* Parse and check the header; on success l describes the image and
 * *backing_name is the backing file name or NULL. */
static bool
layer_parse_header(struct qcow2_layer *l, char **backing_name, GError **errp)
{
    uint8_t fixed[QCOW2_V3_HEADER_LEN] = {0};
    size_t have = (size_t)MIN(l->file_size, (uint64_t)sizeof(fixed));

    *backing_name = NULL;
    if (have < QCOW2_V2_HEADER_LEN) {
        return qcow2_corrupt(errp, l->name,
                             "file too short for a qcow2 header");
    }
    if (!qcow2_read_exact(l->fd, fixed, have, 0, l->name, "header", errp)) {
        return false;
    }
    if (qcow2_load_be32(fixed) != QCOW2_MAGIC) {
        return qcow2_corrupt(errp, l->name, "not a qcow2 image (bad magic)");
    }
    uint32_t version = qcow2_load_be32(fixed + 4);
    if (version != 2 && version != 3) {
        return qcow2_corrupt(errp, l->name, "unsupported qcow2 version %u",
                             version);
    }
    uint64_t backing_offset = qcow2_load_be64(fixed + QCOW2_HDR_BACKING_OFFSET);
    uint32_t backing_len = qcow2_load_be32(fixed + QCOW2_HDR_BACKING_LEN);
    uint32_t cluster_bits = qcow2_load_be32(fixed + QCOW2_HDR_CLUSTER_BITS);
    uint64_t virtual_size = qcow2_load_be64(fixed + QCOW2_HDR_SIZE);
    uint32_t crypt_method = qcow2_load_be32(fixed + 32);
    uint32_t l1_size = qcow2_load_be32(fixed + QCOW2_HDR_L1_SIZE);
    uint64_t l1_offset = qcow2_load_be64(fixed + QCOW2_HDR_L1_OFFSET);
    uint64_t incompat = 0;
    uint32_t header_len = QCOW2_V2_HEADER_LEN;

    if (version == 3) {
        if (have < QCOW2_V3_HEADER_LEN) {
            return qcow2_corrupt(errp, l->name,
                                 "file too short for a qcow2 v3 header");
        }
        incompat = qcow2_load_be64(fixed + QCOW2_HDR_INCOMPAT);
        uint32_t refcount_order =
            qcow2_load_be32(fixed + QCOW2_HDR_REFCOUNT_ORDER);
        header_len = qcow2_load_be32(fixed + QCOW2_HDR_HEADER_LEN);
        if (refcount_order > 6) {
            return qcow2_corrupt(errp, l->name, "invalid refcount order %u",
                                 refcount_order);
        }
        if (header_len < QCOW2_V3_HEADER_LEN) {
            return qcow2_corrupt(errp, l->name, "header length %u too small",
                                 header_len);
        }
    }
    if (cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        return qcow2_corrupt(errp, l->name, "unsupported cluster bits %u",
                             cluster_bits);
    }
    l->cluster_bits = cluster_bits;
    l->cluster_size = UINT64_C(1) << cluster_bits;
    l->l2_bits = cluster_bits - 3;
    if (header_len > l->cluster_size) {
        return qcow2_corrupt(errp, l->name,
                             "header length %u exceeds the cluster size",
                             header_len);
    }
    /* The dirty bit only says refcounts may be stale; a reader does not
     * use them.  Every other bit changes how data is found. */
    if (incompat & ~QCOW2_INCOMPAT_DIRTY) {
        return qcow2_corrupt(
            errp, l->name,
            "unsupported incompatible features 0x%" PRIx64
            " (corrupt, external data file, compression type or "
            "extended L2)",
            incompat & ~QCOW2_INCOMPAT_DIRTY);
    }
    if (crypt_method != 0) {
        return qcow2_corrupt(errp, l->name,
                             "encrypted images are not supported");
    }
    if (virtual_size > QCOW2_MAX_VIRTUAL_SIZE) {
        return qcow2_corrupt(
            errp, l->name, "virtual size %" PRIu64 " too large", virtual_size);
    }
    l->virtual_size = virtual_size;

    /* Bytes of one L2 table's reach: cluster_size << l2_bits, at most
     * 2^21 * 2^18, so no overflow below. */
    unsigned reach_bits = cluster_bits + l->l2_bits;
    uint64_t l1_needed =
        (virtual_size + (UINT64_C(1) << reach_bits) - 1) >> reach_bits;
    if (l1_size < l1_needed) {
        return qcow2_corrupt(
            errp, l->name,
            "L1 table of %u entries too small for virtual size "
            "%" PRIu64,
            l1_size, virtual_size);
    }
    if ((uint64_t)l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        return qcow2_corrupt(errp, l->name, "L1 table of %u entries too large",
                             l1_size);
    }
    if (l1_size > 0) {
        if (l1_offset & (l->cluster_size - 1)) {
            return qcow2_corrupt(errp, l->name,
                                 "L1 table offset 0x%" PRIx64 " not aligned",
                                 l1_offset);
        }
        if (l1_offset == 0 || l1_offset > l->file_size ||
            (uint64_t)l1_size * 8 > l->file_size - l1_offset) {
            return qcow2_corrupt(errp, l->name,
                                 "L1 table at 0x%" PRIx64
                                 " (%u entries) is outside the file",
                                 l1_offset, l1_size);
        }
    }

    /* Cluster 0 holds the extensions and the backing name; bytes past the
     * end of a short file read as zero, which ends the extension list. */
    g_autofree uint8_t *hdr = g_malloc0(l->cluster_size);
    size_t hdr_have = (size_t)MIN(l->file_size, l->cluster_size);
    if (!qcow2_read_exact(l->fd, hdr, hdr_have, 0, l->name, "header cluster",
                          errp)) {
        return false;
    }
    uint64_t ext_end = l->cluster_size;
    if (backing_offset != 0) {
        if (backing_offset > l->cluster_size) {
            return qcow2_corrupt(errp, l->name,
                                 "backing file name offset 0x%" PRIx64
                                 " outside cluster 0",
                                 backing_offset);
        }
        ext_end = backing_offset;
    }
    if (!parse_extensions(l, hdr, header_len, ext_end, errp)) {
        return false;
    }
    if (backing_offset != 0 && backing_len != 0) {
        if (backing_len > QCOW2_MAX_BACKING_NAME ||
            backing_len > l->cluster_size - backing_offset) {
            return qcow2_corrupt(errp, l->name,
                                 "backing file name of %u bytes too long",
                                 backing_len);
        }
        if (memchr(hdr + backing_offset, '\0', backing_len) != NULL) {
            return qcow2_corrupt(errp, l->name,
                                 "backing file name contains a NUL byte");
        }
        *backing_name =
            g_strndup((const char *)hdr + backing_offset, backing_len);
    }

    l->l1_entries = l1_needed;
    l->l1 = g_new(uint64_t, MAX(l1_needed, 1));
    if (l1_needed > 0) {
        if (!qcow2_read_exact(l->fd, l->l1, l1_needed * 8, l1_offset, l->name,
                              "L1 table", errp)) {
            g_clear_pointer(backing_name, g_free);
            return false;
        }
        for (uint64_t i = 0; i < l1_needed; i++) {
            l->l1[i] = GUINT64_FROM_BE(l->l1[i]);
        }
    }
    return true;
}

/* Data read in bulk (restore) bypasses the page cache: it is read once,
 * and filling and copying fresh cache pages costs more than the read
 * itself on many hosts.  Opened the first time the layer supplies data, so
 * opening a chain costs no more than before, and a deep chain's layers
 * that a restore never reads take no second fd. */
int
qcow2_layer_direct_fd(struct qcow2_layer *l)
{
    if (!l->direct_done) {
        l->direct_done = true;
        l->direct_fd = file_reopen_direct(l->fd, O_RDONLY);
    }
    return l->direct_fd;
}

/* Open one image of the chain.  follow_symlink is false for names found
 * inside images: the name is untrusted, and a symlink in its last
 * component (or a /proc magic link) is not something qbak writes. */
static struct qcow2_layer *
layer_open(int dirfd, const char *path, bool follow_symlink,
           char **backing_name, GError **errp)
{
    g_autofree char *name = g_strdup(path);
    struct qcow2_layer *l = g_new0(struct qcow2_layer, 1);
    struct stat st;
    /* O_NONBLOCK: a FIFO named as a backing file must not hang us. */
    int flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK;

    if (!follow_symlink) {
        flags |= O_NOFOLLOW;
    }
    l->name = g_steal_pointer(&name);
    l->direct_fd = -1;
    l->fd = openat(dirfd, path, flags);
    if (l->fd < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: open: %s", path, g_strerror(err));
        goto fail;
    }
    if (fstat(l->fd, &st) < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "%s: fstat: %s", path, g_strerror(err));
        goto fail;
    }
    if (S_ISREG(st.st_mode)) {
        l->file_size = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(l->fd, 0, SEEK_END);
        if (end < 0) {
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: lseek: %s", path, g_strerror(err));
            goto fail;
        }
        l->file_size = (uint64_t)end;
    } else {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: not a regular file or block device", path);
        goto fail;
    }
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    if (!layer_parse_header(l, backing_name, errp)) {
        goto fail;
    }
    return l;

fail:
    layer_free(l);
    return NULL;
}

/* The checksums beside layer l (opened as dirfd/path): kept when they
 * describe this image, otherwise the reason is kept. */
static void
layer_load_sums(struct qcow2_layer *l, int dirfd, const char *path)
{
    g_autofree char *name = g_strconcat(path, QCOW2_SUMS_SUFFIX, NULL);
    g_autoptr(GError) err = NULL;
    struct qcow2_sums *s = qcow2_sums_read(dirfd, name, &err);

    if (s == NULL) {
        l->sums_why = g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)
                          ? g_strdup_printf("%s: no checksum file", l->name)
                          : g_strdup(err->message);
        return;
    }
    if (qcow2_sums_cluster_bits(s) != l->cluster_bits ||
        qcow2_sums_virtual_size(s) != l->virtual_size) {
        l->sums_why = g_strdup_printf(
            "%s: damaged checksum file: describes another image", name);
        qcow2_sums_free(s);
        return;
    }
    l->sums = s;
}

static struct qcow2_reader *
reader_open(int dirfd, const char *path, bool with_sums, GError **errp)
{
    struct qcow2_reader *r = g_new0(struct qcow2_reader, 1);
    g_autofree char *cur = g_strdup(path);
    int cur_dirfd = dirfd;
    int owned_dirfd = -1;

    r->layers = g_new0(struct qcow2_layer *, 1);
    for (;;) {
        g_autofree char *backing = NULL;
        struct qcow2_layer *l =
            layer_open(cur_dirfd, cur, r->n_layers == 0, &backing, errp);

        if (l == NULL) {
            goto fail;
        }
        for (unsigned i = 0; i < r->n_layers; i++) {
            if (r->layers[i]->dev == l->dev && r->layers[i]->ino == l->ino) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                            "%s: backing chain loops back to %s", l->name,
                            r->layers[i]->name);
                layer_free(l);
                goto fail;
            }
        }
        if (with_sums) {
            layer_load_sums(l, cur_dirfd, cur);
        }
        r->layers = g_renew(struct qcow2_layer *, r->layers, r->n_layers + 1);
        r->layers[r->n_layers++] = l;
        if (r->n_layers == 1 && backing != NULL) {
            r->backing_file = g_strdup(backing);
        }
        l->backing_name = g_strdup(backing);
        if (backing == NULL) {
            break;
        }
        if (r->n_layers >= QCOW2_MAX_CHAIN_DEPTH) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: backing chain deeper than %u images", path,
                        QCOW2_MAX_CHAIN_DEPTH);
            goto fail;
        }

        /* The backing name is relative to the directory of the image
         * that names it, as in QEMU. */
        g_autofree char *dir = g_path_get_dirname(cur);
        int next_dirfd =
            openat(cur_dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (next_dirfd < 0) {
            int err = errno;
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "%s: opening directory %s: %s", l->name, dir,
                        g_strerror(err));
            goto fail;
        }
        if (owned_dirfd >= 0) {
            close(owned_dirfd);
        }
        owned_dirfd = cur_dirfd = next_dirfd;
        g_free(cur);
        cur = g_steal_pointer(&backing);
    }
    if (owned_dirfd >= 0) {
        close(owned_dirfd);
    }
    return r;

fail:
    if (owned_dirfd >= 0) {
        close(owned_dirfd);
    }
    qcow2_reader_free(r);
    return NULL;
}

struct qcow2_reader *
qcow2_reader_open(int dirfd, const char *path, GError **errp)
{
    return reader_open(dirfd, path, false, errp);
}

struct qcow2_reader *
qcow2_reader_open_with_sums(int dirfd, const char *path, GError **errp)
{
    return reader_open(dirfd, path, true, errp);
}

void
qcow2_reader_free(struct qcow2_reader *r)
{
    if (r == NULL) {
        return;
    }
    for (unsigned i = 0; i < r->n_layers; i++) {
        layer_free(r->layers[i]);
    }
    g_free(r->layers);
    g_free(r->backing_file);
    g_free(r);
}

uint64_t
qcow2_reader_virtual_size(const struct qcow2_reader *r)
{
    return r->layers[0]->virtual_size;
}

unsigned
qcow2_reader_cluster_bits(const struct qcow2_reader *r)
{
    return r->layers[0]->cluster_bits;
}

const char *
qcow2_reader_backing_file(const struct qcow2_reader *r)
{
    return r->backing_file;
}

unsigned
qcow2_reader_chain_depth(const struct qcow2_reader *r)
{
    return r->n_layers;
}

const char *
qcow2_reader_layer_backing_file(const struct qcow2_reader *r, unsigned depth)
{
    return r->layers[depth]->backing_name;
}

const char *
qcow2_reader_layer_name(const struct qcow2_reader *r, unsigned depth)
{
    return r->layers[depth]->name;
}

int
qcow2_reader_layer_fd(const struct qcow2_reader *r, unsigned depth)
{
    return r->layers[depth]->fd;
}

uint64_t
qcow2_reader_layer_file_size(const struct qcow2_reader *r, unsigned depth)
{
    return r->layers[depth]->file_size;
}

uint64_t
qcow2_reader_layer_virtual_size(const struct qcow2_reader *r, unsigned depth)
{
    return r->layers[depth]->virtual_size;
}

unsigned
qcow2_reader_layer_cluster_bits(const struct qcow2_reader *r, unsigned depth)
{
    return r->layers[depth]->cluster_bits;
}

const struct qcow2_sums *
qcow2_reader_layer_sums(const struct qcow2_reader *r, unsigned depth,
                        const char **why)
{
    const struct qcow2_layer *l = r->layers[depth];

    if (why != NULL) {
        *why = l->sums_why;
    }
    return l->sums;
}

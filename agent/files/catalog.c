/* Catalogs: see catalog.h. */
#include "agent/files/catalog.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "agent/error.h"
#include "agent/files/names.h"

#define MAGIC "QBAKCAT1"
#define MAGIC_LEN 8
#define MAX_HEADER (1u << 20)
#define MAX_PATH_LEN (64u << 10)
#define MAX_FS 4096

struct files_fs *
files_fs_new(void)
{
    return g_new0(struct files_fs, 1);
}

static void
entry_clear(gpointer p)
{
    g_free(((struct files_entry *)p)->path);
}

void
files_fs_free(struct files_fs *fs)
{
    if (!fs) {
        return;
    }
    g_free(fs->name);
    g_free(fs->dev);
    g_free(fs->type);
    g_free(fs->label);
    g_free(fs->error);
    g_strfreev(fs->pvs);
    if (fs->entries) {
        g_array_unref(fs->entries);
    }
    g_free(fs);
}

void
files_catalog_free(struct files_catalog *c)
{
    if (!c) {
        return;
    }
    g_free(c->point);
    g_free(c->disk);
    if (c->fss) {
        g_ptr_array_free(c->fss, true);
    }
    g_free(c);
}

GArray *
files_entries_new(void)
{
    GArray *a = g_array_new(false, false, sizeof(struct files_entry));
    g_array_set_clear_func(a, entry_clear);
    return a;
}

static gint
entry_cmp(gconstpointer a, gconstpointer b)
{
    return strcmp(((const struct files_entry *)a)->path,
                  ((const struct files_entry *)b)->path);
}

void
files_entries_sort(GArray *entries)
{
    g_array_sort(entries, entry_cmp);
}

char
files_type_of_mode(uint32_t mode)
{
    if (S_ISREG(mode)) {
        return 'f';
    }
    if (S_ISDIR(mode)) {
        return 'd';
    }
    if (S_ISLNK(mode)) {
        return 'l';
    }
    return 'o';
}

const char *
files_type_name(char type)
{
    switch (type) {
    case 'f':
        return "file";
    case 'd':
        return "dir";
    case 'l':
        return "symlink";
    default:
        return "other";
    }
}

static void
put_varint(GByteArray *b, uint64_t v)
{
    uint8_t c;

    do {
        c = v & 0x7f;
        v >>= 7;
        if (v) {
            c |= 0x80;
        }
        g_byte_array_append(b, &c, 1);
    } while (v);
}

static void
put_le(GByteArray *b, uint64_t v, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        uint8_t c = (uint8_t)(v >> (8 * i));
        g_byte_array_append(b, &c, 1);
    }
}

static char *
utf8(const char *s)
{
    return s ? files_name_utf8(s, strlen(s)) : g_strdup("");
}

static json_t *
header_json(const struct files_catalog *c)
{
    json_t *fss = json_array();
    g_autofree char *now = NULL;
    g_autoptr(GDateTime) t = g_date_time_new_now_utc();

    now = g_date_time_format(t, "%Y-%m-%dT%H:%M:%SZ");
    for (guint i = 0; i < c->fss->len; i++) {
        struct files_fs *fs = c->fss->pdata[i];
        /* names, labels and errors come from the guest: valid UTF-8 */
        g_autofree char *name = utf8(fs->name);
        g_autofree char *type = utf8(fs->type);
        g_autofree char *label = utf8(fs->label);
        json_t *j =
            json_pack("{s:s, s:s, s:I, s:s, s:I}", "fs", name, "type", type,
                      "size", (json_int_t)fs->size, "label", label, "entries",
                      (json_int_t)(fs->entries ? fs->entries->len : 0));
        if (fs->error) {
            g_autofree char *e = utf8(fs->error);
            json_object_set_new(j, "error", json_string(e));
        }
        json_array_append_new(fss, j);
    }
    return json_pack("{s:i, s:s, s:s, s:s, s:o}", "format", 1, "point",
                     c->point, "disk", c->disk, "created", now, "filesystems",
                     fss);
}

GBytes *
files_catalog_encode(const struct files_catalog *c)
{
    GByteArray *b = g_byte_array_sized_new(4096);
    json_t *h = header_json(c);
    char *text = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    size_t hlen = strlen(text);

    json_decref(h);
    g_byte_array_append(b, (const guint8 *)MAGIC, MAGIC_LEN);
    put_le(b, hlen, 4);
    g_byte_array_append(b, (const guint8 *)text, hlen);
    free(text);
    for (guint i = 0; i < c->fss->len; i++) {
        struct files_fs *fs = c->fss->pdata[i];
        const char *prev = "";
        size_t prev_len = 0;

        for (guint k = 0; fs->entries && k < fs->entries->len; k++) {
            struct files_entry *e =
                &g_array_index(fs->entries, struct files_entry, k);
            size_t len = strlen(e->path), p = 0;
            uint8_t type = (uint8_t)e->type;

            while (p < len && p < prev_len && prev[p] == e->path[p]) {
                p++;
            }
            put_varint(b, p);
            put_varint(b, len - p);
            g_byte_array_append(b, (const guint8 *)e->path + p, len - p);
            g_byte_array_append(b, &type, 1);
            put_varint(b, e->mode);
            put_varint(b, e->size);
            put_varint(b,
                       ((uint64_t)e->mtime << 1) ^ (uint64_t)(e->mtime >> 63));
            prev = e->path;
            prev_len = len;
        }
    }
    put_le(b, XXH3_64bits(b->data, b->len), 8);
    return g_byte_array_free_to_bytes(b);
}

struct reader {
    const uint8_t *p, *end;
};

static bool
get_varint(struct reader *r, uint64_t *v)
{
    *v = 0;
    for (unsigned shift = 0; shift < 70; shift += 7) {
        uint8_t c;
        if (r->p >= r->end) {
            return false;
        }
        c = *r->p++;
        if (shift == 63 && c > 1) {
            return false; /* more than 64 bits */
        }
        *v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            return true;
        }
    }
    return false;
}

static uint64_t
get_le(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++) {
        v |= (uint64_t)p[i] << (8 * i);
    }
    return v;
}

static bool
damaged(GError **errp, const char *why)
{
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_DAMAGED, "catalog damaged: %s",
                why);
    return false;
}

static bool
decode_entries(struct reader *r, struct files_fs *fs, uint64_t n, GError **errp)
{
    GString *path = g_string_new(NULL);
    bool ok = false;

    fs->entries = files_entries_new();
    for (uint64_t k = 0; k < n; k++) {
        uint64_t p, s, mode, size, zz;
        struct files_entry e = {0};

        if (!get_varint(r, &p) || !get_varint(r, &s)) {
            damaged(errp, "truncated record");
            goto out;
        }
        if (p > path->len || s > MAX_PATH_LEN || p + s > MAX_PATH_LEN ||
            s > (uint64_t)(r->end - r->p)) {
            damaged(errp, "bad path lengths");
            goto out;
        }
        g_string_truncate(path, p);
        g_string_append_len(path, (const char *)r->p, (gssize)s);
        r->p += s;
        if (path->len == 0 || path->str[0] != '/' ||
            memchr(path->str, 0, path->len)) {
            damaged(errp, "bad path");
            goto out;
        }
        if (r->p >= r->end) {
            damaged(errp, "truncated record");
            goto out;
        }
        e.type = (char)*r->p++;
        if (!strchr("fdlo", e.type) || e.type == 0) {
            damaged(errp, "bad entry type");
            goto out;
        }
        if (!get_varint(r, &mode) || !get_varint(r, &size) ||
            !get_varint(r, &zz) || mode > UINT32_MAX) {
            damaged(errp, "truncated record");
            goto out;
        }
        e.mode = (uint32_t)mode;
        e.size = size;
        e.mtime = (int64_t)((zz >> 1) ^ (~(zz & 1) + 1));
        e.path = g_strndup(path->str, path->len);
        g_array_append_val(fs->entries, e);
    }
    ok = true;
out:
    g_string_free(path, true);
    return ok;
}

static const char *
jstr(json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

struct files_catalog *
files_catalog_decode(const uint8_t *buf, size_t len, bool verify, GError **errp)
{
    struct reader r;
    uint64_t hlen;
    json_t *h = NULL, *fss, *j;
    json_error_t jerr;
    size_t i;
    struct files_catalog *c = NULL;

    if (len < MAGIC_LEN + 4 + 8 || memcmp(buf, MAGIC, MAGIC_LEN) != 0) {
        damaged(errp, "not a qbak catalog");
        return NULL;
    }
    if (verify && XXH3_64bits(buf, len - 8) != get_le(buf + len - 8, 8)) {
        damaged(errp, "checksum mismatch");
        return NULL;
    }
    r.p = buf + MAGIC_LEN;
    r.end = buf + len - 8;
    hlen = get_le(r.p, 4);
    r.p += 4;
    if (hlen > MAX_HEADER || hlen > (uint64_t)(r.end - r.p)) {
        damaged(errp, "bad header length");
        return NULL;
    }
    h = json_loadb((const char *)r.p, hlen, JSON_REJECT_DUPLICATES, &jerr);
    r.p += hlen;
    fss = json_object_get(h, "filesystems");
    if (!h || json_integer_value(json_object_get(h, "format")) != 1 ||
        !jstr(h, "point") || !jstr(h, "disk") || !json_is_array(fss) ||
        json_array_size(fss) > MAX_FS) {
        damaged(errp, "bad header");
        goto fail;
    }
    c = g_new0(struct files_catalog, 1);
    c->point = g_strdup(jstr(h, "point"));
    c->disk = g_strdup(jstr(h, "disk"));
    c->fss = g_ptr_array_new_with_free_func((GDestroyNotify)files_fs_free);
    json_array_foreach(fss, i, j)
    {
        struct files_fs *fs;
        json_t *n = json_object_get(j, "entries");

        if (!jstr(j, "fs") || !json_is_integer(n) ||
            json_integer_value(n) < 0 ||
            /* every record takes at least 6 bytes */
            (uint64_t)json_integer_value(n) > (uint64_t)(r.end - r.p) / 6) {
            damaged(errp, "bad file system entry");
            goto fail;
        }
        fs = files_fs_new();
        g_ptr_array_add(c->fss, fs);
        fs->name = g_strdup(jstr(j, "fs"));
        fs->type = g_strdup(jstr(j, "type") ? jstr(j, "type") : "");
        fs->label = g_strdup(jstr(j, "label") ? jstr(j, "label") : "");
        fs->size = json_integer_value(json_object_get(j, "size"));
        fs->error = g_strdup(jstr(j, "error"));
        if (!decode_entries(&r, fs, (uint64_t)json_integer_value(n), errp)) {
            goto fail;
        }
    }
    if (r.p != r.end) {
        damaged(errp, "trailing bytes");
        goto fail;
    }
    json_decref(h);
    return c;
fail:
    json_decref(h);
    files_catalog_free(c);
    return NULL;
}

struct files_catalog *
files_catalog_read(int point_fd, const char *disk, GError **errp)
{
    g_autofree char *name = g_strconcat(disk, CATALOG_SUFFIX, NULL);
    g_autofree uint8_t *buf = NULL;
    struct stat st;
    size_t off = 0;
    int fd = openat(point_fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0) {
        g_set_error(errp, QBAK_ERROR,
                    errno == ENOENT ? QBAK_ERROR_NOT_FOUND : QBAK_ERROR_FAILED,
                    "%s: %s", name, g_strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        (uint64_t)st.st_size > CATALOG_MAX_SIZE) {
        close(fd);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_DAMAGED,
                    "%s: not a regular file of sane size", name);
        return NULL;
    }
    buf = g_malloc(st.st_size ? st.st_size : 1);
    while (off < (size_t)st.st_size) {
        ssize_t n = pread(fd, buf + off, st.st_size - off, (off_t)off);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            close(fd);
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_IO, "%s: read: %s",
                        name, n < 0 ? g_strerror(errno) : "short file");
            return NULL;
        }
        off += (size_t)n;
    }
    close(fd);
    struct files_catalog *c = files_catalog_decode(buf, off, true, errp);
    if (!c) {
        g_prefix_error(errp, "%s: ", name);
    }
    return c;
}

int64_t
files_catalog_write(int point_fd, const struct files_catalog *c, GError **errp)
{
    g_autoptr(GBytes) bytes = files_catalog_encode(c);
    g_autofree char *name = g_strconcat(c->disk, CATALOG_SUFFIX, NULL);
    g_autofree char *tmp = g_strdup_printf(".%s.tmp-%d", name, (int)getpid());
    gsize len;
    const uint8_t *data = g_bytes_get_data(bytes, &len);
    size_t off = 0;
    int fd;

    unlinkat(point_fd, tmp, 0);
    fd = openat(point_fd, tmp,
                O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0) {
        goto fail;
    }
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (n == 0) {
                errno = EIO;
            }
            goto fail_close;
        }
        off += (size_t)n;
    }
    if (fsync(fd) < 0) {
        goto fail_close;
    }
    close(fd);
    fd = -1;
    if (renameat(point_fd, tmp, point_fd, name) < 0 || fsync(point_fd) < 0) {
        goto fail;
    }
    return (int64_t)len;
fail_close : {
    int err = errno;
    close(fd);
    errno = err;
}
fail:
    g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno), "%s: %s",
                name, g_strerror(errno));
    unlinkat(point_fd, tmp, 0);
    return -1;
}

/* The point manifest: see manifest.h. */
#include "agent/manifest.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "agent/error.h"
#include "agent/repo.h"

static bool damaged(GError **errp, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static bool
damaged(GError **errp, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *msg = NULL;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_DAMAGED, "%s: %s", MANIFEST_NAME,
                msg);
    return false;
}

/* A string member: required, or optional (NULL when absent or null). */
static bool
get_string(json_t *obj, const char *key, bool required, const char **out,
           const char *where, GError **errp)
{
    json_t *v = json_object_get(obj, key);

    *out = NULL;
    if (!v || json_is_null(v)) {
        if (required) {
            return damaged(errp, "%s\"%s\" is missing", where, key);
        }
        return true;
    }
    if (!json_is_string(v)) {
        return damaged(errp, "%s\"%s\" is not a string", where, key);
    }
    *out = json_string_value(v);
    return true;
}

static bool
get_size(json_t *obj, const char *key, uint64_t *out, const char *where,
         GError **errp)
{
    json_t *v = json_object_get(obj, key);

    if (!json_is_integer(v) || json_integer_value(v) <= 0) {
        return damaged(errp, "%s\"%s\" is not a positive integer", where, key);
    }
    *out = (uint64_t)json_integer_value(v);
    return true;
}

static bool
parse_disk(json_t *d, int format, struct manifest_disk *md, GError **errp)
{
    const char *algo = NULL;
    g_autofree char *where = NULL;

    if (!json_is_object(d)) {
        return damaged(errp, "a disk entry is not an object");
    }
    if (!get_string(d, "disk", true, &md->disk, "disk: ", errp)) {
        return false;
    }
    if (!repo_name_valid(md->disk, "disk", NULL)) {
        return damaged(errp, "invalid disk name");
    }
    where = g_strdup_printf("disk %s: ", md->disk);
    if (!get_string(d, "type", true, &md->type, where, errp) ||
        !get_string(d, "reason", false, &md->reason, where, errp) ||
        !get_string(d, "file", true, &md->file, where, errp) ||
        !get_string(d, "chain", true, &md->chain, where, errp) ||
        !get_string(d, "bitmap", false, &md->bitmap, where, errp) ||
        !get_string(d, "backing", false, &md->backing, where, errp) ||
        !get_string(d, "sums", false, &md->sums, where, errp) ||
        !get_string(d, "sums_algorithm", md->sums != NULL, &algo, where,
                    errp) ||
        !get_size(d, "virtual_size", &md->virtual_size, where, errp) ||
        !get_size(d, "cluster_size", &md->cluster_size, where, errp)) {
        return false;
    }
    if (strcmp(md->type, "full") && strcmp(md->type, "incremental")) {
        return damaged(errp, "%sunknown type \"%s\"", where, md->type);
    }
    md->full = strcmp(md->type, "full") == 0;
    if (!repo_name_valid(md->file, "file", NULL) ||
        (md->sums && !repo_name_valid(md->sums, "file", NULL))) {
        return damaged(errp, "%sinvalid file name", where);
    }
    if (md->full != (md->backing == NULL)) {
        return damaged(errp, "%sa %s %s a backing file", where, md->type,
                       md->full ? "with" : "without");
    }
    if (md->cluster_size < 512 || md->cluster_size > (2u << 20) ||
        (md->cluster_size & (md->cluster_size - 1))) {
        return damaged(errp, "%sbad cluster_size %" PRIu64, where,
                       md->cluster_size);
    }
    if (algo && strcmp(algo, MANIFEST_SUMS_ALGORITHM) != 0) {
        return damaged(errp, "%sunknown sums_algorithm \"%s\"", where, algo);
    }
    return true;
}

static bool
parse_into(struct manifest *m, json_t *j, const char *vm, const char *point,
           GError **errp)
{
    json_t *fmt = json_object_get(j, "format");
    json_t *disks = json_object_get(j, "disks");
    size_t i;
    json_t *d;

    if (!json_is_object(j)) {
        return damaged(errp, "not a JSON object");
    }
    if (!json_is_integer(fmt)) {
        return damaged(errp, "no format version");
    }
    if (json_integer_value(fmt) < MANIFEST_FORMAT_MIN ||
        json_integer_value(fmt) > MANIFEST_FORMAT) {
        return damaged(errp,
                       "format %" JSON_INTEGER_FORMAT
                       " is not one this qbak reads (%d to %d)",
                       json_integer_value(fmt), MANIFEST_FORMAT_MIN,
                       MANIFEST_FORMAT);
    }
    m->format = (int)json_integer_value(fmt);
    if (!get_string(j, "vm", true, &m->vm, "", errp) ||
        !get_string(j, "point", true, &m->point, "", errp) ||
        !get_string(j, "parent", false, &m->parent, "", errp) ||
        !get_string(j, "time", true, &m->time, "", errp) ||
        !get_string(j, "consistency", true, &m->consistency, "", errp)) {
        return false;
    }
    if (vm && strcmp(m->vm, vm) != 0) {
        return damaged(errp, "names VM \"%s\", not %s", m->vm, vm);
    }
    if (point && strcmp(m->point, point) != 0) {
        return damaged(errp, "names point \"%s\", not %s", m->point, point);
    }
    if (!json_is_array(disks) || json_array_size(disks) == 0) {
        return damaged(errp, "\"disks\" is not a non-empty array");
    }
    m->n_disks = json_array_size(disks);
    m->disks = g_new0(struct manifest_disk, m->n_disks);
    json_array_foreach(disks, i, d)
    {
        if (!parse_disk(d, m->format, &m->disks[i], errp)) {
            return false;
        }
        for (size_t k = 0; k < i; k++) {
            if (strcmp(m->disks[k].disk, m->disks[i].disk) == 0) {
                return damaged(errp, "disk %s is listed twice",
                               m->disks[i].disk);
            }
        }
    }
    return true;
}

struct manifest *
manifest_parse(json_t *j, const char *vm, const char *point, GError **errp)
{
    struct manifest *m = g_new0(struct manifest, 1);

    m->json = json_incref(j);
    if (!parse_into(m, j, vm, point, errp)) {
        manifest_free(m);
        return NULL;
    }
    return m;
}

struct manifest *
manifest_read(int point_fd, const char *vm, const char *point, GError **errp)
{
    g_autoptr(GError) err = NULL;
    json_t *j = repo_read_json(point_fd, MANIFEST_NAME, &err);
    struct manifest *m;

    if (!j) {
        g_set_error(errp, QBAK_ERROR,
                    g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)
                        ? QBAK_ERROR_NOT_FOUND
                        : QBAK_ERROR_DAMAGED,
                    "%s", err->message);
        return NULL;
    }
    m = manifest_parse(j, vm, point, errp);
    json_decref(j);
    return m;
}

void
manifest_free(struct manifest *m)
{
    if (m) {
        json_decref(m->json);
        g_free(m->disks);
        g_free(m);
    }
}

const struct manifest_disk *
manifest_disk(const struct manifest *m, const char *disk)
{
    for (size_t i = 0; m && i < m->n_disks; i++) {
        if (strcmp(m->disks[i].disk, disk) == 0) {
            return &m->disks[i];
        }
    }
    return NULL;
}

json_t *
manifest_new(const char *vm, const char *point, const char *parent,
             const char *time, const char *qemu_version,
             const char *consistency, json_t *freeze, double duration_s)
{
    json_t *m =
        json_pack("{s:i, s:s, s:s, s:s?, s:s, s:s?, s:s, s:o?, s:[]}", "format",
                  MANIFEST_FORMAT, "vm", vm, "point", point, "parent", parent,
                  "time", time, "qemu_version", qemu_version, "consistency",
                  consistency, "freeze", freeze, "disks");

    json_object_set_new(m, "duration_s", json_real(duration_s));
    return m;
}

void
manifest_add_disk(json_t *m, const struct manifest_disk *d, json_t *extra)
{
    json_t *e = json_pack(
        "{s:s, s:s, s:s?, s:s, s:I, s:I, s:s, s:s?, s:s?}", "disk", d->disk,
        "type", d->full ? "full" : "incremental", "reason", d->reason, "file",
        d->file, "virtual_size", (json_int_t)d->virtual_size, "cluster_size",
        (json_int_t)d->cluster_size, "chain", d->chain, "bitmap", d->bitmap,
        "backing", d->backing);

    if (d->sums) {
        json_object_set_new(e, "sums", json_string(d->sums));
        json_object_set_new(e, "sums_algorithm",
                            json_string(MANIFEST_SUMS_ALGORITHM));
    }
    if (extra) {
        json_object_update(e, extra);
        json_decref(extra);
    }
    json_array_append_new(json_object_get(m, "disks"), e);
}

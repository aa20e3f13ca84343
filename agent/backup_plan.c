/* Planning a backup: which disks, and full or incremental for each.
 * See backup_int.h; the bitmap rules are at the top of backup.c. */
#include <string.h>

#include "agent/backup_int.h"
#include "agent/damage.h"
#include "agent/vm/settings.h"

void
backup_disk_free(struct disk *d)
{
    backup_target_free(d->target);
    qcow2_reader_free(d->backing);
    if (d->stale_bitmaps) {
        g_ptr_array_free(d->stale_bitmaps, true);
    }
    g_free(d->name);
    g_free(d->node);
    g_free(d->drv);
    g_free(d->reason);
    g_free(d->chain);
    g_free(d->bitmap);
    g_free(d->prev_bitmap);
    g_free(d->backing_rel);
    g_free(d->file);
    g_free(d->job_id);
    g_free(d->nbd_node);
    g_free(d);
}

/* The disk's name: its device id when the device has one. */
static char *
disk_name(json_t *dev, const char *node)
{
    const char *qdev = json_string_value(json_object_get(dev, "qdev"));
    const char *prefix = "/machine/peripheral/";

    if (qdev && g_str_has_prefix(qdev, prefix)) {
        const char *id = qdev + strlen(prefix);
        const char *end = strchr(id, '/');
        return end ? g_strndup(id, (gsize)(end - id)) : g_strdup(id);
    }
    return g_strdup(node);
}

static bool
wanted(const struct backup_opts *o, const char *name)
{
    if (!o->disks) {
        return true;
    }
    for (char **p = o->disks; *p; p++) {
        if (strcmp(*p, name) == 0) {
            return true;
        }
    }
    return false;
}

bool
backup_discover_disks(struct backup *b, struct vm_settings_pending *settings,
                      GError **errp)
{
    const struct backup_opts *o = b->opts;
    size_t i;
    json_t *dev;

    b->block = vm_settings_capture_query_block(settings, errp);
    if (!b->block) {
        return false;
    }
    if (!json_is_array(b->block)) {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "query-block: not an array");
        return false;
    }
    json_array_foreach(b->block, i, dev)
    {
        json_t *ins = json_object_get(dev, "inserted");
        const char *node = json_string_value(json_object_get(ins, "node-name"));
        json_t *vsize =
            json_object_get(json_object_get(ins, "image"), "virtual-size");
        struct disk *d;

        if (!json_is_object(ins) || !node || !json_object_get(dev, "qdev") ||
            json_is_true(json_object_get(ins, "ro"))) {
            continue;
        }
        if (!json_is_integer(vsize) || json_integer_value(vsize) <= 0) {
            continue;
        }
        d = g_new0(struct disk, 1);
        d->node = g_strdup(node);
        d->name = disk_name(dev, node);
        d->drv = g_strdup(json_string_value(json_object_get(ins, "drv")));
        d->size = (uint64_t)json_integer_value(vsize);
        d->standalone =
            g_strcmp0(d->drv, "qcow2") == 0 &&
            !json_object_get(ins, "backing_file") &&
            !json_object_get(json_object_get(ins, "image"), "backing-image");
        d->bitmaps = json_object_get(ins, "dirty-bitmaps");
        d->stale_bitmaps = g_ptr_array_new_with_free_func(g_free);
        if (!wanted(o, d->name)) {
            backup_disk_free(d);
            continue;
        }
        if (!repo_name_valid(d->name, "disk", errp)) {
            backup_disk_free(d);
            return false;
        }
        for (guint k = 0; k < b->disks->len; k++) {
            struct disk *other = b->disks->pdata[k];
            if (strcmp(other->name, d->name) == 0) {
                /* One's device id is the other's node name. */
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                            "two disks are named %s (nodes %s and %s): give "
                            "the devices ids that no node name uses",
                            d->name, other->node, d->node);
                backup_disk_free(d);
                return false;
            }
        }
        g_ptr_array_add(b->disks, d);
    }
    for (char **p = o->disks; p && *p; p++) {
        bool found = false;
        for (guint k = 0; k < b->disks->len; k++) {
            found |= strcmp(((struct disk *)b->disks->pdata[k])->name, *p) == 0;
        }
        if (!found) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "%s: no such writable disk in the VM", *p);
            return false;
        }
    }
    if (b->disks->len == 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "the VM has no writable disk attached to a device");
        return false;
    }
    return true;
}

static json_t *
find_bitmap(json_t *bitmaps, const char *name)
{
    size_t i;
    json_t *bm;

    json_array_foreach(bitmaps, i, bm)
    {
        if (g_strcmp0(json_string_value(json_object_get(bm, "name")), name) ==
            0) {
            return bm;
        }
    }
    return NULL;
}

/* Why the chain's bitmap cannot carry an incremental, or NULL if it can. */
static char *
bitmap_problem(struct disk *d, json_t *last, const char *bitmap)
{
    json_t *bm = find_bitmap(d->bitmaps, bitmap);
    uint64_t last_size =
        (uint64_t)json_integer_value(json_object_get(last, "virtual_size"));

    if (!bm) {
        return g_strdup_printf("bitmap %s is missing (QEMU restarted with a "
                               "non-persistent bitmap, or it was removed)",
                               bitmap);
    }
    if (json_is_true(json_object_get(bm, "inconsistent"))) {
        return g_strdup_printf("bitmap %s is inconsistent (QEMU did not shut "
                               "down cleanly)",
                               bitmap);
    }
    if (json_is_true(json_object_get(bm, "busy"))) {
        return g_strdup_printf("bitmap %s is busy", bitmap);
    }
    if (!json_is_true(json_object_get(bm, "recording"))) {
        return g_strdup_printf("bitmap %s is not recording", bitmap);
    }
    if (last_size != d->size) {
        return g_strdup_printf("disk size changed from %" PRIu64 " to %" PRIu64,
                               last_size, d->size);
    }
    return NULL;
}

/* Why the chain of disk at point `last' cannot carry an incremental: a
 * point of it marked damaged (by verify, restore or a backup), missing, or
 * with a manifest that does not validate; NULL when none is. */
static char *
chain_damage(struct backup *b, struct restore_point *last, const char *disk)
{
    struct restore_point *p = last;

    for (unsigned depth = 0; depth < QCOW2_MAX_CHAIN_DEPTH; depth++) {
        const struct manifest_disk *md = manifest_disk(p->info, disk);
        json_auto_t *mark = damage_read(b->repo, p->id);
        const char *mdisk = json_string_value(json_object_get(mark, "disk"));
        g_autofree char *parent = NULL;
        const char *slash;

        if (mark && (!mdisk || strcmp(mdisk, disk) == 0)) {
            return g_strdup_printf(
                "point %s is damaged (found by %s): %s", p->id,
                json_string_value(json_object_get(mark, "found_by")),
                json_string_value(json_object_get(mark, "reason")));
        }
        if (!md) {
            return g_strdup_printf("point %s of the chain has no disk %s",
                                   p->id, disk);
        }
        if (md->full) {
            return NULL;
        }
        /* "../<point>/<file>", as backup_plan_disk writes it */
        slash = g_str_has_prefix(md->backing, "../")
                    ? strchr(md->backing + 3, '/')
                    : NULL;
        if (!slash) {
            return g_strdup_printf("point %s: unexpected backing file %s",
                                   p->id, md->backing);
        }
        parent = g_strndup(md->backing + 3, (gsize)(slash - md->backing - 3));
        p = NULL;
        for (guint k = 0; k < b->points->len && !p; k++) {
            struct restore_point *q = b->points->pdata[k];
            p = strcmp(q->id, parent) == 0 ? q : NULL;
        }
        if (!p) {
            return g_strdup_printf("point %s of the chain is missing", parent);
        }
        if (p->damage) {
            return g_strdup_printf("point %s of the chain is damaged: %s",
                                   p->id, p->damage);
        }
    }
    return g_strdup("the chain is too long");
}

void
backup_plan_disk(struct backup *b, struct disk *d)
{
    struct restore_point *last = NULL;
    json_t *entry = NULL;
    const char *damaged = NULL;
    const char *bitmap;
    g_autofree char *path = NULL;
    g_autoptr(GError) err = NULL;
    g_autofree char *prefix = g_strdup_printf("qbak-%s-", b->repo->vm_id);
    size_t i;
    json_t *bm;

    for (guint k = b->points->len; k > 0 && !entry && !damaged; k--) {
        last = b->points->pdata[k - 1];
        entry = restore_point_disk(last, d->name);
        damaged = last->damage;
    }
    /* Every bitmap of ours in QEMU now is stale once this point commits:
     * the point brings its own generation (below). */
    bitmap = entry ? json_string_value(json_object_get(entry, "bitmap")) : NULL;
    json_array_foreach(d->bitmaps, i, bm)
    {
        const char *name = json_string_value(json_object_get(bm, "name"));
        if (name && g_str_has_prefix(name, prefix)) {
            g_ptr_array_add(d->stale_bitmaps, g_strdup(name));
        }
    }

    if (damaged) {
        /* It may have held this disk: nothing newer than it is known. */
        d->full = true;
        d->reason =
            g_strdup_printf("point %s is damaged: %s", last->id, damaged);
    } else if (!entry) {
        d->full = true; /* first backup of this disk: no reason needed */
    } else if ((d->reason = chain_damage(b, last, d->name))) {
        d->full = true;
    } else if (b->opts->full) {
        d->full = true;
        d->reason = g_strdup("full backup requested (--full)");
    } else if (!bitmap) {
        d->full = true;
        d->reason =
            g_strdup_printf("point %s has no bitmap for this disk", last->id);
    } else if ((d->reason = bitmap_problem(d, entry, bitmap))) {
        d->full = true;
    } else {
        const char *file = json_string_value(json_object_get(entry, "file"));
        path = g_build_filename(last->id, file ? file : "", NULL);
        d->backing = qcow2_reader_open(b->repo->vm_fd, path, &err);
        if (!d->backing) {
            d->full = true;
            d->reason = g_strdup_printf("previous point %s is unreadable: %s",
                                        last->id, err->message);
            /* Damaged or missing layers: marked, so that list, verify and
             * later backups know without opening them again. */
            if (err->domain == G_FILE_ERROR &&
                (err->code == G_FILE_ERROR_INVAL ||
                 err->code == G_FILE_ERROR_NOENT)) {
                damage_mark(b->repo, last->id, d->name, -1, err->message,
                            "backup", NULL);
            }
        } else if (qcow2_reader_virtual_size(d->backing) != d->size) {
            d->full = true;
            d->reason =
                g_strdup_printf("previous point %s has another size", last->id);
            g_clear_pointer(&d->backing, qcow2_reader_free);
        }
    }
    if (d->full) {
        char chain[17];
        g_snprintf(chain, sizeof(chain), "%08x%08x", g_random_int(),
                   g_random_int());
        d->chain = g_strdup(chain);
    } else {
        d->chain = g_strdup(json_string_value(json_object_get(entry, "chain")));
        d->prev_bitmap = g_strdup(bitmap);
        d->backing_rel = g_strdup_printf("../%s", path);
    }
    /* One generation of the chain's bitmap per point, random so that a
     * retry after a crash never meets its predecessor's: a disk image
     * swapped for an older copy outside QEMU carries an older generation,
     * and the next backup falls back to full instead of trusting it. */
    d->bitmap = g_strdup_printf("%s%s-%08x", prefix, d->chain, g_random_int());
}

void
backup_explain_full(struct backup *b, struct disk *d, const char *last_point)
{
    g_autofree char *path = NULL, *why = NULL;
    json_auto_t *prev = NULL;

    if (!d->full || !d->reason || !last_point ||
        !strstr(d->reason, "is missing")) {
        return;
    }
    path = g_strdup_printf("%s/%s", last_point, VM_SETTINGS_NAME);
    prev = repo_read_json(b->repo->vm_fd, path, NULL);
    why = vm_settings_new_process_reason(b->settings, prev, last_point);
    if (why) {
        char *r = g_strdup_printf("%s (%s)", why, d->reason);
        g_free(d->reason);
        d->reason = r;
    }
}

/* qbak list: see list.h. */
#include "agent/list.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "agent/damage.h"
#include "agent/repo.h"

static json_t *
point_json(struct repo_vm *r, struct restore_point *p)
{
    json_t *disks = json_array();
    json_t *damage = damage_read(r, p->id);
    bool sums = p->info != NULL;
    json_t *out;

    for (size_t i = 0; p->info && i < p->info->n_disks; i++) {
        const struct manifest_disk *d = &p->info->disks[i];
        json_array_append_new(disks, json_pack("{s:s, s:s, s:s, s:I, s:b}",
                                               "disk", d->disk, "type", d->type,
                                               "file", d->file, "virtual_size",
                                               (json_int_t)d->virtual_size,
                                               "checksums", d->sums != NULL));
        sums &= d->sums != NULL;
    }
    if (!damage && p->damage) {
        /* A manifest that does not validate: the point is listed, as
         * damaged, never silently dropped. */
        damage = json_pack("{s:n, s:n, s:s, s:s, s:n}", "disk", "offset",
                           "reason", p->damage, "found_by", "list", "time");
    }
    out = json_pack("{s:s, s:s?, s:s?, s:s?, s:o, s:b, s:I, s:b, s:o}", "point",
                    p->id, "parent", p->info ? p->info->parent : NULL, "time",
                    p->info ? p->info->time : NULL, "consistency",
                    p->info ? p->info->consistency : NULL, "disks", disks,
                    "protected", damage_point_protected(r, p->id), "size_bytes",
                    (json_int_t)repo_dir_bytes(r->vm_fd, p->id), "checksums",
                    sums, "damaged", damage ? damage : json_null());
    return out;
}

static json_t *
list_vm(const char *repo_path, const char *vm, GError **errp)
{
    struct repo_vm *r =
        repo_vm_open(repo_path, vm, false, REPO_LOCK_NONE, 0, errp);
    GPtrArray *points;
    json_t *arr;

    if (!r) {
        return NULL;
    }
    points = repo_scan_points(r, errp);
    if (!points) {
        repo_vm_close(r);
        return NULL;
    }
    arr = json_array();
    for (guint k = 0; k < points->len; k++) {
        json_array_append_new(arr, point_json(r, points->pdata[k]));
    }
    g_ptr_array_free(points, true);
    repo_vm_close(r);
    return json_pack("{s:s, s:o}", "vm", vm, "points", arr);
}

json_t *
list_run(const char *repo, const char *vm, GError **errp)
{
    GDir *dir;
    const char *name;
    json_t *vms;
    GPtrArray *names;

    if (vm) {
        return list_vm(repo, vm, errp);
    }
    dir = g_dir_open(repo, 0, errp);
    if (!dir) {
        return NULL;
    }
    names = g_ptr_array_new_with_free_func(g_free);
    while ((name = g_dir_read_name(dir))) {
        if (name[0] != '.') {
            g_ptr_array_add(names, g_strdup(name));
        }
    }
    g_dir_close(dir);
    g_ptr_array_sort(names, (GCompareFunc)g_ascii_strcasecmp);
    vms = json_array();
    for (guint i = 0; i < names->len; i++) {
        json_t *one = list_vm(repo, names->pdata[i], NULL);
        if (one) {
            json_array_append_new(vms, one);
        }
    }
    g_ptr_array_free(names, true);
    return json_pack("{s:o}", "vms", vms);
}

static void
print_vm(json_t *v)
{
    size_t i, k;
    json_t *p, *d;

    printf("%s:\n", json_string_value(json_object_get(v, "vm")));
    json_array_foreach(json_object_get(v, "points"), i, p)
    {
        g_autoptr(GString) line = g_string_new(NULL);
        json_t *dmg = json_object_get(p, "damaged");
        const char *time = json_string_value(json_object_get(p, "time"));

        json_array_foreach(json_object_get(p, "disks"), k, d)
        {
            g_string_append_printf(
                line, " %s(%s)", json_string_value(json_object_get(d, "disk")),
                json_string_value(json_object_get(d, "type")));
        }
        g_string_append_printf(
            line, "  %.1f MiB",
            (double)json_integer_value(json_object_get(p, "size_bytes")) /
                1048576.0);
        if (json_is_true(json_object_get(p, "protected"))) {
            g_string_append(line, "  protected");
        }
        if (json_is_object(dmg)) {
            const char *disk = json_string_value(json_object_get(dmg, "disk"));
            json_t *off = json_object_get(dmg, "offset");
            g_string_append_printf(line, "  DAMAGED");
            if (disk) {
                g_string_append_printf(line, " (%s", disk);
                if (json_is_integer(off)) {
                    g_string_append_printf(line,
                                           " at offset %" JSON_INTEGER_FORMAT,
                                           json_integer_value(off));
                }
                g_string_append(line, ")");
            }
            g_string_append_printf(
                line, ": %s",
                json_string_value(json_object_get(dmg, "reason")));
        } else if (!json_is_true(json_object_get(p, "checksums"))) {
            g_string_append(line, "  unverifiable (no checksums)");
        }
        printf("  %s  %s%s\n", json_string_value(json_object_get(p, "point")),
               time ? time : "-", line->str);
    }
}

void
list_print_human(json_t *res)
{
    size_t i;
    json_t *v;

    if (json_object_get(res, "vm")) {
        print_vm(res);
        return;
    }
    json_array_foreach(json_object_get(res, "vms"), i, v)
    {
        print_vm(v);
    }
}

/* qbak list: see list.h. */
#include "agent/list.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "agent/repo.h"

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
    points = repo_list_points(r, errp);
    repo_vm_close(r);
    if (!points) {
        return NULL;
    }
    arr = json_array();
    for (guint k = 0; k < points->len; k++) {
        struct restore_point *p = points->pdata[k];
        json_t *disks = json_array();
        size_t i;
        json_t *d;

        json_array_foreach(json_object_get(p->manifest, "disks"), i, d)
        {
            json_array_append_new(
                disks, json_pack("{s:O?, s:O?, s:O?, s:O?}", "disk",
                                 json_object_get(d, "disk"), "type",
                                 json_object_get(d, "type"), "file",
                                 json_object_get(d, "file"), "virtual_size",
                                 json_object_get(d, "virtual_size")));
        }
        json_array_append_new(
            arr,
            json_pack("{s:s, s:O?, s:O?, s:O?, s:o}", "point", p->id, "parent",
                      json_object_get(p->manifest, "parent"), "time",
                      json_object_get(p->manifest, "time"), "consistency",
                      json_object_get(p->manifest, "consistency"), "disks",
                      disks));
    }
    g_ptr_array_free(points, true);
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
        GString *line = g_string_new(NULL);
        json_array_foreach(json_object_get(p, "disks"), k, d)
        {
            g_string_append_printf(
                line, " %s(%s)", json_string_value(json_object_get(d, "disk")),
                json_string_value(json_object_get(d, "type")));
        }
        printf("  %s  %s%s\n", json_string_value(json_object_get(p, "point")),
               json_string_value(json_object_get(p, "time")), line->str);
        g_string_free(line, true);
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

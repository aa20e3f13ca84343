/* The point directories of a VM (prune_scan) and what is left of removed
 * ones (.pruned-*): their removal, put off to the end of a run
 * (prune_defer_removal, prune_finish_removals), and what a crashed run
 * left (prune_work_pending, prune_cleanup_removed). */
#include "agent/prune_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/damage.h"
#include "agent/error.h"
#include "io/file.h"

void
prune_dir_free(struct prune_dir *d)
{
    if (d) {
        g_free(d->id);
        json_decref(d->manifest);
        g_free(d->damaged);
        g_free(d);
    }
}

static gint
dir_cmp(gconstpointer a, gconstpointer b)
{
    return strcmp((*(struct prune_dir *const *)a)->id,
                  (*(struct prune_dir *const *)b)->id);
}

/* Why damaged.json says the point is damaged. */
static char *
read_damage(int pfd)
{
    g_autoptr(GError) err = NULL;
    json_t *j;
    char *why;

    if (faccessat(pfd, DAMAGE_NAME, F_OK, AT_SYMLINK_NOFOLLOW) < 0) {
        return NULL;
    }
    j = repo_read_json(pfd, DAMAGE_NAME, &err);
    if (!j) {
        return g_strdup_printf("%s: %s", DAMAGE_NAME, err->message);
    }
    why = g_strdup_printf("%s%s%s",
                          json_string_value(json_object_get(j, "disk"))
                              ? json_string_value(json_object_get(j, "disk"))
                              : "",
                          json_string_value(json_object_get(j, "disk")) ? ": "
                                                                        : "",
                          json_string_value(json_object_get(j, "reason"))
                              ? json_string_value(json_object_get(j, "reason"))
                              : "damaged");
    json_decref(j);
    return why;
}

GPtrArray *
prune_scan(struct repo_vm *r, GError **errp)
{
    GPtrArray *dirs =
        g_ptr_array_new_with_free_func((GDestroyNotify)prune_dir_free);
    DIR *d = file_opendir(r->vm_fd);
    struct dirent *de;

    if (!d) {
        qbak_errno(errp, errno, "%s/%s", r->repo_path, r->vm);
        g_ptr_array_free(dirs, true);
        return NULL;
    }
    while ((de = readdir(d))) {
        struct prune_dir *p;
        json_t *m;
        int pfd;

        if (de->d_name[0] == '.' ||
            (de->d_type != DT_DIR && de->d_type != DT_UNKNOWN)) {
            continue;
        }
        pfd = openat(r->vm_fd, de->d_name,
                     O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (pfd < 0) {
            continue;
        }
        m = repo_read_json(pfd, MANIFEST_NAME, NULL);
        if (!m || g_strcmp0(json_string_value(json_object_get(m, "point")),
                            de->d_name) != 0) {
            json_decref(m);
            close(pfd);
            continue;
        }
        p = g_new0(struct prune_dir, 1);
        p->id = g_strdup(de->d_name);
        p->manifest = m;
        p->delisted =
            faccessat(pfd, REPO_POINT_PRUNING, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
        p->protected =
            faccessat(pfd, PROTECTED_NAME, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
        p->damaged = read_damage(pfd);
        close(pfd);
        g_ptr_array_add(dirs, p);
    }
    closedir(d);
    g_ptr_array_sort(dirs, dir_cmp);
    return dirs;
}

static void
remove_dir_contents(int fd)
{
    DIR *d = file_opendir(fd);
    struct dirent *de;

    if (!d) {
        return;
    }
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            unlinkat(fd, de->d_name, 0);
        }
    }
    closedir(d);
}

static bool
remove_pruned_dir(struct repo_vm *r, const char *name, GError **errp)
{
    int fd =
        openat(r->vm_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0) {
        return qbak_errno(errp, errno, "%s", name);
    }
    remove_dir_contents(fd);
    close(fd);
    if (unlinkat(r->vm_fd, name, AT_REMOVEDIR) < 0) {
        return qbak_errno(errp, errno, "%s: rmdir", name);
    }
    return true;
}

/* The removal of directory name (a .pruned-* leftover) put off to the end
 * of the run, when nothing more is to be made durable: freeing blocks
 * makes the journal commits that follow slower (discards), and those
 * commits are the fsyncs that order the prune's steps.  Removed at once
 * when the leftovers would hold more than PRUNE_DEFER_BYTES, so that a
 * long prune never needs much more space than it frees. */
#define PRUNE_DEFER_BYTES (UINT64_C(1) << 30)
bool
prune_defer_removal(struct prune_ctx *c, const char *name, GError **errp)
{
    uint64_t bytes = repo_dir_bytes(c->r->vm_fd, name);

    if (c->pruned_bytes + bytes > PRUNE_DEFER_BYTES) {
        return remove_pruned_dir(c->r, name, errp);
    }
    if (c->pruned == NULL) {
        c->pruned = g_ptr_array_new_with_free_func(g_free);
    }
    g_ptr_array_add(c->pruned, g_strdup(name));
    c->pruned_bytes += bytes;
    return true;
}

bool
prune_work_pending(struct repo_vm *r)
{
    DIR *d = file_opendir(r->vm_fd);
    struct dirent *de;
    bool pending = false;

    if (!d) {
        return true; /* let the full scan say what is wrong */
    }
    while (!pending && (de = readdir(d))) {
        g_autofree char *marker = NULL;

        if (!strcmp(de->d_name, PRUNE_JOURNAL) ||
            g_str_has_prefix(de->d_name, PRUNED_PREFIX)) {
            pending = true;
        } else if (de->d_name[0] != '.') {
            marker = g_strdup_printf("%s/%s", de->d_name, REPO_POINT_PRUNING);
            pending =
                faccessat(r->vm_fd, marker, F_OK, AT_SYMLINK_NOFOLLOW) == 0;
        }
    }
    closedir(d);
    return pending;
}

unsigned
prune_cleanup_removed(struct repo_vm *r)
{
    DIR *d = file_opendir(r->vm_fd);
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    struct dirent *de;
    unsigned n = 0;

    if (!d) {
        return 0;
    }
    while ((de = readdir(d))) {
        if (g_str_has_prefix(de->d_name, PRUNED_PREFIX)) {
            g_ptr_array_add(names, g_strdup(de->d_name));
        }
    }
    closedir(d);
    for (guint i = 0; i < names->len; i++) {
        n += remove_pruned_dir(r, names->pdata[i], NULL);
    }
    if (names->len) {
        fsync(r->vm_fd);
    }
    return n;
}

void
prune_finish_removals(struct prune_ctx *c)
{
    if (c->pruned == NULL) {
        return;
    }
    for (guint i = 0; i < c->pruned->len; i++) {
        /* Not fsynced: one left by a crash is removed by the next run. */
        remove_pruned_dir(c->r, c->pruned->pdata[i], NULL);
    }
    g_ptr_array_free(c->pruned, true);
    c->pruned = NULL;
    c->pruned_bytes = 0;
}

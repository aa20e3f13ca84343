/* File-level access to restore points (qbak ls, find, get, mount, umount,
 * index): the engines behind agent/cmd/, each returning its JSON result.
 * See guestfs.h for how points are opened. */
#ifndef QBAK_AGENT_FILES_FILES_H
#define QBAK_AGENT_FILES_FILES_H

#include <glib.h>
#include <jansson.h>

#include "agent/files/guestfs.h"

/* ls: {"point", "disk", "fs", "path", "entries": [...]}, or with no path,
 * no --fs and several file systems: {"point", "disk", "filesystems"}. */
json_t *files_ls(const struct files_opts *o, const char *path, GError **errp);

/* find: {"vm", "disk", "fs", "points", "indexed", "matches": [...]}. */
json_t *files_find(const struct files_opts *o, const char *name_glob,
                   const char *path_glob, GError **errp);

/* index: catalogs for the selected points (every disk unless o->disk). */
json_t *files_index(const struct files_opts *o, GError **errp);

struct files_get_opts {
    char **paths;
    const char *output; /* "-": standard output */
};
/* get: {"point", "disk", "fs", "output", "files", "dirs", "symlinks",
 * "bytes", "skipped": [{"path", "reason"}]}. */
json_t *files_get(const struct files_opts *o, const struct files_get_opts *g,
                  GError **errp);

/* mount: serves the point at mountpoint from a background process and
 * returns once it shows there: {"point", "disk", "fs", "mountpoint",
 * "pid"}. */
json_t *files_mount_point(const struct files_opts *o, const char *mountpoint,
                          bool allow_other, GError **errp);
/* umount: unmounts and waits for the serving process to end. */
json_t *files_umount_point(const char *mountpoint, int wait_ms, GError **errp);

/* Shared by ls and get: the mounted file system of one point. */
struct files_session *files_open_one(const struct files_opts *o,
                                     GPtrArray **fss, struct files_fs **fs,
                                     bool fs_required, GError **errp);

/* "drwxr-xr-x" for mode. */
void files_mode_string(uint32_t mode, char out[11]);

#endif

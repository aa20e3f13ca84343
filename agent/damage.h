/* Markers in a committed point directory that several commands share:
 *
 *   damaged.json  written durably when verify, restore or a backup finds
 *                 the point's data damaged (or its chain's): {"disk",
 *                 "offset" (guest offset of the first bad cluster, or
 *                 null), "reason", "found_by" ("verify", "restore",
 *                 "backup"), "time"}.  The next backup of that disk is
 *                 full; list shows the point as damaged.
 *   protected     an empty file: prune keeps the point.
 */
#ifndef QBAK_AGENT_DAMAGE_H
#define QBAK_AGENT_DAMAGE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent/repo.h"

#define DAMAGE_NAME "damaged.json"
#define PROTECTED_NAME "protected"

/* Writes vm_dir/point/damaged.json (replacing an older one) and makes it
 * durable: file fsynced, renamed into place, directory fsynced.
 * disk may be NULL (the manifest itself), offset < 0 for none. */
bool damage_mark(struct repo_vm *r, const char *point, const char *disk,
                 int64_t offset, const char *reason, const char *found_by,
                 GError **errp);

/* The point's damaged.json (new reference), or NULL when it has none.  A
 * marker that does not parse still means damaged: a stand-in object
 * saying so is returned. */
json_t *damage_read(struct repo_vm *r, const char *point);

/* Whether point/protected exists. */
bool damage_point_protected(struct repo_vm *r, const char *point);

#endif

/* qbak list: committed restore points, oldest first. */
#ifndef QBAK_AGENT_LIST_H
#define QBAK_AGENT_LIST_H

#include <glib.h>
#include <jansson.h>

/* vm NULL: every VM in the repository ({"vms": [...]}); else
 * {"vm", "points": [{"point", "parent", "time", "disks": [...]}]}. */
json_t *list_run(const char *repo, const char *vm, GError **errp);
void list_print_human(json_t *res);

#endif

/* The VM's settings, recorded with every point (<point>/vm.json): the QEMU
 * command line (the monitor's peer process: SO_PEERCRED gives its pid,
 * /proc/PID/cmdline its arguments), its working directory and binary, the
 * QEMU version, the pinned machine type, the QMP query results needed to
 * rebuild an equivalent VM, and the devices hot-plugged after start (not
 * on the command line).  What could not be captured is listed in it. */
#ifndef QBAK_AGENT_VM_SETTINGS_H
#define QBAK_AGENT_VM_SETTINGS_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "qmp/client.h"

#define VM_SETTINGS_NAME "vm.json"
#define VM_SETTINGS_FORMAT 1
/* Set in the environment of a QEMU that `qbak restore --start` runs:
 * "<vm>/<point>", so its first backup says why it is a full. */
#define VM_RESTORED_ENV "QBAK_RESTORED_FROM"

/* Never fails: a query QEMU refuses, or /proc that cannot be read, becomes
 * an entry of "not_captured".  qmp_path, qga_path: the sockets qbak was
 * given (NULL: none).  Returns a new reference. */
json_t *vm_settings_capture(struct qmp_client *qmp, const char *qmp_path,
                            const char *qga_path, int timeout_ms);
/* The same in two halves, so that qbak's own work overlaps QEMU's
 * answering: _start sends the queries, _finish collects the answers
 * (before any change to QEMU's block graph or devices: the capture is of
 * the VM as it was, not of qbak's nodes) and frees p. */
struct vm_settings_pending;
struct vm_settings_pending *vm_settings_capture_start(struct qmp_client *qmp,
                                                      const char *qmp_path,
                                                      const char *qga_path,
                                                      int timeout_ms);
json_t *vm_settings_capture_finish(struct vm_settings_pending *p);
/* On a failure before _finish: frees p without waiting for QEMU (answers
 * that come later are dropped with the client). */
void vm_settings_capture_abandon(struct vm_settings_pending *p);
/* query-block's answer, the first of the capture's (a new reference), as
 * soon as it is in; NULL with *errp if it failed. */
json_t *vm_settings_capture_query_block(struct vm_settings_pending *p,
                                        GError **errp);

/* Write settings (borrowed) as name in dirfd, mode 0600 (a command line may
 * hold secrets); not fsynced: the point's commit makes it durable. */
bool vm_settings_write(int dirfd, const char *name, json_t *settings,
                       GError **errp);

/* For the backup's result: {"file", "rebuildable", "hotplugged",
 * "not_captured"}.  New reference. */
json_t *vm_settings_summary(json_t *settings);

/* Why a disk's full backup happened, when QEMU is another process than at
 * the previous point (a restored or restarted VM): a sentence, or NULL.
 * prev: that point's settings (borrowed, may be NULL). */
char *vm_settings_new_process_reason(json_t *now, json_t *prev,
                                     const char *prev_point);

#endif

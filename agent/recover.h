/* What a crashed or killed qbak left behind, cleaned up before any new work
 * on a VM's chain.  Also the names
 * that mark what qbak creates in QEMU as this repository's. */
#ifndef QBAK_AGENT_RECOVER_H
#define QBAK_AGENT_RECOVER_H

#include <glib.h>
#include <stdbool.h>

#include "agent/repo.h"
#include "qmp/client.h"

/* "qbak-<vmid8>-": prefix of our job ids and NBD node names in QEMU (node
 * names are limited to 31 characters, so the disk's index, not its name,
 * follows).  Returned strings are the caller's. */
char *recover_qemu_prefix(const struct repo_vm *r);
char *recover_job_id(const struct repo_vm *r, const char *point, unsigned k);
char *recover_node_name(const struct repo_vm *r, unsigned k);

/* Our jobs in QEMU: finalized when their point was committed, cancelled
 * otherwise (bitmap-mode=never: neither changes a bitmap); then dismissed.  Our
 * NBD nodes are deleted.  Each action is appended to `done` as a sentence. The
 * caller holds the VM's lock. */
bool recover_qemu(struct qmp_client *qmp, struct repo_vm *r, int timeout_ms,
                  GPtrArray *done, GError **errp);

/* Test-only crash points: QBAK_CRASH_AT=<name> kills qbak with SIGKILL
 * there, so tests can prove recovery from every state; "<name>:stop" stops
 * it with SIGSTOP instead.  Names: transaction, running, pending, fsynced,
 * committed. */
void recover_crash_point(const char *name);

#endif

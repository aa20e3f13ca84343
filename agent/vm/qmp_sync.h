/* A blocking QMP client for the small processes that outlive a qbak
 * command (the memory capture's guardian, the --live restore's pin
 * holder): no ring, one connection, every read bounded. */
#ifndef QBAK_AGENT_VM_QMP_SYNC_H
#define QBAK_AGENT_VM_QMP_SYNC_H

#include <glib.h>
#include <jansson.h>

/* Connect, read the greeting, negotiate: the fd, or -1. */
int qmp_sync_open(const char *path, int timeout_ms);
/* Execute cmd (args taken): the whole reply object ({"return"} or
 * {"error"}), a new reference, or NULL when the connection failed or
 * nothing came in timeout_ms. */
json_t *qmp_sync_call(int fd, const char *cmd, json_t *args, int timeout_ms);

#endif

/* An NBD client (libnbd) driven from qbak's io_uring loop.
 *
 * libnbd does the protocol; its non-blocking API (nbd_aio_*) is fed from the
 * ring: the socket is polled with IORING_OP_POLL_ADD for the directions
 * libnbd asks for (nbd_aio_get_direction), and the readiness is handed
 * back with nbd_aio_notify_read/_write.  One thread, one ring, many
 * requests in flight; no thread ever blocks on the socket.
 *
 * The caller sends commands on nbd_client_handle() (nbd_aio_pread,
 * nbd_aio_block_status, ...) and calls nbd_client_kick() after each batch,
 * so the polls follow what libnbd now wants.  Completion callbacks run
 * inside ring_run_once(); they must not call libnbd on the same handle.
 */
#ifndef QBAK_IO_NBD_CLIENT_H
#define QBAK_IO_NBD_CLIENT_H

#include <glib.h>
#include <libnbd.h>
#include <stdbool.h>
#include <stdint.h>

#include "io/ring.h"

struct nbd_client;

/* Connects over sock (a connected stream socket; the client takes it) to
 * export `name`, asking for the meta contexts in `contexts` (NULL-ended,
 * may be NULL), driving the ring until the handshake is done or
 * timeout_ms has passed.  Errors in G_FILE_ERROR. */
struct nbd_client *nbd_client_connect(struct ring *ring, int sock,
                                      const char *name,
                                      const char *const *contexts,
                                      int timeout_ms, GError **errp);
/* Disconnects (commands in flight are abandoned: their callbacks run with
 * an error) and waits for the ring's polls to end. */
void nbd_client_free(struct nbd_client *c);

struct nbd_handle *nbd_client_handle(struct nbd_client *c);
/* Re-arms the socket polls for what libnbd wants now. */
void nbd_client_kick(struct nbd_client *c);
/* The connection is dead (peer gone, protocol error): the first error, or
 * NULL while it is alive. */
const char *nbd_client_error(struct nbd_client *c);
/* The server agreed to this meta context. */
bool nbd_client_has_context(struct nbd_client *c, const char *name);
uint64_t nbd_client_size(struct nbd_client *c);

#endif

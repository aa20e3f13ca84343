/* NBD server, fixed newstyle, simple replies (doc/proto.md of the NBD
 * project).  One export per connection; QEMU's backup job is the client.
 *
 * The protocol core (struct nbd_conn) does no I/O: the glue asks where the
 * next bytes go (nbd_conn_want), reads exactly that many, and reports them
 * (nbd_conn_received); it sends what nbd_conn_output gathers.  Write
 * payloads are received straight into the request slot's aligned buffer,
 * so the hot path copies nothing.  That also makes it fuzzable.
 *
 * Backpressure: a fixed number of request slots, each owning one buffer of
 * max_block bytes.  A request header is only read when a slot is free; a
 * slot is freed once its reply (and READ payload) has been sent.
 */
#ifndef QBAK_IO_NBD_H
#define QBAK_IO_NBD_H

#include <glib.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/ring.h"

#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_WRITE_ZEROES 6

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

/* Errors on the wire (the NBD spec's own numbering). */
#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

/* Hard limit on a request's length regardless of what is advertised. */
#define NBD_MAX_BLOCK_LIMIT (32u << 20)

struct nbd_conn;

/* One validated request handed to the backend.  buf holds a WRITE's payload,
 * or receives a READ's data (len bytes, aligned to 4096). */
struct nbd_request {
    uint64_t cookie;
    uint64_t offset;
    uint32_t len;
    uint16_t type;
    uint16_t flags;
    void *buf;
    struct nbd_conn *conn;
    /* private to the core */
    unsigned slot;
};

struct nbd_backend {
    /* Start req; the backend calls nbd_conn_request_done() exactly once,
     * now or later.  Only READ, WRITE, WRITE_ZEROES, TRIM and FLUSH
     * (not with no_flush) arrive here, already checked against the export
     * size. */
    void (*request_fn)(void *opaque, struct nbd_request *req);
    void *opaque;
};

struct nbd_export {
    const char *name;
    uint64_t size;
    uint32_t min_block, pref_block, max_block;
    bool read_only;
    /* Offer neither FLUSH nor FUA: the backend makes writes durable when
     * it decides.  A client that sends them anyway gets EINVAL. */
    bool no_flush;
};

/* export and backend are borrowed and must outlive the connection. */
struct nbd_conn *nbd_conn_new(const struct nbd_export *exp,
                              const struct nbd_backend *backend,
                              unsigned slots);
void nbd_conn_free(struct nbd_conn *c);

/* Where the next bytes go: *len == 0 means read nothing now (waiting for a
 * slot, closing, or dead). */
void nbd_conn_want(struct nbd_conn *c, void **buf, size_t *len);
/* n bytes (<= *len of the last want) arrived. false: the peer broke the
 * protocol beyond an error reply; the connection is dead (see error). */
bool nbd_conn_received(struct nbd_conn *c, size_t n);

/* Gather up to max pending output buffers; returns the count. */
int nbd_conn_output(struct nbd_conn *c, struct iovec *iov, int max);
/* n bytes of what nbd_conn_output gathered were sent. */
void nbd_conn_output_sent(struct nbd_conn *c, size_t n);

/* err: 0 or an NBD_E* value for the reply. */
void nbd_conn_request_done(struct nbd_request *req, uint32_t err);

/* The export was chosen and requests may flow. */
bool nbd_conn_transmitting(const struct nbd_conn *c);
/* The client asked to close (DISC, ABORT) or the connection is dead: once
 * no request is in flight and output is empty, the socket can be closed. */
bool nbd_conn_closing(const struct nbd_conn *c);
bool nbd_conn_idle(const struct nbd_conn *c);
/* Why the connection died, or NULL. */
const char *nbd_conn_error(const struct nbd_conn *c);
bool nbd_conn_got_disc(const struct nbd_conn *c);
unsigned nbd_conn_inflight(const struct nbd_conn *c);

/* Called after a request completes, so the glue can send the reply. */
void nbd_conn_set_wake(struct nbd_conn *c, void (*wake_fn)(void *),
                       void *opaque);
/* The socket failed or the server is shutting down: no more input. */
void nbd_conn_abort(struct nbd_conn *c, const char *why);
/* Requests the backend still holds (their buffers are in use). */
unsigned nbd_conn_backend_busy(const struct nbd_conn *c);

/* The socket side: serves the one client at the other end of fd, a
 * connected stream socket (taken), typically one end of a socketpair whose
 * other end was handed to the client.  There is no listening socket, so no
 * second or late connection can ever be served. */
struct nbd_server;

struct nbd_server *nbd_server_new(struct ring *ring, int fd,
                                  const struct nbd_export *exp,
                                  const struct nbd_backend *backend,
                                  unsigned slots);
/* Shuts the connection down and waits for its ops. */
void nbd_server_free(struct nbd_server *s);
/* The client has sent something: it is there. */
bool nbd_server_connected(const struct nbd_server *s);
/* The client has gone (cleanly or not) and nothing is in flight. */
bool nbd_server_finished(const struct nbd_server *s);
/* Error text if the connection failed (protocol, socket), else NULL. */
const char *nbd_server_error(const struct nbd_server *s);
/* Stop serving: used when a backup is abandoned. */
void nbd_server_shutdown(struct nbd_server *s);

#endif

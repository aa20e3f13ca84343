/* NBD server socket glue on the ring: see nbd.h. */
#include "io/nbd.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_IOV 64

struct nbd_server {
    struct ring *ring;
    int fd;
    struct nbd_conn *conn;
    const struct nbd_export *exp;
    const struct nbd_backend *backend;
    unsigned slots;

    struct ring_op recv_op;
    struct ring_op send_op;
    bool recv_pending, send_pending;
    bool client_spoke; /* bytes have come from the client */
    struct iovec iov[MAX_IOV];
    struct msghdr msg;

    bool finished;
    char *error;
};

static void pump(struct nbd_server *s);

static void
set_error(struct nbd_server *s, const char *prefix, const char *detail)
{
    if (!s->error) {
        s->error = g_strconcat(prefix, detail, NULL);
    }
    if (s->conn) {
        nbd_conn_abort(s->conn, s->error);
    }
}

static void
wake(void *opaque)
{
    pump(opaque);
}

static void
recv_done(struct ring_op *op, int res)
{
    struct nbd_server *s = container_of(op, struct nbd_server, recv_op);

    s->recv_pending = false;
    if (res == -EAGAIN || res == -EINTR) {
        pump(s);
        return;
    }
    if (res > 0) {
        s->client_spoke = true;
    }
    if (res < 0) {
        set_error(s, "NBD connection: ", g_strerror(-res));
    } else if (res == 0) {
        set_error(s, "", "NBD client disconnected without NBD_CMD_DISC");
    } else if (!nbd_conn_received(s->conn, (size_t)res)) {
        set_error(s, "NBD client: ", nbd_conn_error(s->conn));
    }
    pump(s);
}

static void
send_done(struct ring_op *op, int res)
{
    struct nbd_server *s = container_of(op, struct nbd_server, send_op);

    s->send_pending = false;
    if (res == -EAGAIN || res == -EINTR) {
        pump(s);
        return;
    }
    if (res <= 0) {
        set_error(s,
                  "NBD connection: send: ", g_strerror(res < 0 ? -res : EPIPE));
    } else {
        nbd_conn_output_sent(s->conn, (size_t)res);
    }
    pump(s);
}

/* Keep one recv and one send in flight as the core allows; close the socket
 * once the client is done and nothing references the connection. */
static void
pump(struct nbd_server *s)
{
    struct io_uring_sqe *sqe;
    void *buf;
    size_t len;
    int n;

    if (s->fd < 0) {
        return;
    }
    if (!s->recv_pending && !s->error) {
        nbd_conn_want(s->conn, &buf, &len);
        if (len > 0) {
            sqe = ring_get_sqe(s->ring);
            io_uring_prep_recv(sqe, s->fd, buf, len, MSG_WAITALL);
            ring_queue(s->ring, sqe, &s->recv_op);
            s->recv_pending = true;
        }
    }
    if (!s->send_pending && !s->error) {
        n = nbd_conn_output(s->conn, s->iov, MAX_IOV);
        if (n > 0) {
            memset(&s->msg, 0, sizeof(s->msg));
            s->msg.msg_iov = s->iov;
            s->msg.msg_iovlen = (size_t)n;
            sqe = ring_get_sqe(s->ring);
            io_uring_prep_sendmsg(sqe, s->fd, &s->msg, MSG_NOSIGNAL);
            ring_queue(s->ring, sqe, &s->send_op);
            s->send_pending = true;
        }
    }
    if (s->error && (s->recv_pending || s->send_pending)) {
        /* Make the pending socket ops complete so the socket can close. */
        shutdown(s->fd, SHUT_RDWR);
    }
    if ((s->error || (nbd_conn_closing(s->conn) && nbd_conn_idle(s->conn))) &&
        !s->recv_pending && !s->send_pending &&
        nbd_conn_backend_busy(s->conn) == 0) {
        close(s->fd);
        s->fd = -1;
        s->finished = true;
    }
}

struct nbd_server *
nbd_server_new(struct ring *ring, int fd, const struct nbd_export *exp,
               const struct nbd_backend *backend, unsigned slots)
{
    struct nbd_server *s = g_new0(struct nbd_server, 1);

    s->ring = ring;
    s->fd = fd;
    s->exp = exp;
    s->backend = backend;
    s->slots = slots;
    s->recv_op.done_fn = recv_done;
    s->send_op.done_fn = send_done;
    s->conn = nbd_conn_new(exp, backend, slots);
    nbd_conn_set_wake(s->conn, wake, s);
    pump(s); /* the greeting */
    return s;
}

void
nbd_server_shutdown(struct nbd_server *s)
{
    if (s->fd >= 0) {
        set_error(s, "", "NBD server shut down");
        pump(s);
    }
}

void
nbd_server_free(struct nbd_server *s)
{
    if (!s) {
        return;
    }
    nbd_server_shutdown(s);
    while (s->recv_pending || s->send_pending ||
           nbd_conn_backend_busy(s->conn) > 0) {
        if (ring_run_once(s->ring, -1) < 0) {
            break;
        }
    }
    if (s->fd >= 0) {
        close(s->fd);
    }
    nbd_conn_free(s->conn);
    g_free(s->error);
    g_free(s);
}

bool
nbd_server_connected(const struct nbd_server *s)
{
    return s->client_spoke;
}

bool
nbd_server_finished(const struct nbd_server *s)
{
    return s->finished;
}

const char *
nbd_server_error(const struct nbd_server *s)
{
    return s->error;
}

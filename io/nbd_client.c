/* libnbd on the ring: see nbd_client.h. */
#include "io/nbd_client.h"

#include <errno.h>
#include <poll.h>
#include <unistd.h>

struct nbd_poll {
    struct ring_op op;
    struct nbd_client *c;
    unsigned dir; /* LIBNBD_AIO_DIRECTION_READ or _WRITE */
    bool armed;
};

struct nbd_client {
    struct ring *ring;
    struct nbd_handle *h;
    int fd;
    struct nbd_poll in, out;
    bool closing;
    char *error;
};

static void
client_fail(struct nbd_client *c, const char *what)
{
    if (!c->error) {
        const char *e = nbd_get_error();
        c->error = g_strdup_printf("%s: %s", what, e ? e : "failed");
    }
}

static void
poll_arm(struct nbd_client *c, struct nbd_poll *p)
{
    struct io_uring_sqe *sqe;

    if (p->armed || c->closing) {
        return;
    }
    sqe = ring_get_sqe(c->ring);
    io_uring_prep_poll_add(
        sqe, c->fd, p->dir == LIBNBD_AIO_DIRECTION_READ ? POLLIN : POLLOUT);
    ring_queue(c->ring, sqe, &p->op);
    p->armed = true;
}

void
nbd_client_kick(struct nbd_client *c)
{
    unsigned dir;

    if (c->closing || c->error) {
        return;
    }
    if (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h)) {
        client_fail(c, "NBD connection lost");
        return;
    }
    dir = nbd_aio_get_direction(c->h);
    if (dir & LIBNBD_AIO_DIRECTION_READ) {
        poll_arm(c, &c->in);
    }
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) {
        poll_arm(c, &c->out);
    }
}

static void
poll_done(struct ring_op *op, int res)
{
    struct nbd_poll *p = container_of(op, struct nbd_poll, op);
    struct nbd_client *c = p->c;
    int r = 0;

    p->armed = false;
    if (c->closing || c->error) {
        return;
    }
    if (res < 0 && res != -ECANCELED) {
        errno = -res;
        c->error = g_strdup_printf("NBD socket poll: %s", g_strerror(-res));
        return;
    }
    /* libnbd may no longer want this direction (the other poll's
     * notification moved its state on): a stale readiness is dropped. */
    if (nbd_aio_get_direction(c->h) & p->dir) {
        r = p->dir == LIBNBD_AIO_DIRECTION_READ ? nbd_aio_notify_read(c->h)
                                                : nbd_aio_notify_write(c->h);
    }
    if (r < 0) {
        client_fail(c, "NBD");
        return;
    }
    nbd_client_kick(c);
}

struct nbd_client *
nbd_client_connect(struct ring *ring, int sock, const char *name,
                   const char *const *contexts, int timeout_ms, GError **errp)
{
    struct nbd_client *c = g_new0(struct nbd_client, 1);
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

    c->ring = ring;
    c->fd = sock;
    c->in = (struct nbd_poll){
        .op.done_fn = poll_done, .c = c, .dir = LIBNBD_AIO_DIRECTION_READ};
    c->out = (struct nbd_poll){
        .op.done_fn = poll_done, .c = c, .dir = LIBNBD_AIO_DIRECTION_WRITE};
    c->h = nbd_create();
    if (!c->h) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOMEM, "nbd_create: %s",
                    nbd_get_error());
        close(sock);
        g_free(c);
        return NULL;
    }
    if (nbd_set_export_name(c->h, name) < 0) {
        goto fail;
    }
    for (const char *const *p = contexts; p && *p; p++) {
        if (nbd_add_meta_context(c->h, *p) < 0) {
            goto fail;
        }
    }
    /* The reads fill the whole buffer: libnbd need not zero it first. */
    nbd_set_pread_initialize(c->h, false);
    if (nbd_aio_connect_socket(c->h, sock) < 0) {
        goto fail;
    }
    nbd_client_kick(c);
    while (!c->error && nbd_aio_is_connecting(c->h)) {
        if (g_get_monotonic_time() > deadline) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "NBD handshake: no answer in %d s", timeout_ms / 1000);
            nbd_client_free(c);
            return NULL;
        }
        ring_run_once(ring, 100);
    }
    if (c->error || !nbd_aio_is_ready(c->h)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "NBD handshake: %s", c->error ? c->error : nbd_get_error());
        nbd_client_free(c);
        return NULL;
    }
    return c;
fail:
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED, "NBD: %s",
                nbd_get_error());
    nbd_client_free(c);
    return NULL;
}

void
nbd_client_free(struct nbd_client *c)
{
    if (!c) {
        return;
    }
    /* Polls still armed hold the op: remove them and wait for their
     * completions before the memory goes. */
    c->closing = true;
    for (struct nbd_poll *p = &c->in; p; p = p == &c->in ? &c->out : NULL) {
        if (p->armed) {
            struct io_uring_sqe *sqe = ring_get_sqe(c->ring);
            io_uring_prep_poll_remove(sqe, (__u64)(uintptr_t)&p->op);
            io_uring_sqe_set_data(sqe, NULL);
        }
    }
    while ((c->in.armed || c->out.armed) && ring_run_once(c->ring, -1) >= 0) {
    }
    if (c->h) {
        /* Closes the socket; callbacks of commands in flight run now. */
        nbd_close(c->h);
    }
    g_free(c->error);
    g_free(c);
}

struct nbd_handle *
nbd_client_handle(struct nbd_client *c)
{
    return c->h;
}

const char *
nbd_client_error(struct nbd_client *c)
{
    if (!c->error && (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h))) {
        client_fail(c, "NBD connection lost");
    }
    return c->error;
}

bool
nbd_client_has_context(struct nbd_client *c, const char *name)
{
    return nbd_can_meta_context(c->h, name) == 1;
}

uint64_t
nbd_client_size(struct nbd_client *c)
{
    int64_t s = nbd_get_size(c->h);
    return s > 0 ? (uint64_t)s : 0;
}

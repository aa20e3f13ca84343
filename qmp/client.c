/* QMP/QGA client: see client.h. */
#include "qmp/client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define READ_CHUNK 65536

struct qmp_client {
    struct ring *ring;
    enum qmp_parser_mode mode;
    int fd;
    struct qmp_parser *parser;
    struct ring_op poll_op;
    bool poll_pending;
    bool closed;
    bool awaiting_greeting; /* QMP handshake: keep the first message */
    char *error;            /* why the connection broke */
    GError *proto_error;    /* parser error, kept for the next caller */

    int64_t next_id;
    GHashTable *waiting; /* id -> reply (NULL until it arrives) */
    GQueue events;
    int qemu_version;
    int64_t sync_id; /* QGA: the guest-sync-delimited id we await */
    bool synced;
};

GQuark
qmp_error_quark(void)
{
    return g_quark_from_static_string("qmp-error");
}

gint64
qmp_now_ms(void)
{
    return g_get_monotonic_time() / 1000;
}

static void arm_poll(struct qmp_client *c);

static void
mark_closed(struct qmp_client *c, const char *why)
{
    if (!c->closed) {
        c->closed = true;
        c->error = g_strdup(why);
    }
}

/* A message from the peer: a reply to a call we wait for, an event, or
 * noise to drop.  msg is taken. */
/* Whether id is the oldest command still without a reply.  QEMU answers
 * in the order commands were sent (qbak never asks for out-of-band
 * execution), so with several in flight (qmp_client_send_many) a reply
 * for a later one cannot be QEMU's. */
static bool
oldest_waiting(struct qmp_client *c, int64_t id)
{
    GHashTableIter it;
    gpointer k, v;

    g_hash_table_iter_init(&it, c->waiting);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        if (!v && (int64_t)(intptr_t)k < id) {
            return false;
        }
    }
    return true;
}

static void
dispatch(struct qmp_client *c, json_t *msg)
{
    json_t *id = json_object_get(msg, "id");
    gpointer key, value;

    if (json_object_get(msg, "event") || json_object_get(msg, "QMP") ||
        c->awaiting_greeting) {
        if (g_queue_get_length(&c->events) >= 100000) {
            json_decref(msg); /* a flood of events: keep memory bounded */
            return;
        }
        g_queue_push_tail(&c->events, msg);
        return;
    }
    if (c->mode == QMP_PARSER_QGA &&
        json_is_integer(json_object_get(msg, "return")) && !id && c->sync_id &&
        json_integer_value(json_object_get(msg, "return")) == c->sync_id) {
        /* guest-sync-delimited answers with the id as its return value. */
        c->synced = true;
        json_decref(msg);
        return;
    }
    if (!json_is_integer(id)) {
        json_decref(msg);
        return;
    }
    key = GINT_TO_POINTER(0);
    if (g_hash_table_lookup_extended(
            c->waiting, (gconstpointer)(intptr_t)json_integer_value(id), &key,
            &value) &&
        !value && oldest_waiting(c, json_integer_value(id))) {
        g_hash_table_insert(c->waiting, key, msg);
        return;
    }
    /* An unknown id, a call that already timed out, a second reply, or
     * one that overtakes an older command's: none is QEMU's answer. */
    json_decref(msg);
}

static void
read_available(struct qmp_client *c)
{
    char buf[READ_CHUNK];
    json_t *msg;
    GError *err = NULL;
    ssize_t n;
    int r;

    for (;;) {
        n = read(c->fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            break;
        }
        if (n <= 0) {
            mark_closed(c, n == 0 ? "connection closed by peer"
                                  : g_strerror(errno));
            break;
        }
        qmp_parser_feed(c->parser, buf, (size_t)n);
        while ((r = qmp_parser_next(c->parser, &msg, &err)) > 0) {
            dispatch(c, msg);
        }
        if (r < 0) {
            if (c->mode == QMP_PARSER_QGA) {
                /* Junk from the guest: the parser stays poisoned, dropping
                 * everything until the 0xFF of the next resync; a call
                 * meanwhile times out rather than trust what follows. */
                g_clear_error(&err);
                continue;
            }
            if (!c->proto_error) {
                c->proto_error = err;
            } else {
                g_error_free(err);
            }
            err = NULL;
            mark_closed(c, "protocol error");
            break;
        }
    }
}

static void
poll_done(struct ring_op *op, int res)
{
    struct qmp_client *c = container_of(op, struct qmp_client, poll_op);

    c->poll_pending = false;
    if (c->fd < 0) {
        return; /* being freed */
    }
    if (res < 0 && res != -EINTR && res != -ECANCELED) {
        mark_closed(c, g_strerror(-res));
        return;
    }
    read_available(c);
    arm_poll(c);
}

static void
arm_poll(struct qmp_client *c)
{
    struct io_uring_sqe *sqe;

    if (c->poll_pending || c->closed || c->fd < 0) {
        return;
    }
    sqe = ring_get_sqe(c->ring);
    io_uring_prep_poll_add(sqe, c->fd, POLLIN);
    ring_queue(c->ring, sqe, &c->poll_op);
    c->poll_pending = true;
}

static bool
closed_error(struct qmp_client *c, const char *what, GError **errp)
{
    if (c->proto_error) {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_PROTOCOL, "%s: %s", what,
                    c->proto_error->message);
    } else {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_CLOSED, "%s: %s", what,
                    c->error ? c->error : "connection closed");
    }
    return false;
}

/* pass_fd >= 0 goes with the first byte sent (SCM_RIGHTS): QEMU takes the
 * fds that arrive with a command as that command's. */
static bool
write_all(struct qmp_client *c, const char *buf, size_t len, int pass_fd,
          const char *what, int timeout_ms, GError **errp)
{
    struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};

    while (len > 0) {
        struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } control;
        ssize_t n;

        if (pass_fd >= 0) {
            struct cmsghdr *cmsg;

            memset(&control, 0, sizeof(control));
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof(control.buf);
            cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &pass_fd, sizeof(int));
        }
        n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            if (poll(&pfd, 1, timeout_ms) <= 0) {
                g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                            "%s: peer does not read its socket", what);
                return false;
            }
            continue;
        }
        if (n < 0) {
            mark_closed(c, g_strerror(errno));
            return closed_error(c, what, errp);
        }
        pass_fd = -1;
        buf += n;
        len -= (size_t)n;
    }
    return true;
}

static bool
send_command(struct qmp_client *c, const char *cmd, json_t *args, int64_t id,
             int pass_fd, int timeout_ms, GError **errp)
{
    json_t *req = json_pack("{s:s}", "execute", cmd);
    g_autofree char *json = NULL;
    g_autofree char *text = NULL;

    if (args) {
        json_object_set_new(req, "arguments", args);
    }
    if (id) {
        json_object_set_new(req, "id", json_integer(id));
    }
    json = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    if (c->closed) {
        return closed_error(c, cmd, errp);
    }
    /* One send: the peer starts on the command as soon as it is complete,
     * and a second send would then wait for it. */
    text = g_strconcat(json, "\n", NULL);
    return write_all(c, text, strlen(text), pass_fd, cmd, timeout_ms, errp);
}

json_t *
qmp_client_call(struct qmp_client *c, const char *cmd, json_t *args,
                int timeout_ms, GError **errp)
{
    return qmp_client_call_fd(c, cmd, args, -1, timeout_ms, errp);
}

/* Run the ring until the reply to id arrived (returned, taken from the
 * table), the deadline passed or the connection failed (NULL, *errp). */
static json_t *
await_reply(struct qmp_client *c, const char *cmd, int64_t id, gint64 deadline,
            int timeout_ms, GError **errp)
{
    gpointer key = (gpointer)(intptr_t)id;
    json_t *reply;

    while (!(reply = g_hash_table_lookup(c->waiting, key))) {
        gint64 left = deadline - qmp_now_ms();
        if (c->closed) {
            g_hash_table_remove(c->waiting, key);
            closed_error(c, cmd, errp);
            return NULL;
        }
        if (left <= 0) {
            /* Removing the id drops a late reply when it comes. */
            g_hash_table_remove(c->waiting, key);
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "%s: no reply within %d ms", cmd, timeout_ms);
            return NULL;
        }
        arm_poll(c);
        ring_run_once(c->ring, (int)MIN(left, 1000));
    }
    g_hash_table_steal(c->waiting, key);
    return reply;
}

/* The "return" of a reply (a new reference), or NULL with *errp.  reply
 * is taken. */
static json_t *
reply_value(const char *cmd, json_t *reply, GError **errp)
{
    json_t *ret, *err;

    ret = json_object_get(reply, "return");
    err = json_object_get(reply, "error");
    if (ret) {
        json_incref(ret);
        json_decref(reply);
        return ret;
    }
    if (json_is_object(err)) {
        const char *desc = json_string_value(json_object_get(err, "desc"));
        g_set_error(errp, QMP_ERROR, QMP_ERROR_FAILED, "%s: %s", cmd,
                    desc ? desc : "error without description");
    } else {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "%s: reply has neither return nor error", cmd);
    }
    json_decref(reply);
    return NULL;
}

json_t *
qmp_client_call_fd(struct qmp_client *c, const char *cmd, json_t *args,
                   int pass_fd, int timeout_ms, GError **errp)
{
    int64_t id = ++c->next_id;
    gpointer key = (gpointer)(intptr_t)id;
    gint64 deadline = qmp_now_ms() + timeout_ms;
    json_t *reply;

    g_hash_table_insert(c->waiting, key, NULL);
    if (!send_command(c, cmd, args, id, pass_fd, timeout_ms, errp)) {
        g_hash_table_remove(c->waiting, key);
        return NULL;
    }
    reply = await_reply(c, cmd, id, deadline, timeout_ms, errp);
    return reply ? reply_value(cmd, reply, errp) : NULL;
}

bool
qmp_client_send_many(struct qmp_client *c, struct qmp_call *calls, size_t n,
                     int timeout_ms)
{
    GString *text = g_string_new(NULL);
    GError *send_err = NULL;

    /* One write for all: QEMU reads them as they come and runs them in
     * order, answering each (its queue holds 8; beyond that it simply
     * stops reading until it catches up). */
    for (size_t i = 0; i < n; i++) {
        json_t *req;
        g_autofree char *json = NULL;

        calls[i].id = ++c->next_id;
        calls[i].result = NULL;
        calls[i].error = NULL;
        req = json_pack("{s:s, s:I}", "execute", calls[i].cmd, "id",
                        (json_int_t)calls[i].id);
        if (calls[i].args) {
            json_object_set_new(req, "arguments", calls[i].args);
            calls[i].args = NULL;
        }
        json = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        g_string_append(text, json);
        g_string_append_c(text, '\n');
        g_hash_table_insert(c->waiting, (gpointer)(intptr_t)calls[i].id, NULL);
    }
    if (c->closed) {
        closed_error(c, n ? calls[0].cmd : "qmp", &send_err);
    } else if (n) {
        write_all(c, text->str, text->len, -1, calls[0].cmd, timeout_ms,
                  &send_err);
    }
    g_string_free(text, true);
    for (size_t i = 0; send_err && i < n; i++) {
        g_hash_table_remove(c->waiting, (gpointer)(intptr_t)calls[i].id);
        calls[i].error = g_error_copy(send_err);
    }
    if (send_err) {
        g_error_free(send_err);
        return false;
    }
    return true;
}

bool
qmp_client_wait_many(struct qmp_client *c, struct qmp_call *calls, size_t n,
                     int timeout_ms)
{
    gint64 deadline = qmp_now_ms() + timeout_ms;
    bool all_ok = true;

    for (size_t i = 0; i < n; i++) {
        json_t *reply = NULL;

        if (!calls[i].error && !calls[i].result) {
            reply = await_reply(c, calls[i].cmd, calls[i].id, deadline,
                                timeout_ms, &calls[i].error);
        }
        if (reply) {
            calls[i].result = reply_value(calls[i].cmd, reply, &calls[i].error);
        }
        all_ok &= calls[i].error == NULL;
    }
    return all_ok;
}

bool
qmp_client_call_many(struct qmp_client *c, struct qmp_call *calls, size_t n,
                     int timeout_ms)
{
    qmp_client_send_many(c, calls, n, timeout_ms);
    return qmp_client_wait_many(c, calls, n, timeout_ms);
}

void
qmp_client_forget_many(struct qmp_client *c, struct qmp_call *calls, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (calls[i].id) {
            g_hash_table_remove(c->waiting, (gpointer)(intptr_t)calls[i].id);
        }
    }
    qmp_calls_clear(calls, n);
}

void
qmp_calls_clear(struct qmp_call *calls, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        json_decref(calls[i].args);
        json_decref(calls[i].result);
        g_clear_error(&calls[i].error);
        calls[i].args = calls[i].result = NULL;
    }
}

json_t *
qmp_client_pop_event(struct qmp_client *c)
{
    return g_queue_pop_head(&c->events);
}

bool
qmp_client_wait_event(struct qmp_client *c, int timeout_ms, GError **errp)
{
    gint64 deadline = qmp_now_ms() + timeout_ms;

    while (g_queue_is_empty(&c->events)) {
        gint64 left = deadline - qmp_now_ms();
        if (c->closed) {
            return closed_error(c, "waiting for events", errp);
        }
        if (left <= 0) {
            return false;
        }
        arm_poll(c);
        ring_run_once(c->ring, (int)MIN(left, 1000));
    }
    return true;
}

int
qmp_client_qemu_version(const struct qmp_client *c)
{
    return c->qemu_version;
}

/* QMP greeting, then capabilities negotiation. */
static bool
qmp_handshake(struct qmp_client *c, int timeout_ms, GError **errp)
{
    gint64 deadline = qmp_now_ms() + timeout_ms;
    json_t *greeting = NULL, *ver, *ret;

    c->awaiting_greeting = true; /* the first message, whatever it is */
    while (!greeting) {
        gint64 left = deadline - qmp_now_ms();
        if (c->closed) {
            return closed_error(c, "QMP greeting", errp);
        }
        if (left <= 0) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "no QMP greeting within %d ms", timeout_ms);
            return false;
        }
        /* The greeting has no id and is no event: it comes first, so take
         * the first message, raw. */
        arm_poll(c);
        ring_run_once(c->ring, (int)MIN(left, 1000));
        greeting = g_queue_pop_head(&c->events);
        if (greeting && !json_is_object(json_object_get(greeting, "QMP"))) {
            /* Whatever speaks first on this socket is no QMP monitor. */
            g_set_error(errp, QMP_ERROR, QMP_ERROR_PROTOCOL,
                        "QMP greeting: the first message is not one (is "
                        "this a QMP monitor socket?)");
            json_decref(greeting);
            return false;
        }
    }
    c->awaiting_greeting = false;
    ver = json_object_get(
        json_object_get(json_object_get(greeting, "QMP"), "version"), "qemu");
    c->qemu_version =
        (int)(json_integer_value(json_object_get(ver, "major")) * 10000 +
              json_integer_value(json_object_get(ver, "minor")) * 100 +
              json_integer_value(json_object_get(ver, "micro")));
    json_decref(greeting);
    ret = qmp_client_call(c, "qmp_capabilities", NULL, timeout_ms, errp);
    if (!ret) {
        return false;
    }
    json_decref(ret);
    return true;
}

int
qmp_client_peer_pid(const struct qmp_client *c)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);

    if (c->fd < 0 ||
        getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
        cred.pid <= 0) {
        return -1;
    }
    return (int)cred.pid;
}

struct qmp_client *
qmp_client_connect(struct ring *ring, const char *path,
                   enum qmp_parser_mode mode, int timeout_ms, GError **errp)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    struct qmp_client *c;
    struct stat st;
    int fd;

    if (strlen(path) >= sizeof(sun.sun_path)) {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_CLOSED,
                    "%s: socket path too long", path);
        return NULL;
    }
    strcpy(sun.sun_path, path);
    /* A socket planted by another (unprivileged) user could feed us a fake
     * monitor: only ours or root's are trusted. */
    if (stat(path, &st) == 0 && st.st_uid != geteuid() && st.st_uid != 0) {
        g_set_error(errp, QMP_ERROR, QMP_ERROR_CLOSED,
                    "%s: socket owned by uid %u, not by us or root: refused",
                    path, (unsigned)st.st_uid);
        return NULL;
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        int err = errno;
        g_set_error(errp, QMP_ERROR, QMP_ERROR_CLOSED, "%s: connect: %s", path,
                    g_strerror(err));
        if (fd >= 0) {
            close(fd);
        }
        return NULL;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

    c = g_new0(struct qmp_client, 1);
    c->ring = ring;
    c->mode = mode;
    c->fd = fd;
    c->parser = qmp_parser_new(mode, QMP_PARSER_DEFAULT_MAX_MSG);
    c->poll_op.done_fn = poll_done;
    c->waiting =
        g_hash_table_new_full(NULL, NULL, NULL, (GDestroyNotify)json_decref);
    g_queue_init(&c->events);
    if (mode == QMP_PARSER_QMP && !qmp_handshake(c, timeout_ms, errp)) {
        g_prefix_error(errp, "%s: ", path);
        qmp_client_free(c);
        return NULL;
    }
    return c;
}

void
qmp_client_free(struct qmp_client *c)
{
    struct io_uring_sqe *sqe;
    json_t *ev;

    if (!c) {
        return;
    }
    if (c->poll_pending) {
        /* The poll op points into c: cancel it and reap it before free. */
        sqe = ring_get_sqe(c->ring);
        io_uring_prep_cancel(sqe, &c->poll_op, 0);
        io_uring_sqe_set_data(sqe, NULL);
        io_uring_submit(&c->ring->uring);
        shutdown(c->fd, SHUT_RDWR);
        while (c->poll_pending) {
            ring_run_once(c->ring, 1000);
        }
    }
    close(c->fd);
    c->fd = -1;
    while ((ev = g_queue_pop_head(&c->events))) {
        json_decref(ev);
    }
    g_hash_table_destroy(c->waiting);
    qmp_parser_free(c->parser);
    g_clear_error(&c->proto_error);
    g_free(c->error);
    g_free(c);
}

bool
qga_client_sync(struct qmp_client *c, int timeout_ms, GError **errp)
{
    gint64 deadline = qmp_now_ms() + timeout_ms;
    const char ff = (char)0xff;

    c->synced = false;
    while (!c->synced) {
        gint64 left = deadline - qmp_now_ms();
        gint64 resend = qmp_now_ms() + 1500;
        if (left <= 0) {
            g_set_error(errp, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "guest agent did not answer guest-sync-delimited "
                        "within %d ms",
                        timeout_ms);
            return false;
        }
        /* A fresh id each time: an old answer never satisfies a new sync. */
        c->sync_id = g_random_int_range(1, G_MAXINT32);
        if (!write_all(c, &ff, 1, -1, "guest-sync-delimited", (int)left,
                       errp) ||
            !send_command(c, "guest-sync-delimited",
                          json_pack("{s:I}", "id", (json_int_t)c->sync_id), 0,
                          -1, (int)left, errp)) {
            return false;
        }
        /* The first bytes after a reconnect may be lost: resend until one
         * sync is answered. */
        while (!c->synced && qmp_now_ms() < MIN(resend, deadline)) {
            if (c->closed) {
                return closed_error(c, "guest-sync-delimited", errp);
            }
            arm_poll(c);
            ring_run_once(c->ring, 200);
        }
    }
    return true;
}

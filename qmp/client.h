/* QMP and QGA client on the shared ring.
 *
 * Calls look synchronous to the caller but run the ring while they wait, so
 * other I/O (QEMU connecting to our NBD server during blockdev-add, NBD
 * writes during a job) keeps flowing.  Replies are matched by id, events
 * queued, every call has a deadline, and a reply that arrives after its
 * call timed out is dropped, never taken for another call's reply.
 */
#ifndef QBAK_QMP_CLIENT_H
#define QBAK_QMP_CLIENT_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

#include "io/ring.h"
#include "qmp/parser.h"

#define QMP_ERROR qmp_error_quark()
GQuark qmp_error_quark(void);

enum qmp_error_code {
    QMP_ERROR_FAILED,   /* the peer answered with an error */
    QMP_ERROR_TIMEOUT,  /* no answer in time */
    QMP_ERROR_CLOSED,   /* connection closed or broken */
    QMP_ERROR_PROTOCOL, /* the peer sent something unacceptable */
};

struct qmp_client;

/* Connect to a unix socket.  QMP mode reads the greeting and negotiates
 * capabilities; QGA mode only connects (see qga_client_sync). */
struct qmp_client *qmp_client_connect(struct ring *ring, const char *path,
                                      enum qmp_parser_mode mode, int timeout_ms,
                                      GError **errp);
void qmp_client_free(struct qmp_client *c);

/* Execute cmd (args taken, may be NULL).  Returns the "return" value (a new
 * reference) or NULL with *errp: "cmd: <desc from peer>" for an error
 * reply. */
json_t *qmp_client_call(struct qmp_client *c, const char *cmd, json_t *args,
                        int timeout_ms, GError **errp);
/* The same, passing pass_fd (borrowed; the peer gets a copy) along with the
 * command over the unix socket, as QMP's getfd expects. */
json_t *qmp_client_call_fd(struct qmp_client *c, const char *cmd, json_t *args,
                           int pass_fd, int timeout_ms, GError **errp);

/* One command of a pipelined batch. */
struct qmp_call {
    const char *cmd; /* borrowed */
    json_t *args;    /* taken by qmp_client_call_many (may be NULL) */
    json_t *result;  /* out: the "return" value (a new reference), or NULL */
    GError *error;   /* out: why not, as qmp_client_call's */
    gint64 id;       /* private: the request's id */
};

/* Send n commands at once and wait for every reply: one round trip instead
 * of n.  QEMU runs them in order, each whether or not the one before
 * failed, so a later command may depend on an earlier one only if its own
 * failure is then harmless.  True if every call succeeded; each call's
 * result or error is set either way (qmp_calls_clear releases them). */
bool qmp_client_call_many(struct qmp_client *c, struct qmp_call *calls,
                          size_t n, int timeout_ms);
/* The two halves of qmp_client_call_many, so that other work on the ring
 * (an fsync) overlaps QEMU's: send_many returns at once (false if the
 * batch could not be sent: every call's error is then set); wait_many
 * waits for the replies (the calls stay alive in between). */
bool qmp_client_send_many(struct qmp_client *c, struct qmp_call *calls,
                          size_t n, int timeout_ms);
bool qmp_client_wait_many(struct qmp_client *c, struct qmp_call *calls,
                          size_t n, int timeout_ms);
void qmp_calls_clear(struct qmp_call *calls, size_t n);
/* Gives up on sent calls without waiting: their answers, when they come,
 * are dropped (and hold no later answer back); then qmp_calls_clear. */
void qmp_client_forget_many(struct qmp_client *c, struct qmp_call *calls,
                            size_t n);

/* Pop the oldest queued event (new reference), or NULL. */
json_t *qmp_client_pop_event(struct qmp_client *c);
/* Run the ring until an event is queued, the deadline passes (false, no
 * error) or the connection fails (false, *errp). */
bool qmp_client_wait_event(struct qmp_client *c, int timeout_ms, GError **errp);

/* "major.minor.micro" of QEMU from the greeting, as one number
 * major*10000 + minor*100 + micro; 0 in QGA mode. */
int qmp_client_qemu_version(const struct qmp_client *c);

/* The pid of the process at the other end of the socket (SO_PEERCRED):
 * QEMU itself for its monitor.  -1 when the kernel does not say. */
int qmp_client_peer_pid(const struct qmp_client *c);

/* QGA: resynchronise (0xFF then guest-sync-delimited with a random id,
 * resent until answered), discarding everything before the answer. */
bool qga_client_sync(struct qmp_client *c, int timeout_ms, GError **errp);

/* A monotonic clock in milliseconds, for deadlines. */
gint64 qmp_now_ms(void);

#endif

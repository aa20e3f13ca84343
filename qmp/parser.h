/* Framing of JSON messages on a QMP or QGA stream.  No I/O: bytes in,
 * json_t out (hiredis' reader).  Every byte is untrusted.
 *
 *     qmp_parser_feed(p, buf, n);
 *     while ((r = qmp_parser_next(p, &msg, &err)) > 0) dispatch(msg);
 *
 * Top-level values are split by tracking nesting and strings (as QEMU's
 * json-streamer does), not by newlines, then parsed with jansson (duplicate
 * keys: the last one wins).  Only space, tab, CR and LF may separate
 * messages.  Each byte is scanned once, however the stream is cut into
 * reads, and the messages and errors that come out do not depend on that
 * cut (QGA sentinels aside, below).
 *
 * Limits: a message (from its '{' to its '}') larger than max_msg bytes,
 * nesting deeper than QMP_PARSER_MAX_DEPTH ({ and [ together), invalid
 * UTF-8 or invalid JSON, or a top-level value that is not an object, is an
 * error.  Size, depth, mismatched brackets and bytes that cannot start an
 * object are reported as soon as the offending byte is scanned, without
 * waiting for the message to end.  After an error the parser is poisoned
 * (every later qmp_parser_next() fails, saying so and quoting the first
 * error; fed bytes are dropped) until qmp_parser_reset(): a peer that sent
 * garbage is disconnected, not trusted to recover.
 *
 * Errors are in the GError domain g_quark_from_static_string(
 * "qmp-parser-error"); codes are not part of the API.  Messages are one
 * printable line ("QMP message exceeds 16777216 bytes", "nesting deeper
 * than 64 at byte N", "invalid JSON from peer: <jansson's text> at byte
 * N", ...) where N counts bytes fed since qmp_parser_new() or the last
 * qmp_parser_reset().
 *
 * QGA resynchronisation: the guest agent answers guest-sync-delimited with
 * a 0xFF byte before the reply.  In QMP_PARSER_QGA mode qmp_parser_feed()
 * treats every 0xFF byte as the sentinel, inside a string too (0xFF is
 * never valid UTF-8, and the agent may have been cut off mid-string): it
 * discards everything buffered before it, including complete messages not
 * yet taken with qmp_parser_next() (they are stale), clears the poison, and
 * is counted (qmp_parser_sentinels()).  So errors reported before the
 * sentinel are survivable in QGA mode; a client that is syncing ignores
 * them until the count moves.  In QMP mode 0xFF is an error like any other
 * invalid byte.
 */
#ifndef QBAK_QMP_PARSER_H
#define QBAK_QMP_PARSER_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#define QMP_PARSER_MAX_DEPTH 64
#define QMP_PARSER_DEFAULT_MAX_MSG (16u << 20)

enum qmp_parser_mode { QMP_PARSER_QMP, QMP_PARSER_QGA };

struct qmp_parser;

/* max_msg 0 means QMP_PARSER_DEFAULT_MAX_MSG. */
struct qmp_parser *qmp_parser_new(enum qmp_parser_mode mode, size_t max_msg);
void qmp_parser_free(struct qmp_parser *p);

/* Append n bytes; never fails (a message over the limit is reported by the
 * next qmp_parser_next()).  Memory held is bounded by max_msg plus n as
 * long as the caller drains with qmp_parser_next() after every feed;
 * messages fed but not yet taken stay buffered. */
void qmp_parser_feed(struct qmp_parser *p, const void *buf, size_t n);

/* 1: *msg is a new reference to the next complete message (a JSON object).
 * 0: need more bytes, *msg is NULL.  -1: protocol error, *msg is NULL,
 * *errp set, parser poisoned. */
int qmp_parser_next(struct qmp_parser *p, json_t **msg, GError **errp);

/* Forget buffered bytes and poison; start afresh (byte offsets in error
 * messages count from here).  The sentinel count is kept. */
void qmp_parser_reset(struct qmp_parser *p);

/* text with control characters (and, when it is not valid UTF-8, every
 * byte >= 0x80) written as \xNN: text from a peer is printed only through
 * this.  Returns a new string. */
char *qmp_parser_printable(const char *text);

/* QGA mode: number of 0xFF sentinels seen so far over the parser's life
 * (not reset by qmp_parser_reset(), so a client can compare it with the
 * value it saw when it sent guest-sync-delimited).  Always 0 in QMP mode. */
unsigned qmp_parser_sentinels(const struct qmp_parser *p);

#endif

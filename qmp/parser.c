/* Framing of JSON messages on a QMP or QGA stream; see parser.h.
 *
 * Bytes are appended to one buffer.  qmp_parser_next() scans forward from
 * where the previous call stopped, tracking string/escape state and a stack
 * of open brackets, until the top-level object closes; only then are that
 * object's exact bytes handed to jansson.  Each byte is therefore scanned
 * once and parsed once, however the stream is split into reads.
 *
 * Buffer layout, all offsets into buf:
 *
 *     0 ...... head ............ scan ........ len ...... cap
 *     consumed | current message | not scanned |  free
 *
 * head is where the current message starts (or, between messages, the next
 * byte to look at); consumed bytes are dropped by the memmove in
 * qmp_parser_reserve() at the next feed.
 */
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "qmp/parser.h"

/* Internal codes; callers tell errors apart only by domain and message. */
enum qmp_parser_error_code {
    QMP_PARSER_ERROR_TOO_BIG,
    QMP_PARSER_ERROR_TOO_DEEP,
    QMP_PARSER_ERROR_INVALID_JSON,
    QMP_PARSER_ERROR_UNEXPECTED_BYTE,
    QMP_PARSER_ERROR_NOT_OBJECT,
    QMP_PARSER_ERROR_POISONED,
};

/* Between messages, a buffer larger than this is released. */
#define QMP_PARSER_KEEP_BUF (64u << 10)

/* The bracket stack is a bitmap, one bit per open level. */
G_STATIC_ASSERT(QMP_PARSER_MAX_DEPTH <= 64);

struct qmp_parser {
    enum qmp_parser_mode mode;
    size_t max_msg;

    unsigned char *buf;
    size_t cap;
    size_t len;
    size_t head;
    size_t scan;
    /* Stream offset of buf[0], counted since new/reset, for messages. */
    guint64 base;

    /* Scanner state at buf[scan]; depth 0 means between messages. */
    unsigned depth;
    guint64 arrays; /* bit d-1 set: level d was opened by '[' */
    bool in_string;
    bool escape;

    /* Non-NULL: the error that poisoned the parser. */
    char *poison;
    unsigned sentinels;
};

static GQuark
qmp_parser_error_quark(void)
{
    return g_quark_from_static_string("qmp-parser-error");
}

struct qmp_parser *
qmp_parser_new(enum qmp_parser_mode mode, size_t max_msg)
{
    struct qmp_parser *p = g_new0(struct qmp_parser, 1);

    p->mode = mode;
    if (max_msg == 0) {
        max_msg = QMP_PARSER_DEFAULT_MAX_MSG;
    }
    /* Keeps max_msg + 1 and the capacity doubling free of overflow. */
    p->max_msg = MIN(max_msg, SIZE_MAX / 4);
    return p;
}

void
qmp_parser_free(struct qmp_parser *p)
{
    if (!p) {
        return;
    }
    g_free(p->buf);
    g_free(p->poison);
    g_free(p);
}

/* Forget every buffered byte and any half-scanned message, but not the
 * poison nor the stream offset. */
static void
qmp_parser_discard(struct qmp_parser *p)
{
    p->base += p->len;
    g_clear_pointer(&p->buf, g_free);
    p->cap = 0;
    p->len = 0;
    p->head = 0;
    p->scan = 0;
    p->depth = 0;
    p->arrays = 0;
    p->in_string = false;
    p->escape = false;
}

void
qmp_parser_reset(struct qmp_parser *p)
{
    qmp_parser_discard(p);
    g_clear_pointer(&p->poison, g_free);
    p->base = 0;
}

unsigned
qmp_parser_sentinels(const struct qmp_parser *p)
{
    return p->sentinels;
}

/* Make room for n more bytes after dropping the consumed ones.  While the
 * caller drains between feeds, what is kept is at most one partial message
 * (<= max_msg, or next() would have failed) plus the new bytes. */
static void
qmp_parser_reserve(struct qmp_parser *p, size_t n)
{
    size_t want;
    size_t limit = p->max_msg + 1;
    size_t cap;

    if (p->head > 0) {
        memmove(p->buf, p->buf + p->head, p->len - p->head);
        p->base += p->head;
        p->len -= p->head;
        p->scan -= p->head;
        p->head = 0;
    }
    /* Both the buffer and the caller's n bytes exist in memory. */
    g_assert(n <= SIZE_MAX - p->len);
    want = p->len + n;
    if (want <= p->cap) {
        return;
    }
    if (want > limit) {
        /* A single feed larger than a message, or a caller that does not
         * drain: take exactly what is needed, no doubling. */
        cap = want;
    } else {
        /* Doubling keeps byte-at-a-time feeding linear; the limit keeps a
         * maximal message from costing twice max_msg. */
        cap = p->cap ? p->cap : 4096;
        while (cap < want) {
            cap *= 2;
        }
        cap = MIN(cap, limit);
    }
    p->buf = g_realloc(p->buf, cap);
    p->cap = cap;
}

/* QGA mode: 0xFF is the guest agent's resynchronisation sentinel.  It is
 * honoured anywhere, inside strings too: it is never valid UTF-8, so a
 * string holding it is garbage anyway, and the agent may well have been
 * cut off in the middle of a string before it sent the sentinel.
 * Returns how many leading bytes of buf the sentinel handling consumed. */
static size_t
qmp_parser_find_sentinel(struct qmp_parser *p, const char *buf, size_t n)
{
    const char *end = buf + n;
    const char *last = NULL;
    const char *s;

    for (s = buf; (s = memchr(s, 0xff, end - s)) != NULL; s++) {
        p->sentinels++;
        last = s;
    }
    if (!last) {
        return 0;
    }
    qmp_parser_discard(p);
    g_clear_pointer(&p->poison, g_free);
    p->base += last + 1 - buf;
    return last + 1 - buf;
}

void
qmp_parser_feed(struct qmp_parser *p, const void *buf, size_t n)
{
    const char *bytes = buf;

    g_return_if_fail(p != NULL);
    g_return_if_fail(buf != NULL || n == 0);

    if (n == 0) {
        return;
    }
    if (p->mode == QMP_PARSER_QGA) {
        size_t skip = qmp_parser_find_sentinel(p, bytes, n);

        bytes += skip;
        n -= skip;
        if (n == 0) {
            return;
        }
    }
    if (p->poison) {
        /* Nothing will be parsed before reset (or, for QGA, a sentinel,
         * which was looked for above): keep no bytes. */
        p->base += n;
        return;
    }
    qmp_parser_reserve(p, n);
    memcpy(p->buf + p->len, bytes, n);
    p->len += n;
}

static int qmp_parser_fail(struct qmp_parser *p, GError **errp, int code,
                           const char *fmt, ...) G_GNUC_PRINTF(4, 5);

/* Poison the parser with this error and drop what it holds. */
static int
qmp_parser_fail(struct qmp_parser *p, GError **errp, int code, const char *fmt,
                ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_free(p->poison);
    p->poison = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    qmp_parser_discard(p);
    g_set_error_literal(errp, qmp_parser_error_quark(), code, p->poison);
    return -1;
}

/* jansson quotes the peer's bytes ("near '...'") and cuts its text at a
 * fixed length, possibly inside a UTF-8 sequence: keep control characters
 * and invalid UTF-8 out of a message that will be logged. */
char *
qmp_parser_printable(const char *text)
{
    bool utf8 = g_utf8_validate(text, -1, NULL);
    GString *out = g_string_new(NULL);

    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c < 0x20 || *c == 0x7f || (*c >= 0x80 && !utf8)) {
            g_string_append_printf(out, "\\x%02x", *c);
        } else {
            g_string_append_c(out, *c);
        }
    }
    return g_string_free(out, false);
}

/* buf[head..end] is one balanced top-level object: parse it. */
static int
qmp_parser_decode(struct qmp_parser *p, size_t end, json_t **msg, GError **errp)
{
    json_error_t jerr;
    guint64 start = p->base + p->head;
    json_t *value =
        /* Flags 0 refuse an escaped NUL in a string: as a C string it would
         * silently cut a name short ("drive0\u0000x" read as "drive0"). */
        json_loadb((const char *)p->buf + p->head, end + 1 - p->head, 0, &jerr);

    if (!value) {
        g_autofree char *text = qmp_parser_printable(jerr.text);

        return qmp_parser_fail(p, errp, QMP_PARSER_ERROR_INVALID_JSON,
                               "invalid JSON from peer: %s at byte "
                               "%" G_GUINT64_FORMAT,
                               text, start + (guint64)MAX(jerr.position, 0));
    }
    /* The scanner only lets '{' start a message, so this holds for any
     * input; checked because a wrong type would reach every caller. */
    if (!json_is_object(value)) {
        json_decref(value);
        return qmp_parser_fail(p, errp, QMP_PARSER_ERROR_NOT_OBJECT,
                               "message is not a JSON object at byte "
                               "%" G_GUINT64_FORMAT,
                               start);
    }
    p->head = end + 1;
    p->scan = end + 1;
    *msg = value;
    return 1;
}

/* Between messages: skip whitespace, accept '{', reject anything else
 * at once rather than buffering it. */
static int
qmp_parser_start(struct qmp_parser *p, GError **errp)
{
    unsigned char c = p->buf[p->scan];
    guint64 at = p->base + p->scan;

    switch (c) {
    case ' ':
    case '\t':
    case '\r':
    case '\n':
        p->scan++;
        p->head = p->scan;
        return 0;
    case '{':
        p->depth = 1;
        p->arrays = 0;
        p->scan++;
        return 0;
    case '[':
    case '"':
    case '-':
    case '0':
    case '1':
    case '2':
    case '3':
    case '4':
    case '5':
    case '6':
    case '7':
    case '8':
    case '9':
    case 't':
    case 'f':
    case 'n':
        return qmp_parser_fail(p, errp, QMP_PARSER_ERROR_NOT_OBJECT,
                               "message is not a JSON object: starts with "
                               "'%c' at byte %" G_GUINT64_FORMAT,
                               c, at);
    default:
        return qmp_parser_fail(p, errp, QMP_PARSER_ERROR_UNEXPECTED_BYTE,
                               "unexpected byte 0x%02x between messages at "
                               "byte %" G_GUINT64_FORMAT,
                               c, at);
    }
}

int
qmp_parser_next(struct qmp_parser *p, json_t **msg, GError **errp)
{
    g_return_val_if_fail(p != NULL, -1);
    g_return_val_if_fail(msg != NULL, -1);

    *msg = NULL;
    if (p->poison) {
        g_set_error(errp, qmp_parser_error_quark(), QMP_PARSER_ERROR_POISONED,
                    "QMP parser unusable after earlier error: %s", p->poison);
        return -1;
    }

    while (p->scan < p->len) {
        unsigned char c;

        if (p->depth == 0) {
            if (qmp_parser_start(p, errp) < 0) {
                return -1;
            }
            continue;
        }

        /* Byte scan would make the message scan - head + 1 long. */
        if (p->scan - p->head >= p->max_msg) {
            return qmp_parser_fail(p, errp, QMP_PARSER_ERROR_TOO_BIG,
                                   "QMP message exceeds %zu bytes", p->max_msg);
        }
        c = p->buf[p->scan];

        if (p->in_string) {
            if (p->escape) {
                p->escape = false;
            } else if (c == '\\') {
                p->escape = true;
            } else if (c == '"') {
                p->in_string = false;
            }
            p->scan++;
            continue;
        }

        switch (c) {
        case '"':
            p->in_string = true;
            break;
        case '{':
        case '[':
            if (p->depth >= QMP_PARSER_MAX_DEPTH) {
                return qmp_parser_fail(
                    p, errp, QMP_PARSER_ERROR_TOO_DEEP,
                    "nesting deeper than %d at byte %" G_GUINT64_FORMAT,
                    QMP_PARSER_MAX_DEPTH, p->base + p->scan);
            }
            if (c == '[') {
                p->arrays |= G_GUINT64_CONSTANT(1) << p->depth;
            } else {
                p->arrays &= ~(G_GUINT64_CONSTANT(1) << p->depth);
            }
            p->depth++;
            break;
        case '}':
        case ']': {
            bool is_array = p->arrays >> (p->depth - 1) & 1;

            if (is_array != (c == ']')) {
                return qmp_parser_fail(p, errp, QMP_PARSER_ERROR_INVALID_JSON,
                                       "invalid JSON from peer: mismatched "
                                       "'%c' at byte %" G_GUINT64_FORMAT,
                                       c, p->base + p->scan);
            }
            p->depth--;
            if (p->depth == 0) {
                return qmp_parser_decode(p, p->scan, msg, errp);
            }
            break;
        }
        default:
            break;
        }
        p->scan++;
    }

    if (p->depth == 0) {
        /* Everything was consumed: rewind instead of memmoving later, and
         * do not keep a one-off large reply's buffer for the connection's
         * lifetime. */
        p->base += p->len;
        p->len = 0;
        p->head = 0;
        p->scan = 0;
        if (p->cap > QMP_PARSER_KEEP_BUF) {
            g_clear_pointer(&p->buf, g_free);
            p->cap = 0;
        }
    }
    return 0;
}

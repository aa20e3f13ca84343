/* libFuzzer target for qmp/parser.c: every byte from QEMU or the guest
 * agent is untrusted.
 *
 * data[0] picks the set-up, the rest is the stream:
 *   bit 0     QGA mode (else QMP)
 *   bits 1-3  how the stream is cut into feeds (whole, 1, 2, 3, 7, 64 bytes,
 *             pseudo-random lengths, 4096)
 *   bit 4     small max_msg (300 bytes), so the limit is reachable
 *   bit 5     after an error, keep feeding without reset (in QGA mode only a
 *             sentinel recovers; in QMP mode everything is dropped)
 * The parser is drained after every feed.  Every message is dumped and
 * released, which lets ASan see reference-count mistakes.
 *
 * Oracles:
 * - error messages are printable UTF-8, and a poisoned parser stays so;
 * - QMP mode: how the stream is cut into reads changes nothing, so the
 *   messages up to and including the first error are the same whether it
 *   is fed whole or in pieces;
 * - QGA mode: the last 0xFF wipes the slate, so what comes out after it is
 *   what QMP mode makes of the bytes after it, up to the first error.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/parser.h"

/* Split into feeds of these sizes; 0 means the whole input at once, and
 * SIZE_MAX pseudo-random lengths of 1-97 bytes. */
static const size_t chunk_sizes[8] = {0, 1, 2, 3, 7, 64, SIZE_MAX, 4096};

struct run {
    struct qmp_parser *p;
    bool reset_on_error;
    /* Log messages and the first error, once this many sentinels were
     * seen; with terse, errors without their text. */
    GString *log;
    unsigned log_after;
    bool terse;
    bool logging;
};

/* Error messages get logged: peer bytes quoted in them must not carry
 * control characters or invalid UTF-8. */
static bool
message_is_printable(const char *s)
{
    if (s == NULL || !g_utf8_validate(s, -1, NULL)) {
        return false;
    }
    for (; *s; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f) {
            return false;
        }
    }
    return true;
}

static bool
run_logs(struct run *r)
{
    return r->log && r->logging && qmp_parser_sentinels(r->p) >= r->log_after;
}

static void
drain(struct run *r)
{
    json_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    int ret;

    while ((ret = qmp_parser_next(r->p, &msg, &err)) > 0) {
        char *text;

        if (!json_is_object(msg)) {
            __builtin_trap();
        }
        text = json_dumps(msg, JSON_COMPACT | JSON_SORT_KEYS);
        if (!text) {
            __builtin_trap();
        }
        if (run_logs(r)) {
            g_string_append_printf(r->log, "%s\n", text);
        }
        free(text);
        json_decref(msg);
        msg = NULL;
    }
    if (msg != NULL || (ret != 0 && ret != -1)) {
        __builtin_trap();
    }
    if (ret < 0) {
        if (err == NULL || !message_is_printable(err->message)) {
            __builtin_trap();
        }
        if (run_logs(r)) {
            g_string_append_printf(r->log, "error: %s\n",
                                   r->terse ? "" : err->message);
            r->logging = false;
        }
        g_clear_error(&err);
        if (qmp_parser_next(r->p, &msg, &err) != -1 || msg != NULL ||
            err == NULL || !message_is_printable(err->message)) {
            __builtin_trap();
        }
        if (r->reset_on_error) {
            qmp_parser_reset(r->p);
        }
    }
}

static void
run(struct run *r, enum qmp_parser_mode mode, size_t max_msg, size_t chunk,
    const uint8_t *data, size_t size)
{
    guint32 rng = 2463534242u ^ (guint32)size;
    size_t off = 0;

    r->p = qmp_parser_new(mode, max_msg);
    r->logging = true;
    while (off < size) {
        size_t n = chunk;

        if (chunk == 0) {
            n = size;
        } else if (chunk == SIZE_MAX) {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            n = 1 + rng % 97;
        }
        n = MIN(n, size - off);
        qmp_parser_feed(r->p, data + off, n);
        off += n;
        drain(r);
    }
    if (mode == QMP_PARSER_QMP && qmp_parser_sentinels(r->p) != 0) {
        __builtin_trap();
    }
    qmp_parser_free(r->p);
    r->p = NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum qmp_parser_mode mode;
    size_t chunk;
    size_t max_msg;
    bool reset_on_error;

    if (size < 1) {
        return 0;
    }
    mode = data[0] & 1 ? QMP_PARSER_QGA : QMP_PARSER_QMP;
    chunk = chunk_sizes[(data[0] >> 1) & 7];
    max_msg = data[0] & 0x10 ? 300 : QMP_PARSER_DEFAULT_MAX_MSG;
    reset_on_error = !(data[0] & 0x20);
    data++;
    size--;

    if (mode == QMP_PARSER_QMP) {
        g_autoptr(GString) whole = g_string_new(NULL);
        g_autoptr(GString) pieces = g_string_new(NULL);
        struct run a = {.reset_on_error = reset_on_error, .log = whole};
        struct run b = {.reset_on_error = reset_on_error, .log = pieces};

        run(&a, mode, max_msg, 0, data, size);
        run(&b, mode, max_msg, chunk, data, size);
        if (!g_string_equal(whole, pieces)) {
            __builtin_trap();
        }
    } else {
        g_autoptr(GString) qga = g_string_new(NULL);
        g_autoptr(GString) tail = g_string_new(NULL);
        size_t skip = 0; /* bytes up to and including the last 0xFF */
        unsigned sentinels = 0;
        struct run a = {
            .reset_on_error = reset_on_error, .log = qga, .terse = true};
        struct run b = {
            .reset_on_error = reset_on_error, .log = tail, .terse = true};

        for (size_t i = 0; i < size; i++) {
            if (data[i] == 0xff) {
                sentinels++;
                skip = i + 1;
            }
        }
        a.log_after = sentinels;
        run(&a, mode, max_msg, chunk, data, size);
        run(&b, QMP_PARSER_QMP, max_msg, 0, data + skip, size - skip);
        if (!g_string_equal(qga, tail)) {
            __builtin_trap();
        }
    }
    return 0;
}

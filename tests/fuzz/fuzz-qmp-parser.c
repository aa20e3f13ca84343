/* libFuzzer target for qmp/parser.c: every byte from QEMU or the guest
 * agent is untrusted.
 *
 * data[0] picks the set-up, the rest is the stream:
 *   bit 0     QGA mode (else QMP)
 *   bits 1-3  how the stream is cut into feeds (whole, 1, 2, 3, 7, 64 bytes,
 *             pseudo-random lengths, 4096)
 *   bit 4     small max_msg (300 bytes), so the limit is reachable
 * The parser is drained after every feed and reset after every error, and
 * feeding goes on.  Every message is dumped and released, which lets ASan
 * see reference-count mistakes.
 *
 * Oracles: error messages are printable UTF-8; in QMP mode the framing does not
 * depend on how the stream was cut into reads, so the messages up to and
 * including the first error must be the same whether it is fed whole or in
 * pieces.  (In QGA mode it may differ by design: a 0xFF discards complete
 * messages fed with it but not yet taken.)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/parser.h"

/* Split into feeds of these sizes; 0 means the whole input at once, and
 * SIZE_MAX pseudo-random lengths of 1-97 bytes. */
static const size_t chunk_sizes[8] = {0, 1, 2, 3, 7, 64, SIZE_MAX, 4096};

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

/* Drain p; append each message and the first error to log, if given;
 * reset p after an error. */
static void
drain(struct qmp_parser *p, GString *log, bool *logging)
{
    json_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    int r;

    while ((r = qmp_parser_next(p, &msg, &err)) > 0) {
        char *text;

        if (!json_is_object(msg)) {
            __builtin_trap();
        }
        text = json_dumps(msg, JSON_COMPACT | JSON_SORT_KEYS);
        if (!text) {
            __builtin_trap();
        }
        if (log && *logging) {
            g_string_append_printf(log, "%s\n", text);
        }
        free(text);
        json_decref(msg);
        msg = NULL;
    }
    if (msg != NULL) {
        __builtin_trap();
    }
    if (r < 0) {
        if (err == NULL || !message_is_printable(err->message)) {
            __builtin_trap();
        }
        if (log && *logging) {
            g_string_append_printf(log, "error: %s\n", err->message);
            *logging = false;
        }
        /* Still poisoned until reset. */
        g_clear_error(&err);
        if (qmp_parser_next(p, &msg, &err) != -1 || msg != NULL) {
            __builtin_trap();
        }
        qmp_parser_reset(p);
    }
}

static void
run(enum qmp_parser_mode mode, size_t max_msg, size_t chunk,
    const uint8_t *data, size_t size, GString *log)
{
    struct qmp_parser *p = qmp_parser_new(mode, max_msg);
    guint32 rng = 2463534242u ^ (guint32)size;
    bool logging = true;
    size_t off = 0;

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
        qmp_parser_feed(p, data + off, n);
        off += n;
        drain(p, log, &logging);
    }
    qmp_parser_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum qmp_parser_mode mode;
    size_t chunk;
    size_t max_msg;

    if (size < 1) {
        return 0;
    }
    mode = data[0] & 1 ? QMP_PARSER_QGA : QMP_PARSER_QMP;
    chunk = chunk_sizes[(data[0] >> 1) & 7];
    max_msg = data[0] & 0x10 ? 300 : QMP_PARSER_DEFAULT_MAX_MSG;
    data++;
    size--;

    if (mode == QMP_PARSER_QMP && chunk != 0) {
        g_autoptr(GString) whole = g_string_new(NULL);
        g_autoptr(GString) pieces = g_string_new(NULL);

        run(mode, max_msg, 0, data, size, whole);
        run(mode, max_msg, chunk, data, size, pieces);
        if (!g_string_equal(whole, pieces)) {
            __builtin_trap();
        }
    } else {
        run(mode, max_msg, chunk, data, size, NULL);
    }
    return 0;
}

/* Unit tests for qmp/parser.c: framing of QMP/QGA streams.
 *
 * Most tests reduce a run to a transcript: every message as compact JSON
 * with sorted keys, one a line, then "error: <message>" if the parser
 * failed (feeding stops there).  Transcripts are compared across the ways a
 * stream can be cut into reads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/parser.h"

#define PARSER_ERROR g_quark_from_static_string("qmp-parser-error")

struct run {
    struct qmp_parser *p;
    GString *log;
    bool failed;
    unsigned messages;
};

static void
run_init(struct run *r, enum qmp_parser_mode mode, size_t max_msg)
{
    r->p = qmp_parser_new(mode, max_msg);
    r->log = g_string_new(NULL);
    r->failed = false;
    r->messages = 0;
}

/* Feed n bytes, then drain like the agent does. */
static void
run_feed(struct run *r, const void *buf, size_t n)
{
    json_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    int ret;

    if (r->failed) {
        return;
    }
    qmp_parser_feed(r->p, buf, n);
    while ((ret = qmp_parser_next(r->p, &msg, &err)) > 0) {
        g_autofree char *text = NULL;

        g_assert_true(json_is_object(msg));
        text = json_dumps(msg, JSON_COMPACT | JSON_SORT_KEYS);
        g_string_append_printf(r->log, "%s\n", text);
        json_decref(msg);
        r->messages++;
    }
    g_assert_null(msg);
    if (ret < 0) {
        g_assert_error(err, PARSER_ERROR, err->code);
        g_string_append_printf(r->log, "error: %s\n", err->message);
        r->failed = true;
    } else {
        g_assert_cmpint(ret, ==, 0);
        g_assert_no_error(err);
    }
}

static char *
run_finish(struct run *r)
{
    qmp_parser_free(r->p);
    return g_string_free(r->log, false);
}

/* Feed in pieces of chunk bytes (0: all at once). */
static char *
transcript(enum qmp_parser_mode mode, size_t max_msg, const char *in,
           size_t len, size_t chunk)
{
    struct run r;
    size_t off = 0;

    run_init(&r, mode, max_msg);
    if (chunk == 0) {
        chunk = len;
    }
    do {
        size_t n = MIN(chunk, len - off);

        run_feed(&r, in + off, n);
        off += n;
    } while (off < len);
    return run_finish(&r);
}

/* Feed in up to three pieces: [0, a), [a, b), [b, len). */
static char *
transcript_cut(const char *in, size_t len, size_t a, size_t b)
{
    struct run r;

    run_init(&r, QMP_PARSER_QMP, 0);
    run_feed(&r, in, a);
    run_feed(&r, in + a, b - a);
    run_feed(&r, in + b, len - b);
    return run_finish(&r);
}

/* got is exactly want_msgs, followed by one error line containing want_err
 * if that is not NULL. */
static bool
transcript_matches(const char *got, const char *want_msgs, const char *want_err)
{
    const char *rest;

    if (!g_str_has_prefix(got, want_msgs)) {
        return false;
    }
    rest = got + strlen(want_msgs);
    if (want_err == NULL) {
        return *rest == '\0';
    }
    return g_str_has_prefix(rest, "error: ") && strstr(rest, want_err) &&
           strchr(rest, '\n') == rest + strlen(rest) - 1;
}

static void
check_transcript(const char *got, const char *want_msgs, const char *want_err)
{
    if (!transcript_matches(got, want_msgs, want_err)) {
        g_error("got\n%s\nwanted\n%s%s%s", got, want_msgs,
                want_err ? "error: ..." : "", want_err ? want_err : "");
    }
}

struct framing_case {
    const char *in;
    size_t len; /* 0: strlen(in) */
    const char *msgs;
    const char *err;
};

static size_t
case_len(const struct framing_case *c)
{
    return c->len ? c->len : strlen(c->in);
}

/* Whole, byte at a time and in 7-byte reads must all give the expected
 * transcript. */
static void
check_cases(enum qmp_parser_mode mode, size_t max_msg,
            const struct framing_case *cases, size_t n)
{
    static const size_t chunks[] = {0, 1, 7};

    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < G_N_ELEMENTS(chunks); j++) {
            g_autofree char *got = transcript(mode, max_msg, cases[i].in,
                                              case_len(&cases[i]), chunks[j]);

            if (!transcript_matches(got, cases[i].msgs, cases[i].err)) {
                g_error("case %zu in reads of %zu: got\n%s", i, chunks[j], got);
            }
        }
    }
}

static void
test_one_message(void)
{
    static const char greeting[] =
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, "
        "\"major\": 8}, \"package\": \"Debian 1:8.2.2\"}, "
        "\"capabilities\": [\"oob\"]}}\r\n";
    struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
    json_auto_t *msg = NULL;
    json_t *none = NULL;
    g_autoptr(GError) err = NULL;
    json_t *caps;

    qmp_parser_feed(p, greeting, strlen(greeting));
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 1);
    g_assert_no_error(err);
    g_assert_cmpint(
        json_integer_value(json_object_get(
            json_object_get(
                json_object_get(json_object_get(msg, "QMP"), "version"),
                "qemu"),
            "major")),
        ==, 8);
    caps = json_object_get(json_object_get(msg, "QMP"), "capabilities");
    g_assert_cmpstr(json_string_value(json_array_get(caps, 0)), ==, "oob");
    g_assert_cmpint(msg->refcount, ==, 1);

    g_assert_cmpint(qmp_parser_next(p, &none, &err), ==, 0);
    g_assert_null(none);
    g_assert_no_error(err);
    g_assert_cmpuint(qmp_parser_sentinels(p), ==, 0);
    qmp_parser_free(p);
}

static const struct framing_case split_cases[] = {
    {"{\"return\": {\"status\": \"running\", \"singlestep\": false, "
     "\"running\": true}, \"id\": \"qbak-17\"}\r\n",
     0,
     "{\"id\":\"qbak-17\",\"return\":{\"running\":true,\"singlestep\":false,"
     "\"status\":\"running\"}}\n",
     NULL},
    {"{\"error\": {\"class\": \"GenericError\", \"desc\": \"Node "
     "\\\"drive0\\\" "
     "{not} [found]\"}, \"id\": 3}\n",
     0,
     "{\"error\":{\"class\":\"GenericError\",\"desc\":\"Node \\\"drive0\\\" "
     "{not} [found]\"},\"id\":3}\n",
     NULL},
    {"{\"event\": \"BLOCK_JOB_COMPLETED\", \"data\": {\"device\": \"j\\\\\", "
     "\"len\": 10737418240, \"x\": [[], {}, [1.5, -2, null]], "
     "\"s\": \"caf\xc3\xa9 \\u20ac \xf0\x9f\x98\x80\"}}\n"
     "{\"return\": {}}",
     0,
     "{\"data\":{\"device\":\"j\\\\\",\"len\":10737418240,"
     "\"s\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\","
     "\"x\":[[],{},[1.5,-2,null]]},\"event\":\"BLOCK_JOB_COMPLETED\"}\n"
     "{\"return\":{}}\n",
     NULL},
};

/* Every way of cutting a reply into two or three reads, and one byte per
 * read, frames the same messages: the scanner's state (inside a string,
 * after a backslash, in the middle of a UTF-8 sequence, nesting) survives
 * between feeds. */
static void
test_reply_split_across_reads(void)
{
    for (size_t i = 0; i < G_N_ELEMENTS(split_cases); i++) {
        const struct framing_case *c = &split_cases[i];
        size_t len = case_len(c);

        for (size_t a = 0; a <= len; a++) {
            for (size_t b = a; b <= len; b++) {
                g_autofree char *got = transcript_cut(c->in, len, a, b);

                if (strcmp(got, c->msgs) != 0) {
                    g_error("case %zu cut at %zu, %zu:\n%s", i, a, b, got);
                }
            }
        }
    }
    check_cases(QMP_PARSER_QMP, 0, split_cases, G_N_ELEMENTS(split_cases));
}

static void
test_several_messages_in_one_read(void)
{
    static const char in[] = "  {\"return\": {}, \"id\": 1}\r\n"
                             "{\"return\": {}, \"id\": 2}\t"
                             "{\"return\": {}, \"id\": 3}"
                             "{\"return\": {}, \"id\": 4}\n\n";
    struct run r;
    g_autofree char *got = NULL;

    run_init(&r, QMP_PARSER_QMP, 0);
    run_feed(&r, in, strlen(in));
    g_assert_cmpuint(r.messages, ==, 4);
    got = run_finish(&r);
    g_assert_cmpstr(got, ==,
                    "{\"id\":1,\"return\":{}}\n{\"id\":2,\"return\":{}}\n"
                    "{\"id\":3,\"return\":{}}\n{\"id\":4,\"return\":{}}\n");
}

/* The parser frames; matching replies to commands is the client's job, so
 * all it must do is keep arrival order. */
static void
test_event_between_command_and_reply(void)
{
    static const struct framing_case cases[] = {
        {"{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": "
         "\"created\", \"id\": \"backup0\"}, \"timestamp\": {\"seconds\": "
         "1700000000, \"microseconds\": 5}}\r\n"
         "{\"return\": {}, \"id\": \"qbak-5\"}\r\n"
         "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": "
         "\"running\", \"id\": \"backup0\"}, \"timestamp\": {\"seconds\": "
         "1700000000, \"microseconds\": 9}}\r\n",
         0,
         "{\"data\":{\"id\":\"backup0\",\"status\":\"created\"},\"event\":"
         "\"JOB_STATUS_CHANGE\",\"timestamp\":{\"microseconds\":5,"
         "\"seconds\":1700000000}}\n"
         "{\"id\":\"qbak-5\",\"return\":{}}\n"
         "{\"data\":{\"id\":\"backup0\",\"status\":\"running\"},\"event\":"
         "\"JOB_STATUS_CHANGE\",\"timestamp\":{\"microseconds\":9,"
         "\"seconds\":1700000000}}\n",
         NULL},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

/* Only space, tab, CR and LF may separate messages; the message before the
 * garbage is still delivered. */
static void
test_garbage_between_messages(void)
{
    static const struct framing_case cases[] = {
        {"{}x{}", 0, "{}\n", "unexpected byte 0x78 between messages at byte 2"},
        {"{} \v{}", 0, "{}\n",
         "unexpected byte 0x0b between messages at byte 3"},
        {"{}\f", 0, "{}\n", "unexpected byte 0x0c between messages"},
        {"{}\0{}", 5, "{}\n", "unexpected byte 0x00 between messages"},
        {"{}}", 0, "{}\n", "unexpected byte 0x7d between messages"},
        {"{}]", 0, "{}\n", "unexpected byte 0x5d between messages"},
        {"{},{}", 0, "{}\n", "unexpected byte 0x2c between messages"},
        {"{}\x80", 0, "{}\n", "unexpected byte 0x80 between messages"},
        {"\xef\xbb\xbf{}", 0, "",
         "unexpected byte 0xef between messages at byte 0"},
        {"{}\n(qemu) ", 0, "{}\n",
         "unexpected byte 0x28 between messages at byte 3"},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

static void
test_non_object_top_level(void)
{
    static const struct framing_case cases[] = {
        {"[]", 0, "", "message is not a JSON object: starts with '['"},
        {"[{}]", 0, "", "message is not a JSON object"},
        {"\"{}\"", 0, "", "message is not a JSON object: starts with '\"'"},
        {"1", 0, "", "message is not a JSON object: starts with '1'"},
        {"-1", 0, "", "message is not a JSON object"},
        {"true", 0, "", "message is not a JSON object: starts with 't'"},
        {"false", 0, "", "message is not a JSON object"},
        {"{} null", 0, "{}\n", "not a JSON object: starts with 'n' at byte 3"},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

/* A message of "{\"a\":\"xxx\"}" exactly len bytes long. */
static char *
message_of_size(size_t len)
{
    char *s;

    g_assert_cmpuint(len, >=, 9);
    s = g_malloc(len + 1);
    memcpy(s, "{\"a\":\"", 6);
    memset(s + 6, 'x', len - 8);
    memcpy(s + len - 2, "\"}", 3);
    return s;
}

static void
test_oversized_message(void)
{
    g_autofree char *fits = message_of_size(64);
    g_autofree char *over = message_of_size(65);
    g_autofree char *spaced =
        g_strconcat("\n \r\n\t                  ", fits, "   \n", fits, NULL);
    g_autofree char *got = NULL;
    g_autofree char *big = NULL;
    struct qmp_parser *p;
    json_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    size_t big_len = QMP_PARSER_DEFAULT_MAX_MSG + 1;

    /* Exactly max_msg is fine, one more is not; whitespace around does not
     * count. */
    for (size_t chunk = 0; chunk < 3; chunk++) {
        g_free(got);
        got = transcript(QMP_PARSER_QMP, 64, fits, 64, chunk);
        g_assert_cmpuint(strlen(got), ==, 64 + 1);
        g_free(got);
        got = transcript(QMP_PARSER_QMP, 64, spaced, strlen(spaced), chunk);
        g_assert_cmpuint(strlen(got), ==, 2 * (64 + 1));
        g_free(got);
        got = transcript(QMP_PARSER_QMP, 64, over, 65, chunk);
        check_transcript(got, "", "QMP message exceeds 64 bytes");
    }

    /* The error comes with the read that crosses the limit, not when the
     * (never-ending) message ends: 16-byte reads, the 65th byte is in the
     * fifth. */
    p = qmp_parser_new(QMP_PARSER_QMP, 64);
    qmp_parser_feed(p, "{\"a\":\"", 6);
    for (unsigned i = 0; i < 4; i++) {
        qmp_parser_feed(p, i == 0 ? "xxxxxxxxxx" : "xxxxxxxxxxxxxxxx",
                        i == 0 ? 10 : 16);
        g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 0);
        g_assert_no_error(err);
    }
    qmp_parser_feed(p, "xxxxxxxxxxxxxxxx", 16);
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, -1);
    g_assert_null(msg);
    g_assert_error(err, PARSER_ERROR, err->code);
    g_assert_cmpstr(err->message, ==, "QMP message exceeds 64 bytes");
    qmp_parser_free(p);
    g_clear_error(&err);

    /* max_msg 0 means the 16 MiB default. */
    big = g_malloc(big_len);
    memset(big, ' ', big_len);
    big[0] = '{';
    p = qmp_parser_new(QMP_PARSER_QMP, 0);
    qmp_parser_feed(p, big, big_len - 1);
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 0);
    qmp_parser_feed(p, big, 1);
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, -1);
    g_assert_cmpstr(err->message, ==, "QMP message exceeds 16777216 bytes");
    qmp_parser_free(p);
}

/* "{" then depth-1 levels of "[", closed again. */
static char *
nested(unsigned depth, bool close)
{
    GString *s = g_string_new("{\"a\":");

    for (unsigned i = 1; i < depth; i++) {
        g_string_append_c(s, '[');
    }
    if (close) {
        for (unsigned i = 1; i < depth; i++) {
            g_string_append_c(s, ']');
        }
        g_string_append_c(s, '}');
    }
    return g_string_free(s, false);
}

static void
test_deep_nesting(void)
{
    g_autofree char *max = nested(QMP_PARSER_MAX_DEPTH, true);
    g_autofree char *over = nested(QMP_PARSER_MAX_DEPTH + 1, true);
    g_autofree char *open_only = nested(QMP_PARSER_MAX_DEPTH + 1, false);
    g_autofree char *very_deep = nested(1000000, false);
    g_autofree char *in_string = NULL;
    g_autofree char *got = NULL;
    json_t *inner;
    json_auto_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
    unsigned depth = 1;

    qmp_parser_feed(p, max, strlen(max));
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 1);
    for (inner = json_object_get(msg, "a"); json_array_size(inner) == 1;
         inner = json_array_get(inner, 0)) {
        depth++;
    }
    g_assert_cmpuint(depth + 1, ==, QMP_PARSER_MAX_DEPTH);
    qmp_parser_free(p);

    for (size_t chunk = 0; chunk < 2; chunk++) {
        g_free(got);
        got = transcript(QMP_PARSER_QMP, 0, over, strlen(over), chunk);
        check_transcript(got, "", "nesting deeper than 64 at byte 68");
        /* Refused before the message is complete, and before parsing. */
        g_free(got);
        got =
            transcript(QMP_PARSER_QMP, 0, open_only, strlen(open_only), chunk);
        check_transcript(got, "", "nesting deeper than 64");
        g_free(got);
        got =
            transcript(QMP_PARSER_QMP, 0, very_deep, strlen(very_deep), chunk);
        check_transcript(got, "", "nesting deeper than 64");
    }

    /* Brackets inside strings do not nest. */
    in_string = g_strdup_printf("{\"a\":\"%s\"}", open_only + 5);
    g_free(got);
    got = transcript(QMP_PARSER_QMP, 0, in_string, strlen(in_string), 1);
    g_assert_true(g_str_has_prefix(got, "{\"a\":\"[[[[[[[["));
    g_assert_null(strstr(got, "error"));
}

static void
test_mismatched_brackets(void)
{
    static const struct framing_case cases[] = {
        {"{]", 0, "", "invalid JSON from peer: mismatched ']' at byte 1"},
        {"{\"a\":[}", 0, "",
         "invalid JSON from peer: mismatched '}' at byte 6"},
        {"{\"a\":[{]]}", 0, "", "mismatched ']' at byte 7"},
        {"{\"a\":[{}]}{\"b\":{]}", 0, "{\"a\":[{}]}\n",
         "mismatched ']' at byte 16"},
        /* Balanced but not JSON: left to jansson. */
        {"{\"a\" 1}", 0, "", "invalid JSON from peer: "},
        {"{\"a\":1,}", 0, "", "invalid JSON from peer: "},
        {"{{}}", 0, "", "invalid JSON from peer: "},
        {"{\"a\":\"x\nb\"}", 0, "", "invalid JSON from peer: "},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

static void
test_huge_number(void)
{
    g_autofree char *digits = g_strnfill(100000, '9');
    g_autofree char *long_int = g_strdup_printf("{\"n\": %s}", digits);
    g_autofree char *long_real = g_strdup_printf("{\"n\": 0.%se99999}", digits);
    const struct framing_case cases[] = {
        {"{\"n\": 9223372036854775807}", 0, "{\"n\":9223372036854775807}\n",
         NULL},
        {"{\"n\": -9223372036854775808}", 0, "{\"n\":-9223372036854775808}\n",
         NULL},
        {"{\"n\": 9223372036854775808}", 0, "",
         "invalid JSON from peer: too big integer"},
        {"{\"n\": -9223372036854775809}", 0, "", "too big negative integer"},
        {"{\"n\": 1e400}", 0, "",
         "invalid JSON from peer: real number overflow"},
        {"{\"n\": -1e400}", 0, "",
         "invalid JSON from peer: real number overflow"},
        {"{\"n\": 1e-400}", 0, "{\"n\":0.0}\n", NULL},
        {long_int, 0, "", "invalid JSON from peer: too big integer"},
        {long_real, 0, "", "invalid JSON from peer: real number overflow"},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

static void
test_invalid_utf8(void)
{
    static const struct framing_case cases[] = {
        /* Controls: valid UTF-8 and escapes. */
        {"{\"s\": \"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf\"}", 0,
         "{\"s\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf\"}\n",
         NULL},
        {"{\"s\": \"\\ud83d\\ude00\"}", 0, "{\"s\":\"\xf0\x9f\x98\x80\"}\n",
         NULL},
        /* Invalid in a value, a key, and outside strings. */
        {"{\"s\": \"\xc3\x28\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\x80\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xc0\xaf\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xe0\x80\xaf\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xed\xa0\x80\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xf4\x90\x80\x80\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xf0\x9f\x98\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xfe\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\xff\"}", 0, "", "invalid JSON from peer: "},
        {"{\"\xe2\x82\": 1}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": 1\xa0}", 0, "", "invalid JSON from peer: "},
        /* Escaped lone surrogates and NUL are not valid strings either. */
        {"{\"s\": \"\\ud800\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"\\udc00x\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"a\\u0000b\"}", 0, "", "invalid JSON from peer: "},
        {"{\"s\": \"a\0b\"}", 12, "", "invalid JSON from peer: "},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

static void
test_braces_inside_strings(void)
{
    static const struct framing_case cases[] = {
        {"{\"desc\": \"}{][\"}", 0, "{\"desc\":\"}{][\"}\n", NULL},
        {"{\"}\": \"{\", \"]\": [\"[\"]}", 0, "{\"]\":[\"[\"],\"}\":\"{\"}\n",
         NULL},
        {"{\"a\": \"}\"}{\"b\": \"{\"}", 0, "{\"a\":\"}\"}\n{\"b\":\"{\"}\n",
         NULL},
        {"{\"a\": \"}}}}}}}}}}}\"}\n", 0, "{\"a\":\"}}}}}}}}}}}\"}\n", NULL},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

static void
test_escaped_quotes(void)
{
    static const struct framing_case cases[] = {
        /* An escaped quote does not end the string... */
        {"{\"a\": \"\\\"}\"}", 0, "{\"a\":\"\\\"}\"}\n", NULL},
        /* ...an escaped backslash before a quote does... */
        {"{\"a\": \"\\\\\"}", 0, "{\"a\":\"\\\\\"}\n", NULL},
        {"{\"a\": \"\\\\\\\"{\"}", 0, "{\"a\":\"\\\\\\\"{\"}\n", NULL},
        {"{\"a\": \"\\\\\\\\\"}{}", 0, "{\"a\":\"\\\\\\\\\"}\n{}\n", NULL},
        /* ...and escapes in keys count too. */
        {"{\"k\\\"}\": \"\\/\\b\\f\\n\\r\\t\\u007b\"}", 0,
         "{\"k\\\"}\":\"/\\b\\f\\n\\r\\t{\"}\n", NULL},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
}

/* The peer stops mid-message (reads end there): nothing is returned, no
 * error, and freeing the parser releases the partial message. */
static void
test_eof_mid_message(void)
{
    static const char *const partial[] = {
        "{",
        "  {\"return\"",
        "{\"return\": {}",
        "{\"a\": \"abc",
        "{\"a\": \"\\",
        "{\"a\": [1, ",
        "{\"a\": \"\xe2\x82",
        "\r\n \t",
        "{\"return\": {}}\n{\"ret",
    };

    for (size_t i = 0; i < G_N_ELEMENTS(partial); i++) {
        struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
        json_t *msg = NULL;
        g_autoptr(GError) err = NULL;
        int r;
        unsigned n = 0;

        qmp_parser_feed(p, partial[i], strlen(partial[i]));
        while ((r = qmp_parser_next(p, &msg, &err)) == 1) {
            json_decref(msg);
            n++;
        }
        g_assert_cmpint(r, ==, 0);
        g_assert_null(msg);
        g_assert_no_error(err);
        g_assert_cmpuint(n, ==, i == G_N_ELEMENTS(partial) - 1 ? 1 : 0);
        /* Asking again changes nothing. */
        g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 0);
        g_assert_null(msg);
        qmp_parser_free(p);
    }
}

static void
test_poisoned_after_error(void)
{
    struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
    json_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    static const char good[] = "{\"return\": {}}\n";

    qmp_parser_feed(p, "{}\nx{}", 6);
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 1);
    json_decref(msg);
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, -1);
    g_assert_null(msg);
    g_assert_error(err, PARSER_ERROR, err->code);
    g_assert_cmpstr(err->message, ==,
                    "unexpected byte 0x78 between messages at byte 3");
    g_clear_error(&err);

    /* Good bytes after the error are not trusted. */
    for (int i = 0; i < 3; i++) {
        qmp_parser_feed(p, good, strlen(good));
        g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, -1);
        g_assert_null(msg);
        g_assert_error(err, PARSER_ERROR, err->code);
        g_assert_nonnull(strstr(err->message, "after earlier error: "
                                              "unexpected byte 0x78"));
        g_clear_error(&err);
    }

    /* A NULL errp is allowed, like everywhere in GError. */
    g_assert_cmpint(qmp_parser_next(p, &msg, NULL), ==, -1);
    qmp_parser_free(p);
}

static void
test_reset_clears_poison(void)
{
    struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
    json_auto_t *msg = NULL;
    json_t *none = NULL;
    g_autoptr(GError) err = NULL;

    qmp_parser_feed(p, "{\"a\" 1}", 7);
    g_assert_cmpint(qmp_parser_next(p, &none, &err), ==, -1);
    g_clear_error(&err);

    /* Offsets in messages count from the reset. */
    qmp_parser_reset(p);
    qmp_parser_feed(p, "\n]", 2);
    g_assert_cmpint(qmp_parser_next(p, &none, &err), ==, -1);
    g_assert_cmpstr(err->message, ==,
                    "unexpected byte 0x5d between messages at byte 1");
    g_clear_error(&err);

    /* A reset mid-message forgets the partial message. */
    qmp_parser_reset(p);
    qmp_parser_feed(p, "{\"a\": \"{[", 9);
    g_assert_cmpint(qmp_parser_next(p, &none, &err), ==, 0);
    qmp_parser_reset(p);
    qmp_parser_feed(p, "{\"b\": 1}", 8);
    g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, 1);
    g_assert_no_error(err);
    g_assert_cmpint(json_integer_value(json_object_get(msg, "b")), ==, 1);
    g_assert_null(json_object_get(msg, "a"));
    qmp_parser_free(p);
}

/* QGA: junk (a stale partial reply of 1 MiB, binary bytes, which end the
 * string and make a mess of the nesting) then the
 * guest-sync-delimited sentinel and the reply, in reads of every size, with
 * a limit above and below the junk's size.  Errors before the sentinel are
 * expected (the client ignores them while syncing); after it, exactly the
 * reply comes out. */
static void
test_qga_sentinel_discards_junk(void)
{
    static const size_t chunks[] = {0, 1, 7, 4096, 65536};
    static const size_t limits[] = {0, 4096};
    static const char reply[] = "{\"return\": 1234567}\n";
    GString *in = g_string_new("{\"return\": {\"partial\": \"");
    g_autofree char *stream = NULL;
    size_t len;

    for (unsigned i = 0; i < (1u << 20); i++) {
        g_string_append_c(in, "abc{}[] "[i % 8]);
    }
    for (unsigned c = 0; c < 0xff; c++) {
        g_string_append_c(in, (char)c);
    }
    g_string_append(in, "\n\xff");
    g_string_append(in, reply);
    len = in->len;
    stream = g_string_free(in, false);

    for (size_t l = 0; l < G_N_ELEMENTS(limits); l++) {
        for (size_t c = 0; c < G_N_ELEMENTS(chunks); c++) {
            struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QGA, limits[l]);
            size_t chunk = chunks[c] ? chunks[c] : len;
            unsigned got = 0;
            unsigned errors = 0;

            for (size_t off = 0; off < len; off += chunk) {
                json_t *msg = NULL;
                g_autoptr(GError) err = NULL;
                int r;

                qmp_parser_feed(p, stream + off, MIN(chunk, len - off));
                while ((r = qmp_parser_next(p, &msg, &err)) != 0) {
                    if (r < 0) {
                        /* Still before the sentinel. */
                        g_assert_cmpuint(qmp_parser_sentinels(p), ==, 0);
                        g_clear_error(&err);
                        errors++;
                        break;
                    }
                    g_assert_cmpuint(qmp_parser_sentinels(p), ==, 1);
                    g_assert_cmpint(
                        json_integer_value(json_object_get(msg, "return")), ==,
                        1234567);
                    json_decref(msg);
                    got++;
                }
            }
            g_assert_cmpuint(got, ==, 1);
            g_assert_cmpuint(qmp_parser_sentinels(p), ==, 1);
            if (limits[l] == 0 && chunks[c] == 0) {
                g_assert_cmpuint(errors, ==, 0);
            }
            if (limits[l] == 4096 && chunks[c] == 1) {
                g_assert_cmpuint(errors, >, 0);
            }
            qmp_parser_free(p);
        }
    }
}

/* In QGA mode 0xFF resets wherever it is: inside a string, a message, or
 * between messages, and every one is counted. */
static void
test_qga_sentinel_anywhere(void)
{
    static const struct {
        const char *in;
        const char *msgs;
        unsigned sentinels;
    } cases[] = {
        {"{\"a\": \"abc\xff{\"return\": 1}", "{\"return\":1}\n", 1},
        {"{\"a\": [1, \xff{\"return\": 2}", "{\"return\":2}\n", 1},
        {"{\"a\": \"\\\xff{\"return\": 3}", "{\"return\":3}\n", 1},
        {"\xff\xffjunk\xff\n{\"return\": 4}\n", "{\"return\":4}\n", 3},
        {"\xff", "", 1},
    };

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        for (size_t chunk = 0; chunk < 3; chunk++) {
            struct run r;
            g_autofree char *got = NULL;
            unsigned sentinels;

            run_init(&r, QMP_PARSER_QGA, 0);
            for (size_t off = 0, len = strlen(cases[i].in); off < len;) {
                size_t n = chunk ? MIN(chunk, len - off) : len;

                if (r.failed) {
                    /* Errors before a sentinel are survivable in QGA. */
                    r.failed = false;
                    g_string_truncate(r.log, 0);
                }
                run_feed(&r, cases[i].in + off, n);
                off += n;
            }
            sentinels = qmp_parser_sentinels(r.p);
            got = run_finish(&r);
            g_assert_cmpstr(got, ==, cases[i].msgs);
            g_assert_cmpuint(sentinels, ==, cases[i].sentinels);
        }
    }
}

/* "Everything buffered before it": a complete message that arrives in the
 * same read as a later sentinel is stale and dropped; one already taken
 * was delivered.  The count survives reset. */
static void
test_qga_sentinel_drops_undrained_messages(void)
{
    static const char in[] = "{\"id\": 1}\xff{\"id\": 2}";
    g_autofree char *whole = transcript(QMP_PARSER_QGA, 0, in, strlen(in), 0);
    g_autofree char *split = transcript(QMP_PARSER_QGA, 0, in, strlen(in), 9);
    struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QGA, 0);
    json_t *msg = NULL;

    g_assert_cmpstr(whole, ==, "{\"id\":2}\n");
    g_assert_cmpstr(split, ==, "{\"id\":1}\n{\"id\":2}\n");

    qmp_parser_feed(p, "\xff\xff", 2);
    qmp_parser_reset(p);
    g_assert_cmpuint(qmp_parser_sentinels(p), ==, 2);
    g_assert_cmpint(qmp_parser_next(p, &msg, NULL), ==, 0);
    qmp_parser_free(p);
}

static void
test_qmp_rejects_0xff(void)
{
    static const struct framing_case cases[] = {
        {"{}\xff{}", 0, "{}\n",
         "unexpected byte 0xff between messages at byte 2"},
        {"\xff{\"return\": {}}", 0, "",
         "unexpected byte 0xff between messages"},
        {"{\"a\": \"\xff\"}", 0, "", "invalid JSON from peer: "},
        {"{\"a\": 1\xff}", 0, "", "invalid JSON from peer: "},
    };

    check_cases(QMP_PARSER_QMP, 0, cases, G_N_ELEMENTS(cases));
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);

        qmp_parser_feed(p, cases[i].in, strlen(cases[i].in));
        g_assert_cmpuint(qmp_parser_sentinels(p), ==, 0);
        qmp_parser_free(p);
    }
}

/* jansson quotes the peer's bytes in its errors; the parser's messages
 * are logged, so control characters in them are escaped. */
static void
test_error_messages_are_printable(void)
{
    static const char *const inputs[] = {
        "{\"a\": \"\\u12\x1b[2J\"}",
        "{\"a\": \"\\u\r\n\"}",
        "{\"a\": \"\\u\x7f\"}",
    };

    for (size_t i = 0; i < G_N_ELEMENTS(inputs); i++) {
        struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
        json_t *msg = NULL;
        g_autoptr(GError) err = NULL;

        qmp_parser_feed(p, inputs[i], strlen(inputs[i]));
        g_assert_cmpint(qmp_parser_next(p, &msg, &err), ==, -1);
        g_assert_true(g_str_has_prefix(err->message,
                                       "invalid JSON from peer: invalid "
                                       "escape near"));
        g_assert_true(g_utf8_validate(err->message, -1, NULL));
        for (const char *c = err->message; *c; c++) {
            g_assert_cmpint(*c, >=, 0x20);
            g_assert_cmpint(*c, !=, 0x7f);
        }
        g_assert_nonnull(strstr(err->message, "\\x"));
        qmp_parser_free(p);
    }
}

/* How a stream is cut into reads must not change what comes out, errors
 * and their stream offsets included. */
static void
test_split_patterns_agree(void)
{
    static const char *const streams[] = {
        "{\"a\":1} {\"b\":[{\"c\":\"}\\\"\"}]}\r\n{\"d\":{}}\nz",
        "{\"return\": {}}{\"return\": [1, 2.5, \"\\u00e9\"]}  [",
        "{\"a\": \"\xc3\xa9\"}{\"b\": \"\xc3\"}",
        "{}{}{}{\"x\": 18446744073709551616}",
        "{\"a\": [[[{]]]}",
    };

    for (size_t i = 0; i < G_N_ELEMENTS(streams); i++) {
        size_t len = strlen(streams[i]);
        g_autofree char *whole =
            transcript(QMP_PARSER_QMP, 0, streams[i], len, 0);

        g_assert_nonnull(strstr(whole, "error: "));
        for (size_t chunk = 1; chunk <= len; chunk++) {
            g_autofree char *got =
                transcript(QMP_PARSER_QMP, 0, streams[i], len, chunk);

            g_assert_cmpstr(got, ==, whole);
        }
    }
}

/* A 4 MiB message fed one byte per read, with a drain after each.  A
 * parser that rescans or copies the buffer on every feed does ~8e12 steps
 * here and never finishes; the linear one takes well under a second. */
static void
test_byte_at_a_time_is_linear(void)
{
    size_t len = 4u << 20;
    g_autofree char *big = message_of_size(len);
    struct qmp_parser *p = qmp_parser_new(QMP_PARSER_QMP, 0);
    json_auto_t *msg = NULL;
    g_autoptr(GError) err = NULL;
    size_t i;

    for (i = 0; i < len; i++) {
        qmp_parser_feed(p, big + i, 1);
        if (qmp_parser_next(p, &msg, &err) != 0) {
            break;
        }
    }
    g_assert_no_error(err);
    g_assert_cmpuint(i, ==, len - 1);
    g_assert_cmpuint(json_string_length(json_object_get(msg, "a")), ==,
                     len - 8);
    qmp_parser_free(p);
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);

    g_test_add_func("/qmp/parser/one-message", test_one_message);
    g_test_add_func("/qmp/parser/reply-split-across-reads",
                    test_reply_split_across_reads);
    g_test_add_func("/qmp/parser/several-messages-in-one-read",
                    test_several_messages_in_one_read);
    g_test_add_func("/qmp/parser/event-between-command-and-reply",
                    test_event_between_command_and_reply);
    g_test_add_func("/qmp/parser/garbage-between-messages",
                    test_garbage_between_messages);
    g_test_add_func("/qmp/parser/non-object-top-level",
                    test_non_object_top_level);
    g_test_add_func("/qmp/parser/oversized-message", test_oversized_message);
    g_test_add_func("/qmp/parser/deep-nesting", test_deep_nesting);
    g_test_add_func("/qmp/parser/mismatched-brackets",
                    test_mismatched_brackets);
    g_test_add_func("/qmp/parser/huge-number", test_huge_number);
    g_test_add_func("/qmp/parser/invalid-utf8", test_invalid_utf8);
    g_test_add_func("/qmp/parser/braces-inside-strings",
                    test_braces_inside_strings);
    g_test_add_func("/qmp/parser/escaped-quotes", test_escaped_quotes);
    g_test_add_func("/qmp/parser/eof-mid-message", test_eof_mid_message);
    g_test_add_func("/qmp/parser/poisoned-after-error",
                    test_poisoned_after_error);
    g_test_add_func("/qmp/parser/reset-clears-poison",
                    test_reset_clears_poison);
    g_test_add_func("/qmp/parser/qga-sentinel-discards-junk",
                    test_qga_sentinel_discards_junk);
    g_test_add_func("/qmp/parser/qga-sentinel-anywhere",
                    test_qga_sentinel_anywhere);
    g_test_add_func("/qmp/parser/qga-sentinel-drops-undrained-messages",
                    test_qga_sentinel_drops_undrained_messages);
    g_test_add_func("/qmp/parser/qmp-rejects-0xff", test_qmp_rejects_0xff);
    g_test_add_func("/qmp/parser/error-messages-are-printable",
                    test_error_messages_are_printable);
    g_test_add_func("/qmp/parser/split-patterns-agree",
                    test_split_patterns_agree);
    g_test_add_func("/qmp/parser/byte-at-a-time-is-linear",
                    test_byte_at_a_time_is_linear);

    return g_test_run();
}

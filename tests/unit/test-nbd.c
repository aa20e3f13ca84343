/* Unit tests for io/nbd_proto.c: the NBD server core, with no sockets.
 *
 * A tiny client builds the bytes of doc/proto.md (NBD project) by hand; they
 * are fed through nbd_conn_want()/nbd_conn_received() the way the glue
 * does, cut into reads whole, byte by byte or at pseudo-random points (every
 * test runs under each cutting).  Output is gathered with
 * nbd_conn_output()/nbd_conn_output_sent() into one byte string that the
 * test parses as the client would.  A fake backend records the requests it
 * is handed and completes them at once or when the test says.
 */
#include <endian.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/nbd.h"

#define NBDMAGIC UINT64_C(0x4e42444d41474943)
#define IHAVEOPT UINT64_C(0x49484156454f5054)
#define REP_MAGIC UINT64_C(0x3e889045565a9)
#define REQUEST_MAGIC 0x25609513u
#define REPLY_MAGIC 0x67446698u

#define FLAG_FIXED_NEWSTYLE 1u
#define FLAG_NO_ZEROES 2u

#define OPT_EXPORT_NAME 1
#define OPT_ABORT 2
#define OPT_LIST 3
#define OPT_STARTTLS 5
#define OPT_INFO 6
#define OPT_GO 7
#define OPT_STRUCTURED_REPLY 8
#define OPT_LIST_META_CONTEXT 9
#define OPT_SET_META_CONTEXT 10
#define OPT_EXTENDED_HEADERS 11

#define REP_ACK 1u
#define REP_SERVER 2u
#define REP_INFO 3u
#define REP_ERR_UNSUP 0x80000001u
#define REP_ERR_INVALID 0x80000003u
#define REP_ERR_UNKNOWN 0x80000006u

#define INFO_EXPORT 0
#define INFO_NAME 1
#define INFO_BLOCK_SIZE 3

#define TFLAG_HAS_FLAGS (1u << 0)
#define TFLAG_READ_ONLY (1u << 1)
#define TFLAG_SEND_FLUSH (1u << 2)
#define TFLAG_SEND_FUA (1u << 3)
#define TFLAG_SEND_TRIM (1u << 5)
#define TFLAG_SEND_WRITE_ZEROES (1u << 6)
#define TFLAG_SEND_FAST_ZERO (1u << 11)

#define EXPORT_SIZE (UINT64_C(1) << 20)
#define MAX_BLOCK (64u << 10)
#define SLOTS 4

/* ---- how the client's bytes are cut into reads ---- */

enum cutting { CUT_WHOLE, CUT_BYTEWISE, CUT_RANDOM };

static const struct {
    const char *name;
    enum cutting cut;
} cuttings[] = {
    {"whole", CUT_WHOLE},
    {"bytewise", CUT_BYTEWISE},
    {"random", CUT_RANDOM},
};

/* ---- the fake backend ---- */

struct seen {
    uint64_t cookie;
    uint64_t offset;
    uint32_t len;
    uint16_t type;
    uint16_t flags;
    GBytes *payload; /* WRITE only */
    bool buf_aligned;
};

struct backend {
    bool hold;       /* keep requests until the test completes them */
    uint32_t error;  /* what immediate completions reply */
    GArray *seen;    /* struct seen */
    GPtrArray *held; /* struct nbd_request * */
};

/* What a READ of (offset, len) returns from the fake backend. */
static uint8_t
pattern_at(uint64_t pos)
{
    return (uint8_t)(pos * 7 + (pos >> 8) + 1);
}

static void
backend_complete(struct nbd_request *req, uint32_t err)
{
    if (req->type == NBD_CMD_READ) {
        for (uint32_t i = 0; i < req->len; i++) {
            ((uint8_t *)req->buf)[i] = pattern_at(req->offset + i);
        }
    }
    nbd_conn_request_done(req, err);
}

static void
backend_request(void *opaque, struct nbd_request *req)
{
    struct backend *b = opaque;
    struct seen s = {
        .cookie = req->cookie,
        .offset = req->offset,
        .len = req->len,
        .type = req->type,
        .flags = req->flags,
        .buf_aligned = ((uintptr_t)req->buf & 4095) == 0,
    };

    if (req->type == NBD_CMD_WRITE) {
        s.payload = g_bytes_new(req->buf, req->len);
    }
    g_array_append_val(b->seen, s);
    if (b->hold) {
        g_ptr_array_add(b->held, req);
    } else {
        backend_complete(req, b->error);
    }
}

static void
seen_clear(gpointer p)
{
    struct seen *s = p;

    g_clear_pointer(&s->payload, g_bytes_unref);
}

/* ---- the test fixture: one connection, client side and server side ---- */

struct t {
    struct nbd_conn *c;
    struct nbd_export exp;
    struct nbd_backend nbd_backend;
    struct backend be;
    enum cutting cut;
    GRand *rand;
    GByteArray *out; /* everything the server sent */
    size_t out_pos;  /* what the test has parsed of it */
};

static void
t_init_full(struct t *t, enum cutting cut, bool read_only, unsigned slots)
{
    memset(t, 0, sizeof(*t));
    t->exp.name = "vd0";
    t->exp.size = EXPORT_SIZE;
    t->exp.min_block = 1;
    t->exp.pref_block = 4096;
    t->exp.max_block = MAX_BLOCK;
    t->exp.read_only = read_only;
    t->be.seen = g_array_new(false, true, sizeof(struct seen));
    g_array_set_clear_func(t->be.seen, seen_clear);
    t->be.held = g_ptr_array_new();
    t->nbd_backend.request_fn = backend_request;
    t->nbd_backend.opaque = &t->be;
    t->cut = cut;
    t->rand = g_rand_new_with_seed(0x6e6264 + (guint32)cut);
    t->out = g_byte_array_new();
    t->c = nbd_conn_new(&t->exp, &t->nbd_backend, slots);
}

static void
t_init(struct t *t, gconstpointer data)
{
    t_init_full(t, *(const enum cutting *)data, false, SLOTS);
}

static void
t_fini(struct t *t)
{
    /* The core's buffers are in use until the backend lets go. */
    g_assert_cmpuint(t->be.held->len, ==, 0);
    nbd_conn_free(t->c);
    g_array_unref(t->be.seen);
    g_ptr_array_unref(t->be.held);
    g_rand_free(t->rand);
    g_byte_array_unref(t->out);
}

/* "Send" up to max bytes of pending output (SIZE_MAX: all of it), the way
 * the glue does: gather, send, report.  Returns the bytes sent. */
static size_t
send_output(struct t *t, size_t max)
{
    struct iovec iov[5];
    size_t done = 0;
    int n;

    while (done < max &&
           (n = nbd_conn_output(t->c, iov, G_N_ELEMENTS(iov))) > 0) {
        size_t total = 0, send, left;

        for (int i = 0; i < n; i++) {
            /* The glue would send 0 bytes and take that for a dead
             * socket. */
            g_assert_cmpuint(iov[i].iov_len, >, 0);
            total += iov[i].iov_len;
        }
        send = MIN(total, max - done);
        if (t->cut == CUT_BYTEWISE) {
            send = 1;
        } else if (t->cut == CUT_RANDOM) {
            send = (size_t)g_rand_int_range(t->rand, 1, (gint32)send + 1);
        }
        left = send;
        for (int i = 0; i < n && left > 0; i++) {
            size_t k = MIN(left, iov[i].iov_len);

            g_byte_array_append(t->out, iov[i].iov_base, (guint)k);
            left -= k;
        }
        nbd_conn_output_sent(t->c, send);
        done += send;
    }
    return done;
}

static void
drain(struct t *t)
{
    send_output(t, SIZE_MAX);
}

static bool
output_pending(struct t *t)
{
    struct iovec iov;

    return nbd_conn_output(t->c, &iov, 1) > 0;
}

/* Feed client bytes the way the glue does: only what want() asks for, in
 * reads cut by t->cut, sending output whenever the core waits for it.
 * Returns how many bytes the core took; it stops taking them when it waits
 * for the backend, closes, or (*ok = false) declares the connection dead. */
static size_t
feed(struct t *t, const void *data, size_t len, bool *ok)
{
    size_t off = 0;

    *ok = true;
    while (off < len) {
        void *buf;
        size_t want, n;

        nbd_conn_want(t->c, &buf, &want);
        if (want == 0) {
            if (!nbd_conn_closing(t->c) && output_pending(t)) {
                drain(t); /* a reply still holds a slot */
                continue;
            }
            break;
        }
        g_assert_nonnull(buf);
        n = MIN(want, len - off);
        if (t->cut == CUT_BYTEWISE) {
            n = 1;
        } else if (t->cut == CUT_RANDOM) {
            n = (size_t)g_rand_int_range(t->rand, 1, (gint32)MIN(n, 4096) + 1);
        }
        memcpy(buf, (const uint8_t *)data + off, n);
        off += n;
        if (!nbd_conn_received(t->c, n)) {
            *ok = false;
            break;
        }
        if (t->cut == CUT_RANDOM && g_rand_boolean(t->rand)) {
            drain(t); /* replies interleaved with requests */
        }
    }
    return off;
}

/* The client sends b; all of it must be taken. */
static void
client_send(struct t *t, GByteArray *b)
{
    bool ok;

    g_assert_cmpuint(feed(t, b->data, b->len, &ok), ==, b->len);
    g_assert_true(ok);
    g_assert_null(nbd_conn_error(t->c));
    drain(t);
    g_byte_array_set_size(b, 0);
}

/* The client sends b and the core must drop the connection after exactly
 * `taken` bytes. */
static void
client_send_fatal(struct t *t, GByteArray *b, size_t taken)
{
    void *buf;
    size_t want;
    bool ok;

    g_assert_cmpuint(feed(t, b->data, b->len, &ok), ==, taken);
    g_assert_false(ok);
    g_assert_nonnull(nbd_conn_error(t->c));
    g_assert_true(nbd_conn_closing(t->c));
    g_assert_false(nbd_conn_transmitting(t->c));
    nbd_conn_want(t->c, &buf, &want);
    g_assert_cmpuint(want, ==, 0);
    g_byte_array_set_size(b, 0);
}

/* ---- the client's side of the wire ---- */

static void
put16(GByteArray *b, uint16_t v)
{
    v = htobe16(v);
    g_byte_array_append(b, (const guint8 *)&v, 2);
}

static void
put32(GByteArray *b, uint32_t v)
{
    v = htobe32(v);
    g_byte_array_append(b, (const guint8 *)&v, 4);
}

static void
put64(GByteArray *b, uint64_t v)
{
    v = htobe64(v);
    g_byte_array_append(b, (const guint8 *)&v, 8);
}

static void
c_option(GByteArray *b, uint32_t opt, const void *data, uint32_t len)
{
    put64(b, IHAVEOPT);
    put32(b, opt);
    put32(b, len);
    if (len) {
        g_byte_array_append(b, data, len);
    }
}

/* NBD_OPT_GO / NBD_OPT_INFO: name, then n info requests. */
static void
c_go(GByteArray *b, uint32_t opt, const char *name, const uint16_t *info,
     unsigned n)
{
    g_autoptr(GByteArray) d = g_byte_array_new();

    put32(d, (uint32_t)strlen(name));
    g_byte_array_append(d, (const guint8 *)name, (guint)strlen(name));
    put16(d, (uint16_t)n);
    for (unsigned i = 0; i < n; i++) {
        put16(d, info[i]);
    }
    c_option(b, opt, d->data, d->len);
}

static void
c_request(GByteArray *b, uint16_t flags, uint16_t type, uint64_t cookie,
          uint64_t off, uint32_t len)
{
    put32(b, REQUEST_MAGIC);
    put16(b, flags);
    put16(b, type);
    put64(b, cookie);
    put64(b, off);
    put32(b, len);
}

/* A WRITE with its payload: len bytes of fill. */
static void
c_write(GByteArray *b, uint16_t flags, uint64_t cookie, uint64_t off,
        uint32_t len, uint8_t fill)
{
    c_request(b, flags, NBD_CMD_WRITE, cookie, off, len);
    for (uint32_t i = 0; i < len; i++) {
        g_byte_array_append(b, &fill, 1);
    }
}

/* ---- parsing what the server sent ---- */

static const uint8_t *
take(struct t *t, size_t n)
{
    const uint8_t *p;

    g_assert_cmpuint(t->out->len - t->out_pos, >=, n);
    p = t->out->data + t->out_pos;
    t->out_pos += n;
    return p;
}

static uint16_t
take16(struct t *t)
{
    uint16_t v;

    memcpy(&v, take(t, 2), 2);
    return be16toh(v);
}

static uint32_t
take32(struct t *t)
{
    uint32_t v;

    memcpy(&v, take(t, 4), 4);
    return be32toh(v);
}

static uint64_t
take64(struct t *t)
{
    uint64_t v;

    memcpy(&v, take(t, 8), 8);
    return be64toh(v);
}

static void
expect_no_more_output(struct t *t)
{
    drain(t);
    g_assert_cmpuint(t->out->len, ==, t->out_pos);
}

static void
expect_greeting(struct t *t)
{
    drain(t);
    g_assert_cmphex(take64(t), ==, NBDMAGIC);
    g_assert_cmphex(take64(t), ==, IHAVEOPT);
    g_assert_cmphex(take16(t), ==, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/* An option reply's header; returns its data length. */
static uint32_t
expect_opt_reply(struct t *t, uint32_t opt, uint32_t type)
{
    drain(t);
    g_assert_cmphex(take64(t), ==, REP_MAGIC);
    g_assert_cmpuint(take32(t), ==, opt);
    g_assert_cmphex(take32(t), ==, type);
    return take32(t);
}

static void
expect_info_export(struct t *t, uint32_t opt, uint16_t flags)
{
    g_assert_cmpuint(expect_opt_reply(t, opt, REP_INFO), ==, 12);
    g_assert_cmpuint(take16(t), ==, INFO_EXPORT);
    g_assert_cmpuint(take64(t), ==, t->exp.size);
    g_assert_cmphex(take16(t), ==, flags);
}

static void
expect_reply(struct t *t, uint64_t cookie, uint32_t error)
{
    drain(t);
    g_assert_cmphex(take32(t), ==, REPLY_MAGIC);
    g_assert_cmpuint(take32(t), ==, error);
    g_assert_cmphex(take64(t), ==, cookie);
}

/* A READ's reply and payload as the fake backend fills it. */
static void
expect_read_reply(struct t *t, uint64_t cookie, uint64_t off, uint32_t len)
{
    const uint8_t *p;

    expect_reply(t, cookie, 0);
    p = take(t, len);
    for (uint32_t i = 0; i < len; i++) {
        if (p[i] != pattern_at(off + i)) {
            g_assert_cmphex(p[i], ==, pattern_at(off + i));
        }
    }
}

static const uint16_t rw_flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH |
                                 TFLAG_SEND_FUA | TFLAG_SEND_TRIM |
                                 TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
static const uint16_t ro_flags =
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;

/* The server's answers to GO "vd0", the greeting already taken: requests
 * may flow. */
static void
expect_go_vd0(struct t *t)
{
    uint16_t flags = t->exp.read_only ? ro_flags : rw_flags;

    if (t->exp.no_flush) {
        flags &= (uint16_t) ~(TFLAG_SEND_FLUSH | TFLAG_SEND_FUA);
    }
    expect_info_export(t, OPT_GO, flags);
    g_assert_cmpuint(expect_opt_reply(t, OPT_GO, REP_ACK), ==, 0);
    g_assert_true(nbd_conn_transmitting(t->c));
}

/* During negotiation: GO to "vd0" succeeds. */
static void
go_vd0(struct t *t, GByteArray *b)
{
    c_go(b, OPT_GO, "vd0", NULL, 0);
    client_send(t, b);
    expect_go_vd0(t);
}

/* Fixed newstyle, GO to "vd0" in the same bytes: requests may flow. */
static void
handshake(struct t *t)
{
    g_autoptr(GByteArray) b = g_byte_array_new();

    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c_go(b, OPT_GO, "vd0", NULL, 0);
    client_send(t, b);
    expect_greeting(t);
    expect_go_vd0(t);
}

static struct seen *
seen_at(struct t *t, unsigned i)
{
    g_assert_cmpuint(t->be.seen->len, >, i);
    return &g_array_index(t->be.seen, struct seen, i);
}

static void
expect_seen(struct t *t, unsigned i, uint16_t type, uint64_t cookie,
            uint64_t off, uint32_t len, uint16_t flags)
{
    struct seen *s = seen_at(t, i);

    g_assert_cmpuint(s->type, ==, type);
    g_assert_cmphex(s->cookie, ==, cookie);
    g_assert_cmpuint(s->offset, ==, off);
    g_assert_cmpuint(s->len, ==, len);
    g_assert_cmphex(s->flags, ==, flags);
}

static void
complete_held(struct t *t, unsigned i, uint32_t err)
{
    struct nbd_request *req = g_ptr_array_remove_index(t->be.held, i);

    backend_complete(req, err);
}

static size_t
want_len(struct t *t)
{
    void *buf;
    size_t len;

    nbd_conn_want(t->c, &buf, &len);
    return len;
}

/* ---- the handshake ---- */

static void
test_greeting_is_fixed_newstyle(gconstpointer data)
{
    struct t t;

    t_init(&t, data);
    expect_greeting(&t);
    expect_no_more_output(&t);
    /* Next: the client's 32-bit flags. */
    g_assert_cmpuint(want_len(&t), ==, 4);
    g_assert_false(nbd_conn_transmitting(t.c));
    g_assert_false(nbd_conn_closing(t.c));
    t_fini(&t);
}

static const struct go_case {
    const char *name;
    uint16_t info[3];
    unsigned n_info;
    bool block_size;
} go_cases[] = {
    {"vd0", {INFO_BLOCK_SIZE}, 1, true},
    {"vd0", {0}, 0, false},
    /* Info types the server does not know are ignored. */
    {"vd0", {INFO_NAME, INFO_BLOCK_SIZE, 0x7777}, 3, true},
    /* The empty name is the default export. */
    {"", {INFO_BLOCK_SIZE}, 1, true},
};

static void
test_go_with_block_size_info(gconstpointer data)
{
    for (size_t i = 0; i < G_N_ELEMENTS(go_cases); i++) {
        const struct go_case *gc = &go_cases[i];
        g_autoptr(GByteArray) b = g_byte_array_new();
        struct t t;

        t_init(&t, data);
        put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c_go(b, OPT_GO, gc->name, gc->info, gc->n_info);
        client_send(&t, b);
        expect_greeting(&t);
        expect_info_export(&t, OPT_GO, rw_flags);
        if (gc->block_size) {
            g_assert_cmpuint(expect_opt_reply(&t, OPT_GO, REP_INFO), ==, 14);
            g_assert_cmpuint(take16(&t), ==, INFO_BLOCK_SIZE);
            g_assert_cmpuint(take32(&t), ==, 1);
            g_assert_cmpuint(take32(&t), ==, 4096);
            g_assert_cmpuint(take32(&t), ==, MAX_BLOCK);
        }
        g_assert_cmpuint(expect_opt_reply(&t, OPT_GO, REP_ACK), ==, 0);
        expect_no_more_output(&t);
        g_assert_true(nbd_conn_transmitting(t.c));
        g_assert_cmpuint(want_len(&t), ==, 28);
        t_fini(&t);
    }
}

static void
test_go_unknown_export_err_unknown(gconstpointer data)
{
    static const char *const names[] = {"vd1", "vd", "vd00", "VD0"};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client_send(&t, b);
    expect_greeting(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
        c_go(b, OPT_GO, names[i], NULL, 0);
        client_send(&t, b);
        g_assert_cmpuint(expect_opt_reply(&t, OPT_GO, REP_ERR_UNKNOWN), ==, 0);
        expect_no_more_output(&t);
        /* Still negotiating: the client may try another name. */
        g_assert_false(nbd_conn_transmitting(t.c));
        g_assert_cmpuint(want_len(&t), ==, 16);
    }
    go_vd0(&t, b);
    t_fini(&t);
}

/* GO data whose lengths do not add up. */
static const struct {
    const char *what;
    const uint8_t data[16];
    uint32_t len;
} bad_go[] = {
    {"shorter than name length and info count", {0, 0, 0, 0, 0}, 5},
    {"name longer than the option", {0, 0, 0, 9, 'v', 'd', '0', 0, 0}, 9},
    {"name length near 2^32", {0xff, 0xff, 0xff, 0xfa, 'v', 'd'}, 6},
    {"info count larger than the option",
     {0, 0, 0, 3, 'v', 'd', '0', 0, 2, 0, 3},
     11},
    {"trailing byte", {0, 0, 0, 3, 'v', 'd', '0', 0, 0, 0}, 10},
};

static void
test_malformed_go_err_invalid(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client_send(&t, b);
    expect_greeting(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(bad_go); i++) {
        g_test_message("%s", bad_go[i].what);
        c_option(b, OPT_GO, bad_go[i].data, bad_go[i].len);
        client_send(&t, b);
        g_assert_cmpuint(expect_opt_reply(&t, OPT_GO, REP_ERR_INVALID), ==, 0);
        g_assert_false(nbd_conn_transmitting(t.c));
    }
    go_vd0(&t, b);
    t_fini(&t);
}

static void
test_info_does_not_start_transmission(gconstpointer data)
{
    static const uint16_t info[] = {INFO_BLOCK_SIZE};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c_go(b, OPT_INFO, "vd0", info, 1);
    client_send(&t, b);
    expect_greeting(&t);
    expect_info_export(&t, OPT_INFO, rw_flags);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_INFO, REP_INFO), ==, 14);
    take(&t, 14);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_INFO, REP_ACK), ==, 0);
    expect_no_more_output(&t);
    g_assert_false(nbd_conn_transmitting(t.c));
    /* The next thing read is another option header, not a request. */
    g_assert_cmpuint(want_len(&t), ==, 16);

    go_vd0(&t, b);
    t_fini(&t);
}

static const struct {
    uint32_t client_flags;
    const char *name;
    size_t zeroes;
} export_name_cases[] = {
    {FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, "vd0", 0},
    {FLAG_FIXED_NEWSTYLE, "vd0", 124},
    {FLAG_FIXED_NEWSTYLE, "", 124},
};

static void
test_export_name_option(gconstpointer data)
{
    for (size_t i = 0; i < G_N_ELEMENTS(export_name_cases); i++) {
        g_autoptr(GByteArray) b = g_byte_array_new();
        const char *name = export_name_cases[i].name;
        const uint8_t *z;
        struct t t;

        t_init(&t, data);
        put32(b, export_name_cases[i].client_flags);
        c_option(b, OPT_EXPORT_NAME, name, (uint32_t)strlen(name));
        client_send(&t, b);
        expect_greeting(&t);
        /* No option reply header: size, flags, maybe 124 zeroes. */
        g_assert_cmpuint(take64(&t), ==, EXPORT_SIZE);
        g_assert_cmphex(take16(&t), ==, rw_flags);
        z = take(&t, export_name_cases[i].zeroes);
        for (size_t k = 0; k < export_name_cases[i].zeroes; k++) {
            g_assert_cmpuint(z[k], ==, 0);
        }
        expect_no_more_output(&t);
        g_assert_true(nbd_conn_transmitting(t.c));

        c_request(b, 0, NBD_CMD_FLUSH, 1, 0, 0);
        client_send(&t, b);
        expect_reply(&t, 1, 0);
        expect_no_more_output(&t);
        t_fini(&t);
    }
}

static void
test_export_name_unknown_closes(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE);
    c_option(b, OPT_EXPORT_NAME, "vd1", 3);
    /* The protocol has no error reply for EXPORT_NAME: only closing. */
    client_send_fatal(&t, b, 4 + 16 + 3);
    expect_greeting(&t);
    expect_no_more_output(&t);
    t_fini(&t);
}

static void
test_list_names_the_export(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c_option(b, OPT_LIST, NULL, 0);
    client_send(&t, b);
    expect_greeting(&t);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_LIST, REP_SERVER), ==, 4 + 3);
    g_assert_cmpuint(take32(&t), ==, 3);
    g_assert_cmpmem(take(&t, 3), 3, "vd0", 3);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_LIST, REP_ACK), ==, 0);
    expect_no_more_output(&t);
    g_assert_false(nbd_conn_transmitting(t.c));

    /* LIST carries no data. */
    c_option(b, OPT_LIST, "x", 1);
    client_send(&t, b);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_LIST, REP_ERR_INVALID), ==, 0);
    expect_no_more_output(&t);
    g_assert_cmpuint(want_len(&t), ==, 16);
    t_fini(&t);
}

static const struct {
    uint32_t opt;
    uint32_t len;
} unsup_options[] = {
    {OPT_STARTTLS, 0},           {OPT_STRUCTURED_REPLY, 0},
    {OPT_LIST_META_CONTEXT, 40}, {OPT_SET_META_CONTEXT, 40},
    {OPT_EXTENDED_HEADERS, 0},   {0x7fffffff, 1000},
};

static void
test_unknown_option_err_unsup(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    g_autofree uint8_t *junk = g_malloc(1000);
    struct t t;

    memset(junk, 0xa5, 1000);
    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client_send(&t, b);
    expect_greeting(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(unsup_options); i++) {
        /* The option's data is consumed: the next header is in sync. */
        c_option(b, unsup_options[i].opt, junk, unsup_options[i].len);
        client_send(&t, b);
        g_assert_cmpuint(
            expect_opt_reply(&t, unsup_options[i].opt, REP_ERR_UNSUP), ==, 0);
        expect_no_more_output(&t);
        g_assert_false(nbd_conn_transmitting(t.c));
    }
    go_vd0(&t, b);
    /* STRUCTURED_REPLY was refused: replies stay simple. */
    c_request(b, 0, NBD_CMD_READ, 5, 0, 512);
    client_send(&t, b);
    expect_read_reply(&t, 5, 0, 512);
    expect_no_more_output(&t);
    t_fini(&t);
}

static void
test_abort_acks_and_closes(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;
    bool ok;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c_option(b, OPT_ABORT, NULL, 0);
    client_send(&t, b);
    expect_greeting(&t);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_ABORT, REP_ACK), ==, 0);
    expect_no_more_output(&t);
    g_assert_true(nbd_conn_closing(t.c));
    g_assert_true(nbd_conn_idle(t.c));
    g_assert_null(nbd_conn_error(t.c));
    g_assert_false(nbd_conn_got_disc(t.c));
    g_assert_cmpuint(want_len(&t), ==, 0);
    /* Nothing after ABORT is read. */
    c_go(b, OPT_GO, "vd0", NULL, 0);
    g_assert_cmpuint(feed(&t, b->data, b->len, &ok), ==, 0);
    expect_no_more_output(&t);
    t_fini(&t);
}

static void
test_client_without_fixed_newstyle_is_dropped(gconstpointer data)
{
    static const uint32_t flags[] = {
        0,
        FLAG_NO_ZEROES,
        FLAG_FIXED_NEWSTYLE | (1u << 2),
        0xffffffffu,
    };

    for (size_t i = 0; i < G_N_ELEMENTS(flags); i++) {
        g_autoptr(GByteArray) b = g_byte_array_new();
        struct t t;

        t_init(&t, data);
        put32(b, flags[i]);
        c_go(b, OPT_GO, "vd0", NULL, 0);
        client_send_fatal(&t, b, 4);
        expect_greeting(&t);
        expect_no_more_output(&t);
        t_fini(&t);
    }
}

static void
test_oversized_option_is_dropped(gconstpointer data)
{
    static const uint32_t lens[] = {8193, 1u << 20, 0xffffffffu};
    g_autoptr(GByteArray) b = g_byte_array_new();
    g_autofree uint8_t *big = g_malloc0(8192);
    uint32_t name_len = 8192 - 6;
    struct t t;

    for (size_t i = 0; i < G_N_ELEMENTS(lens); i++) {
        t_init(&t, data);
        put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        put64(b, IHAVEOPT);
        put32(b, OPT_GO);
        put32(b, lens[i]);
        g_byte_array_append(b, big, 100);
        /* Dropped on the header, before reading (or allocating) data. */
        client_send_fatal(&t, b, 4 + 16);
        expect_greeting(&t);
        expect_no_more_output(&t);
        t_fini(&t);
    }

    /* 8192 bytes is still accepted: a long name that matches nothing. */
    t_init(&t, data);
    name_len = htobe32(name_len);
    memcpy(big, &name_len, 4);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c_option(b, OPT_GO, big, 8192);
    client_send(&t, b);
    expect_greeting(&t);
    g_assert_cmpuint(expect_opt_reply(&t, OPT_GO, REP_ERR_UNKNOWN), ==, 0);
    g_assert_cmpuint(want_len(&t), ==, 16);
    t_fini(&t);
}

static void
test_bad_option_magic_is_dropped(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    put64(b, IHAVEOPT ^ 1);
    put32(b, OPT_GO);
    put32(b, 0);
    client_send_fatal(&t, b, 4 + 16);
    expect_greeting(&t);
    expect_no_more_output(&t);
    t_fini(&t);

    /* A request where an option belongs. */
    t_init(&t, data);
    put32(b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c_request(b, 0, NBD_CMD_READ, 1, 0, 512);
    client_send_fatal(&t, b, 4 + 16);
    g_assert_cmpuint(t.be.seen->len, ==, 0);
    t_fini(&t);
}

/* ---- transmission ---- */

static const struct {
    uint64_t off;
    uint32_t len;
    uint16_t flags;
} good_writes[] = {
    {8192, 4096, 0},   {EXPORT_SIZE - 1, 1, NBD_CMD_FLAG_FUA},
    {0, MAX_BLOCK, 0}, {EXPORT_SIZE - MAX_BLOCK, MAX_BLOCK, NBD_CMD_FLAG_FUA},
    {12345, 777, 0},
};

static void
test_write_lands_in_slot_buffer(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(good_writes); i++) {
        uint64_t cookie = UINT64_C(0x1122334455667700) + i;
        g_autofree uint8_t *payload = g_malloc(good_writes[i].len);
        struct seen *s;

        for (uint32_t k = 0; k < good_writes[i].len; k++) {
            payload[k] = (uint8_t)g_rand_int(t.rand);
        }
        c_request(b, good_writes[i].flags, NBD_CMD_WRITE, cookie,
                  good_writes[i].off, good_writes[i].len);
        g_byte_array_append(b, payload, good_writes[i].len);
        client_send(&t, b);
        expect_reply(&t, cookie, 0);
        expect_no_more_output(&t);

        g_assert_cmpuint(t.be.seen->len, ==, i + 1);
        expect_seen(&t, i, NBD_CMD_WRITE, cookie, good_writes[i].off,
                    good_writes[i].len, good_writes[i].flags);
        s = seen_at(&t, i);
        g_assert_true(s->buf_aligned);
        g_assert_cmpmem(g_bytes_get_data(s->payload, NULL),
                        g_bytes_get_size(s->payload), payload,
                        good_writes[i].len);
    }
    g_assert_true(nbd_conn_idle(t.c));
    t_fini(&t);
}

/* Ranges that do not fit in the 1 MiB export. */
static const struct {
    uint64_t off;
    uint32_t len;
} past_end[] = {
    {EXPORT_SIZE - 512, 4096}, {EXPORT_SIZE, 1},
    {EXPORT_SIZE + 4096, 512}, {UINT64_MAX - 511, 1024}, /* off + len wraps */
    {UINT64_MAX, 1},
};

static void
test_write_past_end_enospc(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(past_end); i++) {
        /* The refused payload is read and dropped, so the READ after it
         * is parsed as a request, not as payload. */
        c_write(b, 0, 100 + i, past_end[i].off, past_end[i].len, 0xee);
        c_request(b, 0, NBD_CMD_READ, 200 + i, 4096, 512);
        client_send(&t, b);
        expect_reply(&t, 100 + i, NBD_ENOSPC);
        expect_read_reply(&t, 200 + i, 4096, 512);
        expect_no_more_output(&t);
        /* Only the READ reached the backend. */
        g_assert_cmpuint(t.be.seen->len, ==, i + 1);
        expect_seen(&t, i, NBD_CMD_READ, 200 + i, 4096, 512, 0);
    }
    g_assert_true(nbd_conn_idle(t.c));
    t_fini(&t);
}

static void
test_read_past_end_einval(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(past_end); i++) {
        c_request(b, 0, NBD_CMD_READ, 100 + i, past_end[i].off,
                  past_end[i].len);
        c_request(b, 0, NBD_CMD_FLUSH, 200 + i, 0, 0);
        client_send(&t, b);
        /* No payload follows an error reply. */
        expect_reply(&t, 100 + i, NBD_EINVAL);
        expect_reply(&t, 200 + i, 0);
        expect_no_more_output(&t);
        g_assert_cmpuint(t.be.seen->len, ==, i + 1);
        expect_seen(&t, i, NBD_CMD_FLUSH, 200 + i, 0, 0, 0);
    }
    t_fini(&t);
}

static void
test_read_returns_payload_after_reply(gconstpointer data)
{
    static const struct {
        uint64_t off;
        uint32_t len;
        uint16_t flags;
    } reads[] = {
        {12345, 1000, 0},
        {0, MAX_BLOCK, 0},
        {EXPORT_SIZE - 1, 1, NBD_CMD_FLAG_FUA},
    };
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(reads); i++) {
        c_request(b, reads[i].flags, NBD_CMD_READ, 40 + i, reads[i].off,
                  reads[i].len);
        client_send(&t, b);
        expect_read_reply(&t, 40 + i, reads[i].off, reads[i].len);
        expect_no_more_output(&t);
        expect_seen(&t, i, NBD_CMD_READ, 40 + i, reads[i].off, reads[i].len,
                    reads[i].flags);
        g_assert_true(seen_at(&t, i)->buf_aligned);
    }
    g_assert_true(nbd_conn_idle(t.c));
    t_fini(&t);
}

static void
test_oversized_write_disconnects(gconstpointer data)
{
    static const uint32_t lens[] = {MAX_BLOCK + 1, NBD_MAX_BLOCK_LIMIT + 1,
                                    0xffffffffu};

    for (size_t i = 0; i < G_N_ELEMENTS(lens); i++) {
        g_autoptr(GByteArray) b = g_byte_array_new();
        struct t t;

        t_init(&t, data);
        handshake(&t);
        /* Its payload cannot be skipped safely: the header is the end. */
        c_request(b, 0, NBD_CMD_WRITE, 1, 0, lens[i]);
        for (unsigned k = 0; k < 1000; k++) {
            put32(b, REQUEST_MAGIC);
        }
        client_send_fatal(&t, b, 28);
        g_assert_cmpuint(t.be.seen->len, ==, 0);
        expect_no_more_output(&t);
        t_fini(&t);
    }
}

static void
test_oversized_read_eoverflow(gconstpointer data)
{
    static const uint32_t lens[] = {MAX_BLOCK + 1, NBD_MAX_BLOCK_LIMIT + 1,
                                    0xffffffffu};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(lens); i++) {
        c_request(b, 0, NBD_CMD_READ, 10 + i, 0, lens[i]);
        c_request(b, 0, NBD_CMD_READ, 20 + i, 0, 16);
        client_send(&t, b);
        expect_reply(&t, 10 + i, NBD_EOVERFLOW);
        expect_read_reply(&t, 20 + i, 0, 16);
        expect_no_more_output(&t);
        g_assert_cmpuint(t.be.seen->len, ==, i + 1);
    }
    t_fini(&t);
}

static void
test_unknown_command_einval(gconstpointer data)
{
    /* CACHE, BLOCK_STATUS, RESIZE: not negotiated; and nonsense. */
    static const uint16_t types[] = {5, 7, 8, 0x7fff, 0xffff};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(types); i++) {
        c_request(b, 0, types[i], 10 + i, 0, 4096);
        c_request(b, 0, NBD_CMD_FLUSH, 20 + i, 0, 0);
        client_send(&t, b);
        expect_reply(&t, 10 + i, NBD_EINVAL);
        expect_reply(&t, 20 + i, 0);
        expect_no_more_output(&t);
        g_assert_cmpuint(t.be.seen->len, ==, i + 1);
        expect_seen(&t, i, NBD_CMD_FLUSH, 20 + i, 0, 0, 0);
    }
    t_fini(&t);
}

static void
test_unknown_flags_einval(gconstpointer data)
{
    /* DF (structured replies only), REQ_ONE, and undefined bits. */
    static const uint16_t flags[] = {1u << 2, 1u << 3, 1u << 7, 0x8000};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(flags); i++) {
        /* A WRITE's payload is still consumed. */
        c_write(b, flags[i], 10 + i, 0, 512, 0x42);
        c_request(b, flags[i], NBD_CMD_READ, 20 + i, 0, 512);
        c_request(b, flags[i] | NBD_CMD_FLAG_FUA, NBD_CMD_TRIM, 30 + i, 0,
                  4096);
        c_request(b, 0, NBD_CMD_READ, 40 + i, 512, 64);
        client_send(&t, b);
        expect_reply(&t, 10 + i, NBD_EINVAL);
        expect_reply(&t, 20 + i, NBD_EINVAL);
        expect_reply(&t, 30 + i, NBD_EINVAL);
        expect_read_reply(&t, 40 + i, 512, 64);
        expect_no_more_output(&t);
        g_assert_cmpuint(t.be.seen->len, ==, i + 1);
        expect_seen(&t, i, NBD_CMD_READ, 40 + i, 512, 64, 0);
    }
    t_fini(&t);
}

static void
test_bad_request_magic_disconnects(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    put32(b, REQUEST_MAGIC + 1);
    put16(b, 0);
    put16(b, NBD_CMD_READ);
    put64(b, 1);
    put64(b, 0);
    put32(b, 512);
    c_request(b, 0, NBD_CMD_FLUSH, 2, 0, 0);
    client_send_fatal(&t, b, 28);
    g_assert_cmpuint(t.be.seen->len, ==, 0);
    expect_no_more_output(&t);
    t_fini(&t);
}

static void
test_zero_length_requests(gconstpointer data)
{
    static const uint16_t types[] = {NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM,
                                     NBD_CMD_WRITE_ZEROES};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    /* One slot: a zero-length request that kept its slot would stall the
     * stream at the next header. */
    t_init_full(&t, *(const enum cutting *)data, false, 1);
    handshake(&t);
    t.be.hold = true; /* nothing may reach the backend */
    for (unsigned round = 0; round < 3; round++) {
        for (size_t i = 0; i < G_N_ELEMENTS(types); i++) {
            c_request(b, 0, types[i], round * 10 + i, 4096, 0);
        }
        client_send(&t, b);
        for (size_t i = 0; i < G_N_ELEMENTS(types); i++) {
            expect_reply(&t, round * 10 + i, 0);
        }
        expect_no_more_output(&t);
        g_assert_true(nbd_conn_idle(t.c));
        g_assert_cmpuint(want_len(&t), ==, 28);
    }
    g_assert_cmpuint(t.be.seen->len, ==, 0);
    t_fini(&t);
}

static void
wake_count(void *opaque)
{
    (*(unsigned *)opaque)++;
}

static void
test_replies_out_of_order_by_cookie(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    unsigned wakes = 0;
    struct t t;

    t_init(&t, data);
    handshake(&t);
    nbd_conn_set_wake(t.c, wake_count, &wakes);
    t.be.hold = true;
    c_write(b, 0, 10, 0, 4096, 0x10);
    c_request(b, 0, NBD_CMD_READ, 11, 8192, 512);
    c_request(b, 0, NBD_CMD_FLUSH, 12, 0, 0);
    c_request(b, 0, NBD_CMD_TRIM, 13, 65536, 65536);
    client_send(&t, b);
    g_assert_cmpuint(t.be.held->len, ==, 4);
    g_assert_cmpuint(nbd_conn_backend_busy(t.c), ==, 4);
    g_assert_cmpuint(nbd_conn_inflight(t.c), ==, 4);
    expect_no_more_output(&t);

    /* Completion order decides reply order; each reply names its request
     * by cookie and carries its own error. */
    complete_held(&t, 2, 0);          /* FLUSH */
    complete_held(&t, 2, NBD_ENOSPC); /* TRIM */
    complete_held(&t, 1, 0);          /* READ */
    complete_held(&t, 0, NBD_EIO);    /* WRITE */
    g_assert_cmpuint(wakes, ==, 4);
    g_assert_cmpuint(nbd_conn_backend_busy(t.c), ==, 0);
    expect_reply(&t, 12, 0);
    expect_reply(&t, 13, NBD_ENOSPC);
    expect_read_reply(&t, 11, 8192, 512);
    expect_reply(&t, 10, NBD_EIO);
    expect_no_more_output(&t);
    g_assert_true(nbd_conn_idle(t.c));
    t_fini(&t);
}

static void
test_backpressure_waits_for_a_slot(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;
    size_t first_two;
    bool ok;

    t_init_full(&t, *(const enum cutting *)data, false, 2);
    handshake(&t);
    t.be.hold = true;
    c_write(b, 0, 1, 0, 1000, 0x01);
    c_request(b, 0, NBD_CMD_READ, 2, 4096, 300);
    first_two = b->len;
    c_write(b, 0, 3, 8192, 100, 0x03);
    c_request(b, 0, NBD_CMD_FLUSH, 4, 0, 0);

    /* Two slots, both held: not one byte of the third header is read. */
    g_assert_cmpuint(feed(&t, b->data, b->len, &ok), ==, first_two);
    g_assert_true(ok);
    g_byte_array_remove_range(b, 0, (guint)first_two);
    g_assert_cmpuint(t.be.held->len, ==, 2);
    g_assert_cmpuint(want_len(&t), ==, 0);
    g_assert_false(nbd_conn_closing(t.c));

    /* Done is not enough: the slot is free once its reply is sent. */
    complete_held(&t, 1, 0); /* the READ: 16 + 300 bytes to send */
    g_assert_cmpuint(want_len(&t), ==, 0);
    t.cut = CUT_WHOLE; /* exact control of what is sent */
    g_assert_cmpuint(send_output(&t, 16 + 299), ==, 16 + 299);
    g_assert_cmpuint(want_len(&t), ==, 0);
    g_assert_cmpuint(send_output(&t, 1), ==, 1);
    g_assert_cmpuint(want_len(&t), ==, 28);
    expect_read_reply(&t, 2, 4096, 300);

    /* One slot free: the third request is read, the fourth waits. */
    t.cut = *(const enum cutting *)data;
    g_assert_cmpuint(feed(&t, b->data, b->len, &ok), ==, 28 + 100);
    g_byte_array_remove_range(b, 0, 28 + 100);
    g_assert_cmpuint(t.be.held->len, ==, 2);
    g_assert_cmpuint(want_len(&t), ==, 0);

    complete_held(&t, 0, 0); /* the first WRITE */
    expect_reply(&t, 1, 0);
    client_send(&t, b); /* the FLUSH */
    g_assert_cmpuint(t.be.held->len, ==, 2);
    complete_held(&t, 1, 0);
    complete_held(&t, 0, 0);
    expect_reply(&t, 4, 0);
    expect_reply(&t, 3, 0);
    expect_no_more_output(&t);
    g_assert_true(nbd_conn_idle(t.c));
    t_fini(&t);
}

static void
test_disc_closes_after_inflight_done(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;
    size_t len;
    bool ok;

    t_init(&t, data);
    handshake(&t);
    t.be.hold = true;
    c_write(b, 0, 1, 0, 2048, 0x77);
    c_request(b, 0, NBD_CMD_DISC, 2, 0, 0);
    len = b->len;
    c_request(b, 0, NBD_CMD_FLUSH, 3, 0, 0); /* never read */
    g_assert_cmpuint(feed(&t, b->data, b->len, &ok), ==, len);
    g_assert_true(ok);
    g_assert_true(nbd_conn_got_disc(t.c));
    g_assert_true(nbd_conn_closing(t.c));
    g_assert_false(nbd_conn_transmitting(t.c));
    g_assert_cmpuint(want_len(&t), ==, 0);
    /* The WRITE before DISC still gets its reply before the close. */
    g_assert_false(nbd_conn_idle(t.c));
    complete_held(&t, 0, 0);
    g_assert_false(nbd_conn_idle(t.c));
    expect_reply(&t, 1, 0);
    expect_no_more_output(&t);
    g_assert_true(nbd_conn_idle(t.c));
    g_assert_null(nbd_conn_error(t.c));
    g_assert_cmpuint(t.be.seen->len, ==, 1);
    t_fini(&t);
}

static void
test_abort_with_request_held(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    t.be.hold = true;
    c_write(b, 0, 1, 0, 4096, 0x99);
    client_send(&t, b);
    /* The socket died: no more input, but the backend still owns the
     * buffer until it completes. */
    nbd_conn_abort(t.c, "recv: Connection reset by peer");
    g_assert_cmpstr(nbd_conn_error(t.c), ==, "recv: Connection reset by peer");
    g_assert_true(nbd_conn_closing(t.c));
    g_assert_cmpuint(want_len(&t), ==, 0);
    g_assert_cmpuint(nbd_conn_backend_busy(t.c), ==, 1);
    complete_held(&t, 0, 0);
    g_assert_cmpuint(nbd_conn_backend_busy(t.c), ==, 0);
    /* The first reason stays. */
    nbd_conn_abort(t.c, "later");
    g_assert_cmpstr(nbd_conn_error(t.c), ==, "recv: Connection reset by peer");
    t_fini(&t);
}

static void
test_read_only_export_refuses_writes(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init_full(&t, *(const enum cutting *)data, true, SLOTS);
    handshake(&t); /* checks READ_ONLY and no TRIM/WRITE_ZEROES flags */
    c_write(b, 0, 1, 0, 512, 0x55);
    c_request(b, 0, NBD_CMD_TRIM, 2, 0, 4096);
    c_request(b, 0, NBD_CMD_WRITE_ZEROES, 3, 0, 4096);
    c_request(b, 0, NBD_CMD_READ, 4, 0, 512);
    c_request(b, 0, NBD_CMD_FLUSH, 5, 0, 0);
    c_write(b, 0, 6, EXPORT_SIZE, 512, 0x55);
    client_send(&t, b);
    expect_reply(&t, 1, NBD_EPERM);
    expect_reply(&t, 2, NBD_EPERM);
    expect_reply(&t, 3, NBD_EPERM);
    expect_read_reply(&t, 4, 0, 512);
    expect_reply(&t, 5, 0);
    expect_reply(&t, 6, NBD_EPERM);
    expect_no_more_output(&t);
    g_assert_cmpuint(t.be.seen->len, ==, 2);
    expect_seen(&t, 0, NBD_CMD_READ, 4, 0, 512, 0);
    expect_seen(&t, 1, NBD_CMD_FLUSH, 5, 0, 0, 0);
    t_fini(&t);
}

static void
test_trim_and_write_zeroes_reach_backend(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    uint16_t wz_flags =
        NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    struct t t;

    t_init(&t, data);
    handshake(&t);
    /* Lengths past max_block are fine: no payload travels. */
    c_request(b, 0, NBD_CMD_TRIM, 1, 65536, 4 * MAX_BLOCK);
    c_request(b, wz_flags, NBD_CMD_WRITE_ZEROES, 2, 4096, 8192);
    c_request(b, NBD_CMD_FLAG_FUA, NBD_CMD_TRIM, 3, 0, EXPORT_SIZE);
    c_request(b, 0, NBD_CMD_WRITE_ZEROES, 4, EXPORT_SIZE - 100, 200);
    c_request(b, 0, NBD_CMD_TRIM, 5, EXPORT_SIZE + 1, 0);
    /* Neither carries data: this is parsed as the next request. */
    c_request(b, 0, NBD_CMD_READ, 6, 0, 32);
    client_send(&t, b);
    expect_reply(&t, 1, 0);
    expect_reply(&t, 2, 0);
    expect_reply(&t, 3, 0);
    expect_reply(&t, 4, NBD_ENOSPC);
    expect_reply(&t, 5, NBD_ENOSPC);
    expect_read_reply(&t, 6, 0, 32);
    expect_no_more_output(&t);
    g_assert_cmpuint(t.be.seen->len, ==, 4);
    expect_seen(&t, 0, NBD_CMD_TRIM, 1, 65536, 4 * MAX_BLOCK, 0);
    expect_seen(&t, 1, NBD_CMD_WRITE_ZEROES, 2, 4096, 8192, wz_flags);
    expect_seen(&t, 2, NBD_CMD_TRIM, 3, 0, EXPORT_SIZE, NBD_CMD_FLAG_FUA);
    expect_seen(&t, 3, NBD_CMD_READ, 6, 0, 32, 0);
    t_fini(&t);
}

static void
test_flush_reaches_backend(gconstpointer data)
{
    static const uint32_t errors[] = {0, NBD_EIO, NBD_ENOSPC};
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    handshake(&t);
    for (size_t i = 0; i < G_N_ELEMENTS(errors); i++) {
        t.be.error = errors[i];
        c_request(b, 0, NBD_CMD_FLUSH, 70 + i, 0, 0);
        client_send(&t, b);
        /* The backend's verdict is the reply. */
        expect_reply(&t, 70 + i, errors[i]);
        expect_no_more_output(&t);
        expect_seen(&t, i, NBD_CMD_FLUSH, 70 + i, 0, 0, 0);
    }
    t_fini(&t);
}

/* An export with no_flush offers neither FLUSH nor FUA and refuses both
 * without bothering the backend; a refused WRITE's payload is skipped. */
static void
test_no_flush_refuses_flush_and_fua(gconstpointer data)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct t t;

    t_init(&t, data);
    t.exp.no_flush = true;
    handshake(&t);
    c_request(b, 0, NBD_CMD_FLUSH, 1, 0, 0);
    c_write(b, NBD_CMD_FLAG_FUA, 2, 0, 512, 0x42);
    c_request(b, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE_ZEROES, 3, 0, 4096);
    c_write(b, 0, 4, 4096, 512, 0x43);
    client_send(&t, b);
    expect_reply(&t, 1, NBD_EINVAL);
    expect_reply(&t, 2, NBD_EINVAL);
    expect_reply(&t, 3, NBD_EINVAL);
    expect_reply(&t, 4, 0);
    expect_no_more_output(&t);
    g_assert_cmpuint(t.be.seen->len, ==, 1);
    expect_seen(&t, 0, NBD_CMD_WRITE, 4, 4096, 512, 0);
    t_fini(&t);
}

/* Each test runs under every way of cutting the byte streams. */
static const struct {
    const char *name;
    GTestDataFunc fn;
} tests[] = {
    {"greeting-is-fixed-newstyle", test_greeting_is_fixed_newstyle},
    {"go-with-block-size-info", test_go_with_block_size_info},
    {"go-unknown-export-err-unknown", test_go_unknown_export_err_unknown},
    {"malformed-go-err-invalid", test_malformed_go_err_invalid},
    {"info-does-not-start-transmission", test_info_does_not_start_transmission},
    {"no-flush-refuses-flush-and-fua", test_no_flush_refuses_flush_and_fua},
    {"export-name-option", test_export_name_option},
    {"export-name-unknown-closes", test_export_name_unknown_closes},
    {"list-names-the-export", test_list_names_the_export},
    {"unknown-option-err-unsup", test_unknown_option_err_unsup},
    {"abort-acks-and-closes", test_abort_acks_and_closes},
    {"client-without-fixed-newstyle-is-dropped",
     test_client_without_fixed_newstyle_is_dropped},
    {"oversized-option-is-dropped", test_oversized_option_is_dropped},
    {"bad-option-magic-is-dropped", test_bad_option_magic_is_dropped},
    {"write-lands-in-slot-buffer", test_write_lands_in_slot_buffer},
    {"write-past-end-enospc", test_write_past_end_enospc},
    {"read-past-end-einval", test_read_past_end_einval},
    {"read-returns-payload-after-reply", test_read_returns_payload_after_reply},
    {"oversized-write-disconnects", test_oversized_write_disconnects},
    {"oversized-read-eoverflow", test_oversized_read_eoverflow},
    {"unknown-command-einval", test_unknown_command_einval},
    {"unknown-flags-einval", test_unknown_flags_einval},
    {"bad-request-magic-disconnects", test_bad_request_magic_disconnects},
    {"zero-length-requests", test_zero_length_requests},
    {"replies-out-of-order-by-cookie", test_replies_out_of_order_by_cookie},
    {"backpressure-waits-for-a-slot", test_backpressure_waits_for_a_slot},
    {"disc-closes-after-inflight-done", test_disc_closes_after_inflight_done},
    {"abort-with-request-held", test_abort_with_request_held},
    {"read-only-export-refuses-writes", test_read_only_export_refuses_writes},
    {"trim-and-write-zeroes-reach-backend",
     test_trim_and_write_zeroes_reach_backend},
    {"flush-reaches-backend", test_flush_reaches_backend},
};

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    for (size_t i = 0; i < G_N_ELEMENTS(tests); i++) {
        for (size_t k = 0; k < G_N_ELEMENTS(cuttings); k++) {
            g_autofree char *path = g_strdup_printf(
                "/nbd/server/%s/%s", tests[i].name, cuttings[k].name);

            g_test_add_data_func(path, &cuttings[k].cut, tests[i].fn);
        }
    }
    return g_test_run();
}

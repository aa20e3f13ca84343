/* NBD protocol core with no I/O: see nbd.h. */
#include "io/nbd.h"

#include <endian.h>
#include <stdlib.h>
#include <string.h>

#define NBD_MAGIC UINT64_C(0x4e42444d41474943)    /* "NBDMAGIC" */
#define NBD_IHAVEOPT UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC UINT64_C(0x3e889045565a9)
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u

#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES (1u << 1)

#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7

#define NBD_REP_ACK 1
#define NBD_REP_SERVER 2
#define NBD_REP_INFO 3
#define NBD_REP_ERR(n) ((1u << 31) | (n))
#define NBD_REP_ERR_UNSUP NBD_REP_ERR(1)
#define NBD_REP_ERR_INVALID NBD_REP_ERR(3)
#define NBD_REP_ERR_UNKNOWN NBD_REP_ERR(6)

#define NBD_INFO_EXPORT 0
#define NBD_INFO_BLOCK_SIZE 3

#define NBD_FLAG_HAS_FLAGS (1u << 0)
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FLUSH (1u << 2)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_FLAG_SEND_TRIM (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_FAST_ZERO (1u << 11)

#define OPT_HEADER_LEN 16
#define REQUEST_LEN 28
#define REPLY_LEN 16
/* Option data we are willing to receive: a name (<= 4096) plus info
 * requests; anything larger is a hostile or broken client. */
#define MAX_OPT_LEN 8192

enum conn_state {
    STATE_CLIENT_FLAGS,
    STATE_OPT_HEADER,
    STATE_OPT_DATA,
    STATE_REQUEST,
    STATE_PAYLOAD, /* a WRITE's data into its slot */
    STATE_DISCARD, /* a WRITE's data that will be refused (past the end) */
    STATE_CLOSING, /* DISC or ABORT: finish what is in flight, then close */
    STATE_DEAD,
};

struct slot {
    struct nbd_request req;
    bool busy;
    bool reply_queued;
    uint32_t error;
    uint8_t reply[REPLY_LEN];
};

/* Output is a FIFO of byte ranges; a range may belong to a slot, which is
 * freed once its last byte is sent. */
struct out_chunk {
    const uint8_t *data;
    size_t len;
    int slot; /* -1: owned bytes in `owned` */
    uint8_t *owned;
};

struct nbd_conn {
    const struct nbd_export *exp;
    const struct nbd_backend *backend;
    enum conn_state state;
    bool no_zeroes;
    bool got_disc;
    char *error;

    uint8_t hdr[REQUEST_LEN]; /* client flags, option header or request */
    size_t have;              /* bytes of the current unit received */
    size_t need;
    uint32_t opt;
    uint8_t *opt_data;
    size_t opt_len;

    struct slot *slots;
    unsigned nslots;
    unsigned inflight;     /* slots busy (request running or reply unsent) */
    unsigned backend_busy; /* requests handed to the backend, not done */
    void (*wake_fn)(void *opaque);
    void *wake_opaque;
    int payload_slot; /* STATE_PAYLOAD/STATE_DISCARD target */
    uint32_t discard_error;

    GQueue out; /* struct out_chunk * */
    size_t out_head_sent;
};

static void
put16(uint8_t *p, uint16_t v)
{
    v = htobe16(v);
    memcpy(p, &v, 2);
}

static void
put32(uint8_t *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

static void
put64(uint8_t *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static uint16_t
get16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return be16toh(v);
}

static uint32_t
get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static uint64_t
get64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

static void
out_push_owned(struct nbd_conn *c, uint8_t *data, size_t len)
{
    struct out_chunk *ch = g_new0(struct out_chunk, 1);

    ch->data = data;
    ch->len = len;
    ch->slot = -1;
    ch->owned = data;
    g_queue_push_tail(&c->out, ch);
}

static void
out_push_slot(struct nbd_conn *c, const void *data, size_t len, int slot)
{
    struct out_chunk *ch = g_new0(struct out_chunk, 1);

    ch->data = data;
    ch->len = len;
    ch->slot = slot;
    g_queue_push_tail(&c->out, ch);
}

static void fail(struct nbd_conn *c, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static void
fail(struct nbd_conn *c, const char *fmt, ...)
{
    va_list ap;

    if (!c->error) {
        va_start(ap, fmt);
        c->error = g_strdup_vprintf(fmt, ap);
        va_end(ap);
    }
    c->state = STATE_DEAD;
}

static void
expect(struct nbd_conn *c, enum conn_state state, size_t need)
{
    c->state = state;
    c->have = 0;
    c->need = need;
}

struct nbd_conn *
nbd_conn_new(const struct nbd_export *exp, const struct nbd_backend *backend,
             unsigned slots)
{
    struct nbd_conn *c = g_new0(struct nbd_conn, 1);
    uint8_t *greeting = g_malloc(18);

    c->exp = exp;
    c->backend = backend;
    c->nslots = slots;
    c->slots = g_new0(struct slot, slots);
    for (unsigned i = 0; i < slots; i++) {
        /* 4096-aligned so the backend may use O_DIRECT on them. */
        c->slots[i].req.buf = g_aligned_alloc(1, exp->max_block, 4096);
        c->slots[i].req.conn = c;
        c->slots[i].req.slot = i;
    }
    g_queue_init(&c->out);
    c->payload_slot = -1;

    put64(greeting, NBD_MAGIC);
    put64(greeting + 8, NBD_IHAVEOPT);
    put16(greeting + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    out_push_owned(c, greeting, 18);
    expect(c, STATE_CLIENT_FLAGS, 4);
    return c;
}

void
nbd_conn_free(struct nbd_conn *c)
{
    struct out_chunk *ch;

    if (!c) {
        return;
    }
    while ((ch = g_queue_pop_head(&c->out))) {
        g_free(ch->owned);
        g_free(ch);
    }
    for (unsigned i = 0; i < c->nslots; i++) {
        g_aligned_free(c->slots[i].req.buf);
    }
    g_free(c->slots);
    g_free(c->opt_data);
    g_free(c->error);
    g_free(c);
}

static int
free_slot(struct nbd_conn *c)
{
    for (unsigned i = 0; i < c->nslots; i++) {
        if (!c->slots[i].busy) {
            return (int)i;
        }
    }
    return -1;
}

void
nbd_conn_want(struct nbd_conn *c, void **buf, size_t *len)
{
    *buf = NULL;
    *len = 0;
    switch (c->state) {
    case STATE_CLIENT_FLAGS:
    case STATE_OPT_HEADER:
    case STATE_REQUEST:
        if (c->state == STATE_REQUEST && c->have == 0 && free_slot(c) < 0) {
            return; /* backpressure: no slot for another request */
        }
        *buf = c->hdr + c->have;
        *len = c->need - c->have;
        return;
    case STATE_OPT_DATA:
        *buf = c->opt_data + c->have;
        *len = c->need - c->have;
        return;
    case STATE_PAYLOAD:
    case STATE_DISCARD:
        /* Both fit: a WRITE longer than max_block kills the connection. */
        *buf = (uint8_t *)c->slots[c->payload_slot].req.buf + c->have;
        *len = c->need - c->have;
        return;
    case STATE_CLOSING:
    case STATE_DEAD:
        return;
    }
}

/* Option replies: magic, option, type, length, data. */
static void
opt_reply(struct nbd_conn *c, uint32_t type, const void *data, uint32_t len)
{
    uint8_t *r = g_malloc(20 + len);

    put64(r, NBD_REP_MAGIC);
    put32(r + 8, c->opt);
    put32(r + 12, type);
    put32(r + 16, len);
    if (len) {
        memcpy(r + 20, data, len);
    }
    out_push_owned(c, r, 20 + len);
}

static uint16_t
transmission_flags(const struct nbd_conn *c)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS;

    if (!c->exp->no_flush) {
        f |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    }
    if (c->exp->read_only) {
        return f | NBD_FLAG_READ_ONLY;
    }
    return f | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
           NBD_FLAG_SEND_FAST_ZERO;
}

static bool
name_matches(const struct nbd_conn *c, const uint8_t *name, uint32_t len)
{
    /* The empty name selects the default (only) export, as qemu-nbd does. */
    return len == 0 || (strlen(c->exp->name) == len &&
                        memcmp(c->exp->name, name, len) == 0);
}

static void
start_transmission(struct nbd_conn *c)
{
    expect(c, STATE_REQUEST, REQUEST_LEN);
}

static void
handle_info_go(struct nbd_conn *c)
{
    const uint8_t *d = c->opt_data;
    uint32_t name_len;
    uint16_t n_req;
    bool want_block_size = false;
    uint8_t info[18];

    if (c->opt_len < 6) {
        opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
        return;
    }
    name_len = get32(d);
    if (name_len > c->opt_len - 6) {
        opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
        return;
    }
    n_req = get16(d + 4 + name_len);
    if (c->opt_len != 6 + (size_t)name_len + 2 * (size_t)n_req) {
        opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
        return;
    }
    if (!name_matches(c, d + 4, name_len)) {
        opt_reply(c, NBD_REP_ERR_UNKNOWN, NULL, 0);
        return;
    }
    for (uint16_t i = 0; i < n_req; i++) {
        if (get16(d + 6 + name_len + 2 * i) == NBD_INFO_BLOCK_SIZE) {
            want_block_size = true;
        }
    }
    put16(info, NBD_INFO_EXPORT);
    put64(info + 2, c->exp->size);
    put16(info + 10, transmission_flags(c));
    opt_reply(c, NBD_REP_INFO, info, 12);
    if (want_block_size) {
        put16(info, NBD_INFO_BLOCK_SIZE);
        put32(info + 2, c->exp->min_block);
        put32(info + 6, c->exp->pref_block);
        put32(info + 10, c->exp->max_block);
        opt_reply(c, NBD_REP_INFO, info, 14);
    }
    opt_reply(c, NBD_REP_ACK, NULL, 0);
    if (c->opt == NBD_OPT_GO) {
        start_transmission(c);
    }
}

static void
handle_option(struct nbd_conn *c)
{
    uint8_t *r;
    size_t name_len;

    expect(c, STATE_OPT_HEADER, OPT_HEADER_LEN);
    switch (c->opt) {
    case NBD_OPT_EXPORT_NAME:
        /* No error reply exists for this option: a wrong name closes. */
        if (!name_matches(c, c->opt_data, (uint32_t)c->opt_len)) {
            fail(c, "client asked for unknown export");
            return;
        }
        r = g_malloc0(10 + 124);
        put64(r, c->exp->size);
        put16(r + 8, transmission_flags(c));
        out_push_owned(c, r, c->no_zeroes ? 10 : 10 + 124);
        start_transmission(c);
        return;
    case NBD_OPT_ABORT:
        opt_reply(c, NBD_REP_ACK, NULL, 0);
        c->state = STATE_CLOSING;
        return;
    case NBD_OPT_LIST:
        if (c->opt_len != 0) {
            opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
            return;
        }
        name_len = strlen(c->exp->name);
        r = g_malloc(4 + name_len);
        put32(r, (uint32_t)name_len);
        memcpy(r + 4, c->exp->name, name_len);
        opt_reply(c, NBD_REP_SERVER, r, (uint32_t)(4 + name_len));
        g_free(r);
        opt_reply(c, NBD_REP_ACK, NULL, 0);
        return;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        handle_info_go(c);
        return;
    default:
        /* STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers:
         * simple replies are all a backup target needs. */
        opt_reply(c, NBD_REP_ERR_UNSUP, NULL, 0);
        return;
    }
}

static void
queue_reply(struct nbd_conn *c, struct slot *s)
{
    put32(s->reply, NBD_SIMPLE_REPLY_MAGIC);
    put32(s->reply + 4, s->error);
    put64(s->reply + 8, s->req.cookie);
    s->reply_queued = true;
    out_push_slot(c, s->reply, REPLY_LEN, (int)s->req.slot);
    /* No empty chunk for a zero-length READ: it would keep the slot busy
     * and make the glue send 0 bytes, which reads as a dead socket. */
    if (s->req.type == NBD_CMD_READ && s->error == 0 && s->req.len > 0) {
        out_push_slot(c, s->req.buf, s->req.len, (int)s->req.slot);
    }
}

/* A request refused before the backend sees it. */
static void
refuse(struct nbd_conn *c, struct slot *s, uint32_t err)
{
    s->error = err;
    queue_reply(c, s);
}

static void
dispatch(struct nbd_conn *c, struct slot *s)
{
    c->backend_busy++;
    c->backend->request_fn(c->backend->opaque, &s->req);
}

static bool
handle_request(struct nbd_conn *c)
{
    const struct nbd_export *e = c->exp;
    uint32_t magic = get32(c->hdr);
    uint16_t flags = get16(c->hdr + 4);
    uint16_t type = get16(c->hdr + 6);
    uint64_t off = get64(c->hdr + 16);
    uint32_t len = get32(c->hdr + 24);
    uint16_t known = (e->no_flush ? 0 : NBD_CMD_FLAG_FUA) |
                     NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    bool past_end = off > e->size || len > e->size - off;
    int i = free_slot(c);
    struct slot *s;

    if (magic != NBD_REQUEST_MAGIC) {
        fail(c, "bad request magic 0x%08x", magic);
        return false;
    }
    if (type == NBD_CMD_DISC) {
        c->got_disc = true;
        c->state = STATE_CLOSING;
        return true;
    }
    g_assert(i >= 0); /* want() reads a header only with a free slot */
    s = &c->slots[i];
    s->busy = true;
    s->reply_queued = false;
    s->error = 0;
    s->req.cookie = get64(c->hdr + 8);
    s->req.offset = off;
    s->req.len = len;
    s->req.type = type;
    s->req.flags = flags;
    c->inflight++;
    expect(c, STATE_REQUEST, REQUEST_LEN);

    if (type == NBD_CMD_WRITE) {
        if (len > e->max_block) {
            /* The payload cannot be skipped safely past our limit. */
            fail(c,
                 "write of %" PRIu32 " bytes exceeds the %" PRIu32
                 "-byte maximum",
                 len, e->max_block);
            return false;
        }
        c->payload_slot = i;
        if (len == 0) {
            refuse(c, s, 0);
            return true;
        }
        if (past_end || (flags & ~known) || e->read_only) {
            c->discard_error = e->read_only ? NBD_EPERM
                               : past_end   ? NBD_ENOSPC
                                            : NBD_EINVAL;
            expect(c, STATE_DISCARD, len);
            return true;
        }
        expect(c, STATE_PAYLOAD, len);
        return true;
    }
    if (flags & ~known) {
        refuse(c, s, NBD_EINVAL);
        return true;
    }
    switch (type) {
    case NBD_CMD_READ:
        if (len > e->max_block) {
            refuse(c, s, NBD_EOVERFLOW);
        } else if (past_end) {
            refuse(c, s, NBD_EINVAL);
        } else if (len == 0) {
            refuse(c, s, 0);
        } else {
            dispatch(c, s);
        }
        return true;
    case NBD_CMD_FLUSH:
        if (e->no_flush) {
            refuse(c, s, NBD_EINVAL);
        } else {
            dispatch(c, s);
        }
        return true;
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES:
        if (e->read_only) {
            refuse(c, s, NBD_EPERM);
        } else if (past_end) {
            refuse(c, s, NBD_ENOSPC);
        } else if (len == 0) {
            refuse(c, s, 0);
        } else {
            dispatch(c, s);
        }
        return true;
    default:
        refuse(c, s, NBD_EINVAL);
        return true;
    }
}

bool
nbd_conn_received(struct nbd_conn *c, size_t n)
{
    struct slot *s;

    if (c->state == STATE_DEAD || c->state == STATE_CLOSING) {
        return c->state != STATE_DEAD;
    }
    c->have += n;
    if (c->have < c->need) {
        return true;
    }
    switch (c->state) {
    case STATE_CLIENT_FLAGS: {
        uint32_t flags = get32(c->hdr);
        if (!(flags & NBD_FLAG_C_FIXED_NEWSTYLE) ||
            (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))) {
            fail(c, "client does not speak fixed newstyle (flags 0x%x)", flags);
            return false;
        }
        c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
        expect(c, STATE_OPT_HEADER, OPT_HEADER_LEN);
        return true;
    }
    case STATE_OPT_HEADER:
        if (get64(c->hdr) != NBD_IHAVEOPT) {
            fail(c, "bad option magic");
            return false;
        }
        c->opt = get32(c->hdr + 8);
        c->opt_len = get32(c->hdr + 12);
        if (c->opt_len > MAX_OPT_LEN) {
            fail(c, "option %" PRIu32 " of %zu bytes is too long", c->opt,
                 c->opt_len);
            return false;
        }
        g_free(c->opt_data);
        c->opt_data = g_malloc(c->opt_len + 1);
        if (c->opt_len == 0) {
            handle_option(c);
        } else {
            expect(c, STATE_OPT_DATA, c->opt_len);
        }
        return c->state != STATE_DEAD;
    case STATE_OPT_DATA:
        handle_option(c);
        return c->state != STATE_DEAD;
    case STATE_REQUEST:
        return handle_request(c);
    case STATE_PAYLOAD:
        s = &c->slots[c->payload_slot];
        expect(c, STATE_REQUEST, REQUEST_LEN);
        c->payload_slot = -1;
        dispatch(c, s);
        return true;
    case STATE_DISCARD:
        s = &c->slots[c->payload_slot];
        c->payload_slot = -1;
        expect(c, STATE_REQUEST, REQUEST_LEN);
        refuse(c, s, c->discard_error);
        return true;
    case STATE_CLOSING:
    case STATE_DEAD:
        break;
    }
    return c->state != STATE_DEAD;
}

void
nbd_conn_request_done(struct nbd_request *req, uint32_t err)
{
    struct nbd_conn *c = req->conn;
    struct slot *s = &c->slots[req->slot];

    c->backend_busy--;
    s->error = err;
    queue_reply(c, s);
    if (c->wake_fn) {
        c->wake_fn(c->wake_opaque);
    }
}

void
nbd_conn_set_wake(struct nbd_conn *c, void (*wake_fn)(void *), void *opaque)
{
    c->wake_fn = wake_fn;
    c->wake_opaque = opaque;
}

void
nbd_conn_abort(struct nbd_conn *c, const char *why)
{
    if (c->state != STATE_DEAD) {
        fail(c, "%s", why);
    }
}

unsigned
nbd_conn_backend_busy(const struct nbd_conn *c)
{
    return c->backend_busy;
}

int
nbd_conn_output(struct nbd_conn *c, struct iovec *iov, int max)
{
    int n = 0;
    size_t skip = c->out_head_sent;

    for (GList *l = c->out.head; l && n < max; l = l->next) {
        struct out_chunk *ch = l->data;

        iov[n].iov_base = (void *)(ch->data + skip);
        iov[n].iov_len = ch->len - skip;
        skip = 0;
        n++;
    }
    return n;
}

static void
release_slot(struct nbd_conn *c, int i)
{
    struct slot *s = &c->slots[i];

    /* A READ's reply is two chunks: free the slot after the last one. */
    for (GList *l = c->out.head; l; l = l->next) {
        if (((struct out_chunk *)l->data)->slot == i) {
            return;
        }
    }
    s->busy = false;
    s->reply_queued = false;
    c->inflight--;
}

void
nbd_conn_output_sent(struct nbd_conn *c, size_t n)
{
    while (n > 0) {
        struct out_chunk *ch = g_queue_peek_head(&c->out);
        size_t left = ch->len - c->out_head_sent;

        if (n < left) {
            c->out_head_sent += n;
            return;
        }
        n -= left;
        c->out_head_sent = 0;
        g_queue_pop_head(&c->out);
        if (ch->slot >= 0) {
            release_slot(c, ch->slot);
        }
        g_free(ch->owned);
        g_free(ch);
    }
}

bool
nbd_conn_transmitting(const struct nbd_conn *c)
{
    return c->state == STATE_REQUEST || c->state == STATE_PAYLOAD ||
           c->state == STATE_DISCARD;
}

bool
nbd_conn_closing(const struct nbd_conn *c)
{
    return c->state == STATE_CLOSING || c->state == STATE_DEAD;
}

bool
nbd_conn_idle(const struct nbd_conn *c)
{
    return c->inflight == 0 && c->out.length == 0;
}

const char *
nbd_conn_error(const struct nbd_conn *c)
{
    return c->error;
}

bool
nbd_conn_got_disc(const struct nbd_conn *c)
{
    return c->got_disc;
}

unsigned
nbd_conn_inflight(const struct nbd_conn *c)
{
    return c->inflight;
}

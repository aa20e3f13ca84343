/* libFuzzer target for io/nbd_proto.c: every byte an NBD client sends is
 * untrusted, and the core must stay consistent whatever order requests
 * complete in.
 *
 * data[0] picks the set-up, the rest is the client's byte stream:
 *   bits 0-2  how the stream is cut into reads (all the core wants, 1, 2,
 *             3, 7, 28, pseudo-random 1-97, 4096 bytes)
 *   bits 3-4  when the fake backend completes a request: at once, on a
 *             later step, or decided per request by a PRNG
 *   bit 5     read-only export
 *   bit 6     output is sent in pseudo-random partial pieces
 *   bit 7     the socket "fails" (nbd_conn_abort) halfway through
 * data[1] seeds the PRNG (per-request completion order and errors, piece
 * sizes).  Export: 1 MiB, max_block 64 KiB, 4 slots.
 *
 * Oracles, beyond ASan/UBSan:
 * - the backend only sees READ/WRITE/FLUSH/TRIM/WRITE_ZEROES, inside the
 *   export and max_block, on a slot no other held request uses, never a
 *   write on a read-only export; a READ's whole buffer is writable;
 * - want() never asks for bytes once the connection is closing;
 * - output never contains an empty piece (the glue would send 0 bytes and
 *   take that for a dead socket) and starts with the greeting;
 * - no deadlock: if want() asks for nothing while the connection is open,
 *   some request must be held by the backend or some output unsent;
 * - inflight never exceeds the slots;
 * - a connection that is closing cleanly (DISC or ABORT, no error) becomes
 *   idle once the backend has finished and the output is sent.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/nbd.h"

#define SLOTS 4
#define EXPORT_SIZE (UINT64_C(1) << 20)
#define MAX_BLOCK (64u << 10)

static const size_t chunk_sizes[8] = {0, 1, 2, 3, 7, 28, SIZE_MAX, 4096};

enum complete_mode { COMPLETE_NOW, COMPLETE_LATER, COMPLETE_RANDOM };

struct fuzz {
    struct nbd_conn *c;
    struct nbd_export exp;
    struct nbd_backend backend;
    enum complete_mode mode;
    uint32_t rng;
    bool partial_sends;
    struct nbd_request *held[SLOTS];
    unsigned nheld;
    uint64_t out_total;
    uint8_t greeting[18];
};

static uint32_t
next_rand(struct fuzz *f)
{
    /* xorshift32: deterministic per input, so crashes reproduce. */
    f->rng ^= f->rng << 13;
    f->rng ^= f->rng >> 17;
    f->rng ^= f->rng << 5;
    return f->rng;
}

static void
complete(struct fuzz *f, struct nbd_request *req)
{
    uint32_t err = 0;

    if (req->type == NBD_CMD_READ) {
        memset(req->buf, (int)(req->offset & 0xff), req->len);
    }
    if ((next_rand(f) & 15) == 0) {
        err = NBD_EIO;
    }
    nbd_conn_request_done(req, err);
}

static void
complete_held(struct fuzz *f, unsigned i)
{
    struct nbd_request *req = f->held[i];

    f->held[i] = f->held[--f->nheld];
    complete(f, req);
}

static void
backend_request(void *opaque, struct nbd_request *req)
{
    struct fuzz *f = opaque;
    bool later;

    switch (req->type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
        if (req->len == 0 || req->len > f->exp.max_block) {
            abort();
        }
        if (((uintptr_t)req->buf & 4095) != 0) {
            abort();
        }
        /* fall through */
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES:
        if (req->offset > f->exp.size || req->len > f->exp.size - req->offset) {
            abort();
        }
        if (f->exp.read_only && req->type != NBD_CMD_READ) {
            abort();
        }
        break;
    case NBD_CMD_FLUSH:
        if (f->exp.no_flush) {
            abort();
        }
        break;
    default:
        abort();
    }
    if (f->exp.no_flush && (req->flags & NBD_CMD_FLAG_FUA)) {
        abort();
    }
    for (unsigned i = 0; i < f->nheld; i++) {
        if (f->held[i] == req || f->held[i]->slot == req->slot) {
            abort(); /* one request per slot */
        }
    }
    if (req->type == NBD_CMD_WRITE) {
        /* Touch the payload: ASan checks it lies in the slot buffer. */
        volatile uint8_t sink = ((uint8_t *)req->buf)[req->len - 1];
        (void)sink;
    }
    switch (f->mode) {
    case COMPLETE_NOW:
        later = false;
        break;
    case COMPLETE_LATER:
        later = true;
        break;
    default:
        later = next_rand(f) & 1;
        break;
    }
    if (!later) {
        complete(f, req);
        return;
    }
    if (f->nheld >= SLOTS) {
        abort(); /* more requests than slots */
    }
    f->held[f->nheld++] = req;
}

/* Send what the core has queued, maybe in pieces. */
static void
drain(struct fuzz *f, bool all)
{
    struct iovec iov[8];
    int n;

    while ((n = nbd_conn_output(f->c, iov, 1 + (int)(next_rand(f) % 8))) > 0) {
        size_t total = 0;
        size_t send;

        for (int i = 0; i < n; i++) {
            if (iov[i].iov_len == 0) {
                abort(); /* the glue would send 0 bytes */
            }
            for (size_t j = 0; j < iov[i].iov_len; j++) {
                uint8_t b = ((const uint8_t *)iov[i].iov_base)[j];

                if (f->out_total + total + j < sizeof(f->greeting) &&
                    b != f->greeting[f->out_total + total + j]) {
                    abort();
                }
            }
            total += iov[i].iov_len;
        }
        send = total;
        if (f->partial_sends) {
            send = 1 + next_rand(f) % total;
        }
        nbd_conn_output_sent(f->c, send);
        f->out_total += send;
        if (!all && (next_rand(f) & 1)) {
            return;
        }
    }
}

static void
check_invariants(struct fuzz *f)
{
    if (nbd_conn_inflight(f->c) > SLOTS ||
        nbd_conn_backend_busy(f->c) != f->nheld) {
        abort();
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz f;
    size_t chunk, off = 2;
    bool aborted = false;
    const char *greeting = "NBDMAGICIHAVEOPT\x00\x03";

    if (size < 2) {
        return 0;
    }
    memset(&f, 0, sizeof(f));
    memcpy(f.greeting, greeting, sizeof(f.greeting));
    chunk = chunk_sizes[data[0] & 7];
    f.mode = (data[0] >> 3) & 3;
    if (f.mode > COMPLETE_RANDOM) {
        f.mode = COMPLETE_RANDOM;
    }
    f.exp.name = "vd0";
    f.exp.size = EXPORT_SIZE;
    f.exp.min_block = 1;
    f.exp.pref_block = 4096;
    f.exp.max_block = MAX_BLOCK;
    f.exp.read_only = data[0] & 0x20;
    f.exp.no_flush = data[1] & 0x80;
    f.partial_sends = data[0] & 0x40;
    f.rng = 0x9e3779b9u ^ data[1];
    f.backend.request_fn = backend_request;
    f.backend.opaque = &f;
    f.c = nbd_conn_new(&f.exp, &f.backend, SLOTS);

    while (off < size) {
        void *buf;
        size_t want, n;

        if ((data[0] & 0x80) && !aborted && off >= 2 + (size - 2) / 2) {
            nbd_conn_abort(f.c, "socket failed");
            aborted = true;
        }
        nbd_conn_want(f.c, &buf, &want);
        if (want == 0) {
            if (nbd_conn_closing(f.c)) {
                break;
            }
            /* Waiting for a slot: something must be able to free one. */
            if (f.nheld == 0) {
                struct iovec iov;

                if (nbd_conn_output(f.c, &iov, 1) == 0) {
                    abort(); /* deadlock */
                }
            } else {
                complete_held(&f, next_rand(&f) % f.nheld);
            }
            drain(&f, false);
            check_invariants(&f);
            continue;
        }
        if (nbd_conn_closing(f.c)) {
            abort(); /* asked for input while closing */
        }
        n = size - off;
        if (chunk == SIZE_MAX) {
            size_t piece = 1 + next_rand(&f) % 97; /* MIN evaluates twice */

            n = MIN(n, piece);
        } else if (chunk != 0) {
            n = MIN(n, chunk);
        }
        n = MIN(n, want);
        memcpy(buf, data + off, n);
        off += n;
        if (!nbd_conn_received(f.c, n)) {
            if (nbd_conn_error(f.c) == NULL || !nbd_conn_closing(f.c)) {
                abort();
            }
        }
        check_invariants(&f);
        if (f.nheld > 0 && (next_rand(&f) & 3) == 0) {
            complete_held(&f, next_rand(&f) % f.nheld);
        }
        drain(&f, false);
        check_invariants(&f);
    }

    /* The client stops sending: the backend finishes, output goes out. */
    while (f.nheld > 0) {
        complete_held(&f, next_rand(&f) % f.nheld);
    }
    f.partial_sends = false;
    drain(&f, true);
    check_invariants(&f);
    if (nbd_conn_closing(f.c) && nbd_conn_error(f.c) == NULL &&
        !nbd_conn_idle(f.c)) {
        abort(); /* a clean close that would never let the socket go */
    }
    nbd_conn_free(f.c);
    return 0;
}

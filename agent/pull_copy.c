/* Pull mode's data path: see pull_copy.h. */
#include "agent/pull_copy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Reads of up to READ_MAX bytes, READ_SLOTS in flight.  Small on purpose:
 * QEMU's NBD server gives every request a fresh bounce buffer of its
 * size, and touching fresh memory costs QEMU more than the copy (the same
 * effect as backup jobs' 1 MiB chunks, see x-perf in backup.c).  Reading
 * 128 MiB of data took 3.5 s in 4 MiB requests, 1.5 s in 256 KiB ones and
 * 0.6 s in 64 KiB ones (one run each, a loaded machine); 32 in flight keep
 * QEMU's 16 request slots full while qbak writes. */
#define READ_MAX (64u << 10)
#define READ_SLOTS 32
/* Block status asks for this much at a time (QEMU may answer less). */
#define STATUS_MAX (UINT64_C(1) << 30)
/* Runs queued ahead of the reads before the next block status. */
#define QUEUE_LOW 64

/* A range of whole clusters to read. */
struct run {
    uint64_t off, len;
};

enum slot_state { SLOT_FREE, SLOT_READING, SLOT_READ, SLOT_WRITING };

struct slot {
    struct pull_copy *pc;
    enum slot_state state;
    uint8_t *buf;
    uint64_t off;
    size_t len;
    size_t covered; /* bytes the reply's chunks said they filled */
    int err;
    unsigned pending;
    gint64 started_us;
    struct qcow2_extent *ext;
    struct ring_rw *rw;
};

/* Extents of one block status reply, per context. */
struct extents {
    GArray *e; /* pairs of uint32_t: length, flags */
    uint64_t start;
    bool seen;
};

/* The first answer of one block-status call for x's context: later
 * ones (a server may repeat a context) are ignored. */
static void
extents_take(struct extents *x, uint64_t offset, const uint32_t *entries,
             size_t nr)
{
    if (x->seen) {
        return;
    }
    x->seen = true;
    x->start = offset;
    g_array_set_size(x->e, 0);
    g_array_append_vals(x->e, entries, (guint)(nr & ~(size_t)1));
}

struct pull_copy {
    struct ring *ring;
    struct nbd_client *c;
    struct backup_target *t;
    struct qcow2_writer *w;
    uint64_t size;
    unsigned cluster_bits;
    char *bitmap_context;
    gint64 stall_us;
    uint64_t speed;  /* bytes per second, 0: no limit */
    gint64 start_us; /* of the paced reads */
    uint64_t paced;  /* bytes of reads issued since start_us */

    uint64_t cursor; /* block status has covered [0, cursor) */
    bool status_inflight, status_done;
    int status_err;
    gint64 status_started_us;
    struct extents base, dirty;

    GQueue runs; /* struct run *, in disk order */
    struct slot slots[READ_SLOTS];
    uint64_t bytes_read;
    struct {
        bool on, inflight, answered;
        int err;
        uint64_t cursor;   /* [0, cursor) counted */
        uint64_t bytes;    /* the copy's reads in [0, cursor) */
        uint64_t last_end; /* of the last range counted */
        struct extents x;
    } count; /* progress only: see count_step() */
    bool df; /* reads go with NBD_CMD_FLAG_DF: see issue_read() */
    long reads;
    long drop_at; /* test only: QBAK_FAULT_NBD_DROP=N */
    char *error;
};

static void
copy_fail(struct pull_copy *pc, char *msg)
{
    if (!pc->error) {
        pc->error = msg;
    } else {
        g_free(msg);
    }
}

/* A request QEMU's server answered with an error: the snapshot broke
 * (on-cbw-error=break-snapshot: scratch full or failing) or QEMU failed. */
static void
point_gone(struct pull_copy *pc, const char *what, uint64_t off, int err)
{
    copy_fail(pc, g_strdup_printf("%s at %" PRIu64 ": %s (the point in time "
                                  "is gone: scratch full or failing, or QEMU "
                                  "failed)",
                                  what, off, g_strerror(err)));
}

/* QEMU's server drops the connection when a read of the source fails, as
 * when QEMU itself goes. */
static void
fail_connection(struct pull_copy *pc, const char *why)
{
    copy_fail(pc, g_strdup_printf("reading the point in time from QEMU's NBD "
                                  "export failed (a source read error, or "
                                  "QEMU gone): %s",
                                  why));
}

static int
extent_cb(void *opaque, const char *context, uint64_t offset, uint32_t *entries,
          size_t nr, int *error)
{
    struct pull_copy *pc = opaque;
    struct extents *x = NULL;

    if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0) {
        x = &pc->base;
    } else if (pc->bitmap_context && strcmp(context, pc->bitmap_context) == 0) {
        x = &pc->dirty;
    }
    if (x) { /* else a context we did not ask for */
        extents_take(x, offset, entries, nr);
    }
    return 0;
}

static int
status_done_cb(void *opaque, int *error)
{
    struct pull_copy *pc = opaque;

    pc->status_inflight = false;
    pc->status_done = true;
    pc->status_err = *error;
    return 1;
}

static void
issue_status(struct pull_copy *pc)
{
    uint64_t len = MIN(pc->size - pc->cursor, STATUS_MAX);
    int64_t r;

    pc->base.seen = pc->dirty.seen = false;
    pc->status_done = false;
    r = nbd_aio_block_status(
        nbd_client_handle(pc->c), len, pc->cursor,
        (nbd_extent_callback){.callback = extent_cb, .user_data = pc},
        (nbd_completion_callback){.callback = status_done_cb, .user_data = pc},
        0);
    if (r < 0) {
        copy_fail(pc, g_strdup_printf("block status: %s", nbd_get_error()));
        return;
    }
    pc->status_inflight = true;
    pc->status_started_us = g_get_monotonic_time();
}

/* End of what x covers. */
static uint64_t
extents_end(const struct extents *x)
{
    uint64_t end = x->start;
    const uint32_t *e = (const uint32_t *)x->e->data;

    for (guint i = 0; i + 1 < x->e->len; i += 2) {
        end += e[i];
    }
    return end;
}

static void
queue_run(struct pull_copy *pc, uint64_t off, uint64_t len)
{
    struct run *last = g_queue_peek_tail(&pc->runs);

    if (last && last->off + last->len == off) {
        last->len += len;
        return;
    }
    last = g_new(struct run, 1);
    *last = (struct run){.off = off, .len = len};
    g_queue_push_tail(&pc->runs, last);
}

/* [off, end) rounded out to whole clusters, cut to [lo, hi), queued for
 * reading after what is queued already (rounding may overlap the run
 * before). */
static void
queue_read(struct pull_copy *pc, uint64_t off, uint64_t end, uint64_t lo,
           uint64_t hi)
{
    uint64_t csize = UINT64_C(1) << pc->cluster_bits;
    struct run *last = g_queue_peek_tail(&pc->runs);

    off = MAX(off & ~(csize - 1), lo);
    end = MIN(((end - 1) | (csize - 1)) + 1, hi);
    if (last && last->off + last->len > off) {
        off = last->off + last->len;
    }
    if (off < end) {
        queue_run(pc, off, end - off);
    }
}

/* One block status answer x, for [*cursor, ...), swept into take(): every
 * wanted range, to be rounded out to whole clusters within [lo, hi);
 * *cursor moves to the end of what the answer settled.  A full reads
 * every cluster that is not all known to read as zeroes (base:allocation)
 * and skips the rest.  An incremental asks only for the dirty bitmap
 * (base:allocation of the whole disk cost QEMU more than a small
 * incremental's copy) and reads every cluster with a dirty byte; what
 * reads as zeroes becomes a zero cluster when written.  Reading a whole
 * cluster for a piece of it is always right: every byte comes from the
 * point in time.  Returns NULL, or why the answer cannot be used. */
static const char *
sweep_answer(struct pull_copy *pc, const struct extents *x, uint64_t *cursor,
             void (*take)(struct pull_copy *pc, uint64_t off, uint64_t end,
                          uint64_t lo, uint64_t hi))
{
    uint64_t csize = UINT64_C(1) << pc->cluster_bits;
    const uint32_t *e = (const uint32_t *)x->e->data;
    uint64_t end, pos;

    if (!x->seen || x->start != *cursor) {
        return "the server left out a context";
    }
    end = MIN(extents_end(x), pc->size);
    if (end <= *cursor) {
        return "an empty answer";
    }
    /* Whole clusters only, unless the answer stops inside the first
     * cluster: then that cluster is read (the safe answer). */
    if (end < pc->size) {
        uint64_t aligned = end & ~(csize - 1);
        if (aligned <= *cursor) {
            uint64_t cend = MIN((*cursor | (csize - 1)) + 1, pc->size);
            take(pc, *cursor, cend, *cursor, cend);
            *cursor = cend;
            return NULL;
        }
        end = aligned;
    }
    pos = x->start;
    for (guint i = 0; i + 1 < x->e->len && pos < end; i += 2) {
        uint64_t next = pos + e[i];
        bool wanted = pc->bitmap_context ? (e[i + 1] & 1) != 0
                                         : !(e[i + 1] & LIBNBD_STATE_ZERO);
        if (wanted && next > pos) {
            take(pc, pos, next, *cursor, end);
        }
        pos = next;
    }
    *cursor = end;
    return NULL;
}

/* Turn a block status reply into runs of whole clusters to read. */
static void
take_status(struct pull_copy *pc)
{
    const char *why;

    pc->status_done = false;
    if (pc->status_err) {
        point_gone(pc, "block status", pc->cursor, pc->status_err);
        return;
    }
    why = sweep_answer(pc, pc->bitmap_context ? &pc->dirty : &pc->base,
                       &pc->cursor, queue_read);
    if (why) {
        copy_fail(pc, g_strdup_printf("block status at %" PRIu64 ": %s",
                                      pc->cursor, why));
    }
}

/* Progress: a second walk of block status, ahead of the copy's own (which
 * keeps only a few runs queued), counts the bytes the copy will read, so
 * that the total is known after a few round trips (one per GiB or so)
 * rather than at the end.  It reads the same answers the same way
 * (sweep_answer()); a failure only stops the count: the copy's own walk
 * reports it. */
static void
count_read(struct pull_copy *pc, uint64_t off, uint64_t end, uint64_t lo,
           uint64_t hi)
{
    uint64_t csize = UINT64_C(1) << pc->cluster_bits;

    off = MAX(off & ~(csize - 1), lo);
    end = MIN(((end - 1) | (csize - 1)) + 1, hi);
    off = MAX(off, pc->count.last_end);
    if (off < end) {
        pc->count.bytes += end - off;
        pc->count.last_end = end;
    }
}

static int
count_extent_cb(void *opaque, const char *context, uint64_t offset,
                uint32_t *entries, size_t nr, int *error)
{
    struct pull_copy *pc = opaque;
    const char *want = pc->bitmap_context ? pc->bitmap_context
                                          : LIBNBD_CONTEXT_BASE_ALLOCATION;

    if (strcmp(context, want) == 0) {
        extents_take(&pc->count.x, offset, entries, nr);
    }
    return 0;
}

static int
count_done_cb(void *opaque, int *error)
{
    struct pull_copy *pc = opaque;

    pc->count.inflight = false;
    pc->count.answered = true;
    pc->count.err = *error;
    return 1;
}

static void
count_step(struct pull_copy *pc)
{
    if (!pc->count.on || pc->count.inflight) {
        return;
    }
    if (pc->count.answered) {
        pc->count.answered = false;
        if (pc->count.err ||
            sweep_answer(pc, &pc->count.x, &pc->count.cursor, count_read)) {
            pc->count.on = false;
            return;
        }
    }
    if (pc->count.cursor < pc->size) {
        pc->count.x.seen = false;
        if (nbd_aio_block_status(
                nbd_client_handle(pc->c),
                MIN(pc->size - pc->count.cursor, STATUS_MAX), pc->count.cursor,
                (nbd_extent_callback){.callback = count_extent_cb,
                                      .user_data = pc},
                (nbd_completion_callback){.callback = count_done_cb,
                                          .user_data = pc},
                0) < 0) {
            pc->count.on = false;
            return;
        }
        pc->count.inflight = true;
    }
}

void
pull_copy_count(struct pull_copy *pc)
{
    pc->count.on = true;
}

bool
pull_copy_progress(const struct pull_copy *pc, uint64_t *done, uint64_t *total)
{
    /* Until the count is complete (or when it stopped), the rest of the
     * disk might all be read: the total only comes down. */
    uint64_t rest = pc->size - pc->count.cursor;

    *done = pc->bytes_read;
    *total = MAX(pc->count.bytes + rest, pc->bytes_read);
    if (pull_copy_done(pc)) {
        *done = *total = pc->bytes_read;
        return true;
    }
    return !pc->count.on || pc->count.cursor > 0;
}

/* All-zero data is not written: a full reads zeroes where nothing is, an
 * incremental gets zero clusters. */
static bool
is_zero(const uint8_t *p, size_t len)
{
    static const uint8_t zero[16];

    return len < sizeof(zero)
               ? memcmp(p, zero, len) == 0
               : memcmp(p, zero, sizeof(zero)) == 0 &&
                     memcmp(p, p + sizeof(zero), len - sizeof(zero)) == 0;
}

static void
write_done(struct ring_rw *rw, int err)
{
    struct slot *s = rw->opaque;
    struct pull_copy *pc = s->pc;

    if (err < 0) {
        g_autofree char *msg = g_strdup_printf("write: %s", g_strerror(-err));
        backup_target_fail(pc->t, msg);
    } else {
        backup_target_wrote(pc->t, rw->off, rw->len);
    }
    if (--s->pending == 0) {
        s->state = SLOT_FREE;
    }
}

static void
write_slot(struct pull_copy *pc, struct slot *s)
{
    g_autoptr(GError) err = NULL;
    size_t n = 0;
    bool ok;

    s->state = SLOT_FREE;
    if (s->err) {
        point_gone(pc, "read", s->off, s->err);
        return;
    }
    pc->bytes_read += s->len;
    if (is_zero(s->buf, s->len)) {
        ok = !pc->bitmap_context ||
             qcow2_writer_zero(pc->w, s->off, s->len, &err);
    } else {
        ok =
            qcow2_writer_write(pc->w, s->off, s->buf, s->len, s->ext, &n, &err);
    }
    if (!ok) {
        backup_target_fail(pc->t, err->message);
        return;
    }
    if (n == 0) {
        return;
    }
    s->state = SLOT_WRITING;
    s->pending = (unsigned)n;
    s->started_us = g_get_monotonic_time();
    for (size_t i = 0; i < n; i++) {
        s->rw[i].done_fn = write_done;
        s->rw[i].opaque = s;
        ring_rw_start(pc->ring, &s->rw[i], backup_target_fd(pc->t), true,
                      s->buf + s->ext[i].buf_offset, s->ext[i].len,
                      s->ext[i].host_offset);
    }
}

/* A DF read's reply: one chunk in practice; every chunk must lie inside
 * the read, and together they must fill it (read_done_cb), since libnbd
 * does not check that a reply covered the whole buffer, which is not
 * cleared before (nbd_set_pread_initialize). */
static int
read_chunk_cb(void *opaque, const void *subbuf, size_t count, uint64_t offset,
              unsigned status, int *error)
{
    struct slot *s = opaque;

    if (status != LIBNBD_READ_DATA && status != LIBNBD_READ_HOLE) {
        return 0; /* an error chunk: the read fails with it */
    }
    if (offset < s->off || count > s->len || offset - s->off > s->len - count) {
        *error = EPROTO;
        return -1;
    }
    s->covered += count;
    return 0;
}

static int
read_done_cb(void *opaque, int *error)
{
    struct slot *s = opaque;

    s->err = *error;
    if (!s->err && s->pc->df && s->covered != s->len) {
        s->err = EPROTO; /* a reply that left part of the buffer unset */
    }
    s->state = SLOT_READ;
    return 1;
}

static void
issue_read(struct pull_copy *pc, struct slot *s, uint64_t off, size_t len)
{
    int64_t r;

    s->off = off;
    s->len = len;
    s->covered = 0;
    s->err = 0;
    s->state = SLOT_READING;
    s->started_us = g_get_monotonic_time();
    if (++pc->reads == pc->drop_at) {
        /* Test hook: the connection breaks under reads in flight. */
        shutdown(nbd_aio_get_fd(nbd_client_handle(pc->c)), SHUT_RDWR);
    }
    /* DF: QEMU's server answers a read without it by asking block status
     * of the whole graph below the export (snapshot-access, the filter,
     * the disk's format and file: an lseek per read) to send holes as
     * such; with it, QEMU reads and sends one data chunk.  The copy has
     * its own block status already, and zeroes read as data are dropped
     * all the same (is_zero()). */
    if (pc->df) {
        r = nbd_aio_pread_structured(
            nbd_client_handle(pc->c), s->buf, len, off,
            (nbd_chunk_callback){.callback = read_chunk_cb, .user_data = s},
            (nbd_completion_callback){.callback = read_done_cb, .user_data = s},
            LIBNBD_CMD_FLAG_DF);
    } else {
        r = nbd_aio_pread(
            nbd_client_handle(pc->c), s->buf, len, off,
            (nbd_completion_callback){.callback = read_done_cb, .user_data = s},
            0);
    }
    if (r < 0) {
        /* The read before this one may have found the connection gone:
         * that, not this read's "invalid state", is the error. */
        const char *ce = nbd_client_error(pc->c);

        s->state = SLOT_FREE;
        if (ce) {
            fail_connection(pc, ce);
        } else {
            copy_fail(pc, g_strdup_printf("NBD read at %" PRIu64 ": %s", off,
                                          nbd_get_error()));
        }
    }
}

static void
check_stall(struct pull_copy *pc, gint64 now)
{
    if (pc->stall_us <= 0) {
        return;
    }
    for (unsigned i = 0; i < READ_SLOTS; i++) {
        struct slot *s = &pc->slots[i];
        if ((s->state == SLOT_READING || s->state == SLOT_WRITING) &&
            now - s->started_us > pc->stall_us) {
            copy_fail(pc, g_strdup_printf("%s at %" PRIu64
                                          " stalled: it took more than %.0f s",
                                          s->state == SLOT_READING
                                              ? "a read of the point in time"
                                              : "a write to the repository",
                                          s->off, (double)pc->stall_us / 1e6));
            return;
        }
    }
    if (pc->status_inflight && now - pc->status_started_us > pc->stall_us) {
        copy_fail(pc, g_strdup("block status took too long"));
    }
}

void
pull_copy_step(struct pull_copy *pc)
{
    const char *te = backup_target_error(pc->t);
    const char *ce = nbd_client_error(pc->c);

    if (te) {
        copy_fail(pc, g_strdup(te));
    }
    if (ce) {
        fail_connection(pc, ce);
    }
    check_stall(pc, g_get_monotonic_time());
    for (unsigned i = 0; i < READ_SLOTS && !pc->error; i++) {
        if (pc->slots[i].state == SLOT_READ) {
            write_slot(pc, &pc->slots[i]);
        }
    }
    if (pc->status_done && !pc->error) {
        take_status(pc);
    }
    while (!pc->error) {
        struct run *r = g_queue_peek_head(&pc->runs);
        struct slot *s = NULL;

        if (!r) {
            break;
        }
        for (unsigned i = 0; i < READ_SLOTS && !s; i++) {
            if (pc->slots[i].state == SLOT_FREE) {
                s = &pc->slots[i];
            }
        }
        if (!s || pull_copy_wait_ms(pc) > 0) {
            break;
        }
        {
            size_t len = (size_t)MIN(r->len, READ_MAX);
            pc->paced += len;
            issue_read(pc, s, r->off, len);
            r->off += len;
            r->len -= len;
            if (r->len == 0) {
                g_free(g_queue_pop_head(&pc->runs));
            }
        }
    }
    if (!pc->error && !pc->status_inflight && !pc->status_done &&
        pc->cursor < pc->size && g_queue_get_length(&pc->runs) < QUEUE_LOW) {
        issue_status(pc);
    }
    count_step(pc);
    nbd_client_kick(pc->c);
}

/* --speed: a read goes out only once the reads before it fit the rate
 * since the start; the first READ_MAX goes at once.  A paced copy sleeps
 * at least PACE_MIN_MS at a time, so that each wake-up issues several
 * reads: one wake-up per 64 KiB read tripled qbak's CPU at 64 MiB/s. */
#define PACE_MIN_MS 10
int
pull_copy_wait_ms(const struct pull_copy *pc)
{
    gint64 due_us;

    if (!pc->speed || pc->paced < READ_MAX) {
        return 0;
    }
    due_us = pc->start_us +
             (gint64)((double)(pc->paced - READ_MAX) * 1e6 / (double)pc->speed);
    due_us -= g_get_monotonic_time();
    return due_us > 0 ? MAX(PACE_MIN_MS, (int)((due_us + 999) / 1000)) : 0;
}

void
pull_copy_set_speed(struct pull_copy *pc, uint64_t bytes_per_s)
{
    pc->speed = bytes_per_s;
    pc->start_us = g_get_monotonic_time();
    pc->paced = 0;
}

bool
pull_copy_done(const struct pull_copy *pc)
{
    if (pc->error || pc->cursor < pc->size || pc->status_inflight ||
        pc->count.inflight || pc->status_done ||
        !g_queue_is_empty((GQueue *)&pc->runs)) {
        return false;
    }
    for (unsigned i = 0; i < READ_SLOTS; i++) {
        if (pc->slots[i].state != SLOT_FREE) {
            return false;
        }
    }
    return true;
}

const char *
pull_copy_error(const struct pull_copy *pc)
{
    return pc->error;
}

uint64_t
pull_copy_bytes_read(const struct pull_copy *pc)
{
    return pc->bytes_read;
}

struct pull_copy *
pull_copy_new(struct ring *ring, struct nbd_client *c, struct backup_target *t,
              uint64_t size, unsigned cluster_bits, const char *bitmap_context,
              gint64 stall_us)
{
    struct pull_copy *pc = g_new0(struct pull_copy, 1);

    pc->ring = ring;
    pc->c = c;
    pc->t = t;
    pc->w = backup_target_writer(t);
    pc->size = size;
    pc->cluster_bits = cluster_bits;
    pc->bitmap_context = g_strdup(bitmap_context);
    pc->stall_us = stall_us;
    pc->drop_at =
        getenv("QBAK_FAULT_NBD_DROP") ? atol(getenv("QBAK_FAULT_NBD_DROP")) : 0;
    pc->df = nbd_can_df(nbd_client_handle(c)) == 1;
    pc->base.e = g_array_new(false, false, sizeof(uint32_t));
    pc->dirty.e = g_array_new(false, false, sizeof(uint32_t));
    pc->count.x.e = g_array_new(false, false, sizeof(uint32_t));
    g_queue_init(&pc->runs);
    for (unsigned i = 0; i < READ_SLOTS; i++) {
        struct slot *s = &pc->slots[i];
        size_t max_ext = qcow2_writer_max_extents(pc->w, READ_MAX);
        s->pc = pc;
        /* Aligned for O_DIRECT. */
        if (posix_memalign((void **)&s->buf, 4096, READ_MAX) != 0) {
            abort();
        }
        s->ext = g_new0(struct qcow2_extent, max_ext);
        s->rw = g_new0(struct ring_rw, max_ext);
    }
    return pc;
}

void
pull_copy_free(struct pull_copy *pc)
{
    bool busy;

    if (!pc) {
        return;
    }
    /* Reads in flight end when the connection is closed (their callbacks
     * still point here: the caller frees the client first); writes in
     * flight read the buffers until they complete. */
    do {
        busy = false;
        for (unsigned i = 0; i < READ_SLOTS; i++) {
            busy |= pc->slots[i].state == SLOT_WRITING;
        }
    } while (busy && ring_run_once(pc->ring, -1) >= 0);
    for (unsigned i = 0; i < READ_SLOTS; i++) {
        free(pc->slots[i].buf);
        g_free(pc->slots[i].ext);
        g_free(pc->slots[i].rw);
    }
    g_queue_clear_full(&pc->runs, g_free); /* embedded: clear, not free */
    g_array_free(pc->base.e, true);
    g_array_free(pc->dirty.e, true);
    g_array_free(pc->count.x.e, true);
    g_free(pc->bitmap_context);
    g_free(pc->error);
    g_free(pc);
}

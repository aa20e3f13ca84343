/* Tests for agent/target.c end to end: the NBD server on the ring, its
 * backend and the qcow2 layer it writes, driven by a real NBD client
 * (qemu-io) and checked with real oracles (qemu-img check, qemu-img
 * convert, qemu-img map).
 *
 * The ring runs in this thread; qemu-io runs as a child and is polled with
 * waitpid(WNOHANG) between ring_run_once() calls; it gets the client end
 * of the target's socket pair as fd 3, as QEMU gets it through getfd.
 * Raw use of that end plays the clients QEMU would not be (one that hangs
 * up early, one that sends what QEMU never sends).
 *
 * Requires qemu-io and qemu-img (exit 77 without them) and io_uring.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/magic.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "agent/target.h"

#define DISK_SIZE (UINT64_C(4) << 20)
#define CLUSTER_BITS 16
#define MIB (UINT64_C(1) << 20)
#define KIB UINT64_C(1024)
/* A test that takes longer has hung: fail it rather than the whole run. */
#define DEADLINE_US (G_USEC_PER_SEC * 60)

static char *top_dir; /* every test's files live under it */

struct fixture {
    struct ring ring;
    char *dir;
    int dir_fd;
    int client_fd; /* the client end of the last target's socket pair */
    unsigned files;
};

static void
fixture_init(struct fixture *f)
{
    int ret;

    memset(f, 0, sizeof(*f));
    ret = ring_init(&f->ring, 256);
    g_assert_cmpint(ret, ==, 0);
    f->dir = g_strdup_printf("%s/%s", top_dir, g_test_get_path());
    g_strdelimit(f->dir + strlen(top_dir) + 1, "/", '_');
    g_assert_cmpint(g_mkdir_with_parents(f->dir, 0700), ==, 0);
    f->dir_fd = open(f->dir, O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(f->dir_fd, >=, 0);
    f->client_fd = -1;
}

static void
fixture_fini(struct fixture *f)
{
    g_autoptr(GDir) d = g_dir_open(f->dir, 0, NULL);
    const char *name;

    ring_fini(&f->ring);
    while (d && (name = g_dir_read_name(d))) {
        g_autofree char *p = g_build_filename(f->dir, name, NULL);

        g_assert_cmpint(unlink(p), ==, 0);
    }
    if (f->client_fd >= 0) {
        close(f->client_fd);
    }
    close(f->dir_fd);
    g_assert_cmpint(rmdir(f->dir), ==, 0);
    g_free(f->dir);
}

static char *
fixture_path(struct fixture *f, const char *name)
{
    return g_build_filename(f->dir, name, NULL);
}

static struct backup_target *
target_new(struct fixture *f, const char *file, const char *backing_file,
           struct qcow2_reader *backing)
{
    g_autoptr(GError) err = NULL;
    struct backup_target *t;

    g_assert_cmpint(f->client_fd, <, 0);
    t = backup_target_new(&f->ring, f->dir_fd, file, "vd0", DISK_SIZE,
                          CLUSTER_BITS, backing_file, backing, &f->client_fd,
                          &err);
    g_assert_no_error(err);
    g_assert_nonnull(t);
    g_assert_cmpint(f->client_fd, >=, 0);
    g_assert_false(backup_target_connected(t));
    g_assert_false(backup_target_finished(t));
    g_assert_null(backup_target_error(t));
    return t;
}

/* Run a program to completion (no ring involved); returns its exit code. */
static int
run_sync(const char *const *argv, char **out)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *so = NULL, *se = NULL;
    int status;

    g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                 &so, &se, &status, &err);
    g_assert_no_error(err);
    if (!g_spawn_check_wait_status(status, NULL)) {
        g_test_message("%s: %s%s", argv[0], so, se);
    }
    if (out) {
        *out = g_steal_pointer(&so);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

struct client {
    GPid pid;
    bool exited;
    int status;
    int log_fd;
    char *log_path;
};

/* How qemu-io caches: its default, writethrough, puts FUA on every write;
 * a backup job's target is writeback: plain writes, then FLUSH. */
#define WRITEBACK "writeback"
#define WRITETHROUGH "writethrough"

/* qemu-io against the export, as QEMU's NBD client: one -c per command. */
static const int client_target_fd = 3;

static void
client_start(struct fixture *f, struct client *c, const char *cache,
             const char *const *cmds)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GError) err = NULL;

    memset(c, 0, sizeof(*c));
    c->log_path = g_strdup_printf("%s/qemu-io-%u.log", f->dir, f->files++);
    c->log_fd =
        open(c->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    g_assert_cmpint(c->log_fd, >=, 0);
    g_ptr_array_add(argv, g_strdup("qemu-io"));
    g_ptr_array_add(argv, g_strdup("-t"));
    g_ptr_array_add(argv, g_strdup(cache));
    g_ptr_array_add(argv, g_strdup("--image-opts"));
    g_ptr_array_add(argv, g_strdup("driver=raw,file.driver=nbd,"
                                   "file.server.type=fd,file.server.str=3,"
                                   "file.export=vd0"));
    for (; *cmds; cmds++) {
        g_ptr_array_add(argv, g_strdup("-c"));
        g_ptr_array_add(argv, g_strdup(*cmds));
    }
    g_ptr_array_add(argv, NULL);
    g_assert_cmpint(f->client_fd, >=, 0);
    g_spawn_async_with_pipes_and_fds(
        NULL, (const char *const *)argv->pdata, NULL,
        G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, -1,
        c->log_fd, c->log_fd, &f->client_fd, &client_target_fd, 1, &c->pid,
        NULL, NULL, NULL, &err);
    g_assert_no_error(err);
    close(f->client_fd); /* qemu-io has it now */
    f->client_fd = -1;
}

static bool
client_poll(struct client *c)
{
    if (!c->exited) {
        pid_t r = waitpid(c->pid, &c->status, WNOHANG);

        g_assert_cmpint(r, >=, 0);
        c->exited = r == c->pid;
    }
    return c->exited;
}

/* Its exit code; its output goes to the test log. */
static int
client_finish(struct client *c)
{
    g_autofree char *log = NULL;

    g_assert_true(c->exited);
    g_file_get_contents(c->log_path, &log, NULL, NULL);
    g_test_message("qemu-io said:\n%s", log ? log : "");
    close(c->log_fd);
    g_free(c->log_path);
    g_spawn_close_pid(c->pid);
    return WIFEXITED(c->status) ? WEXITSTATUS(c->status)
                                : 128 + WTERMSIG(c->status);
}

/* The agent's loop: run the ring until qemu-io has exited and the target
 * has seen the connection through. */
static int
serve(struct fixture *f, struct backup_target *t, const char *cache,
      const char *const *cmds)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    struct client c;

    client_start(f, &c, cache, cmds);
    while (!(client_poll(&c) && backup_target_finished(t))) {
        int r = ring_run_once(&f->ring, 100);

        g_assert_cmpint(r, >=, 0);
        if (g_get_monotonic_time() > deadline) {
            if (!c.exited) {
                kill(c.pid, SIGKILL);
            }
            g_error("no end after 60 s: qemu-io %s, target %s",
                    c.exited ? "exited" : "running",
                    backup_target_finished(t) ? "finished" : "serving");
        }
    }
    return client_finish(&c);
}

/* qemu-img check, then the guest's view (convert to raw) against expect. */
static void
check_image(struct fixture *f, const char *file, const uint8_t *expect)
{
    g_autofree char *path = fixture_path(f, file);
    g_autofree char *raw = fixture_path(f, "converted.raw");
    const char *check[] = {"qemu-img", "check", "-f", "qcow2", path, NULL};
    const char *convert[] = {"qemu-img", "convert", "-f", "qcow2", "-O",
                             "raw",      path,      raw,  NULL};
    g_autofree char *data = NULL;
    gsize len = 0;

    g_assert_cmpint(run_sync(check, NULL), ==, 0);
    g_assert_cmpint(run_sync(convert, NULL), ==, 0);
    g_assert_true(g_file_get_contents(raw, &data, &len, NULL));
    g_assert_cmpuint(len, ==, DISK_SIZE);
    for (gsize i = 0; i < len; i++) {
        if ((uint8_t)data[i] != expect[i]) {
            g_error("%s: guest byte %" G_GSIZE_FORMAT " is 0x%02x, expected "
                    "0x%02x",
                    file, i, (uint8_t)data[i], expect[i]);
        }
    }
    unlink(raw);
}

static void
commit_ok(struct fixture *f, struct backup_target *t, const char *file)
{
    g_autoptr(GError) err = NULL;
    struct stat st;

    g_assert_null(backup_target_error(t));
    g_assert_true(backup_target_commit(t, &err));
    g_assert_no_error(err);
    g_assert_cmpint(fstatat(f->dir_fd, file, &st, 0), ==, 0);
    g_assert_cmpuint(backup_target_file_size(t), ==, (uint64_t)st.st_size);
}

static void
test_qemu_io_writes_land_in_qcow2(void)
{
    static const char *const cmds[] = {
        "write -P 0x5a 0 1M",
        "write -z 1M 64k",
        "discard 2M 128k",
        "write -P 0x33 3000 5000",
        /* A piece of a fresh cluster: kept by the writer until commit. */
        "write -P 0x66 2500k 1000",
        /* New, rewritten, new cluster: one write, several extents. */
        "write -P 0x44 3136k 64k",
        "write -P 0x45 3M 192k",
        "flush",
        /* Read back through the export (NBD READ). */
        "read -P 0x5a 0 3000",
        "read -P 0x33 3000 5000",
        "read -P 0x5a 8000 57536",
        "read -P 0 1M 64k",
        "read -P 0 2M 128k",
        "read -P 0x66 2500k 1000",
        "read -P 0x45 3M 192k",
        "read -P 0 3264k 832k",
        NULL,
    };
    g_autofree uint8_t *expect = g_malloc0(DISK_SIZE);
    struct backup_target *t;
    struct fixture f;

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    g_assert_cmpint(serve(&f, t, WRITEBACK, cmds), ==, 0);
    g_assert_true(backup_target_connected(t));
    commit_ok(&f, t, "t.qcow2");
    /* At least the megabyte of data became clusters of this layer. */
    g_assert_cmpuint(backup_target_data_bytes(t), >=, MIB);
    backup_target_free(t);

    memset(expect, 0x5a, MIB);
    memset(expect + 3000, 0x33, 5000);
    memset(expect + 2500 * KIB, 0x66, 1000);
    memset(expect + 3 * MIB, 0x45, 192 * KIB);
    check_image(&f, "t.qcow2", expect);
    fixture_fini(&f);
}

/* aio_write keeps many requests in flight: more than the 16 slots (so the
 * server waits for free ones), then flushes and FUA writes of whole
 * clusters, partial clusters and zeroes, which stay plain writes (the
 * export offers neither: see test_flush_not_offered). */
static void
test_concurrent_requests(void)
{
    g_autoptr(GPtrArray) cmds = g_ptr_array_new_with_free_func(g_free);
    g_autofree uint8_t *expect = g_malloc0(DISK_SIZE);
    struct backup_target *t;
    struct fixture f;

    for (unsigned i = 0; i < 32; i++) {
        g_ptr_array_add(cmds, g_strdup_printf("aio_write -P 0x%x %u 64k",
                                              0x80 + i, i * 65536));
        memset(expect + i * 64 * KIB, 0x80 + i, 64 * KIB);
    }
    g_ptr_array_add(cmds, g_strdup("flush"));
    g_ptr_array_add(cmds, g_strdup("aio_flush"));
    g_ptr_array_add(cmds, g_strdup("write -f -P 0x61 2M 128k"));
    memset(expect + 2 * MIB, 0x61, 128 * KIB);
    g_ptr_array_add(cmds, g_strdup("write -f -P 0x62 2228324 200"));
    memset(expect + 2228324, 0x62, 200);
    g_ptr_array_add(cmds, g_strdup("write -f -z 3M 64k"));
    g_ptr_array_add(cmds, g_strdup("read -P 0x85 320k 64k"));
    g_ptr_array_add(cmds, g_strdup("read -P 0x62 2228324 200"));
    g_ptr_array_add(cmds, NULL);

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    g_assert_cmpint(
        serve(&f, t, WRITETHROUGH, (const char *const *)cmds->pdata), ==, 0);
    commit_ok(&f, t, "t.qcow2");
    backup_target_free(t);
    check_image(&f, "t.qcow2", expect);
    fixture_fini(&f);
}

/* Where qemu-img map says [off, off+len) comes from: every map entry that
 * overlaps it must have this depth and zero/data flags. */
static void
check_map(json_t *map, uint64_t off, uint64_t len, int depth, bool zero,
          bool data)
{
    size_t i;
    json_t *e;
    uint64_t covered = 0;

    json_array_foreach(map, i, e)
    {
        uint64_t s = (uint64_t)json_integer_value(json_object_get(e, "start"));
        uint64_t l = (uint64_t)json_integer_value(json_object_get(e, "length"));

        if (s + l <= off || s >= off + len) {
            continue;
        }
        g_test_message("map entry %" PRIu64 "+%" PRIu64 " for %" PRIu64
                       "+%" PRIu64,
                       s, l, off, len);
        g_assert_cmpint(json_integer_value(json_object_get(e, "depth")), ==,
                        depth);
        g_assert_cmpint(json_is_true(json_object_get(e, "zero")), ==, zero);
        g_assert_cmpint(json_is_true(json_object_get(e, "data")), ==, data);
        covered += MIN(s + l, off + len) - MAX(s, off);
    }
    g_assert_cmpuint(covered, ==, len);
}

static void
test_zeroes_and_trim_hide_the_backing_file(void)
{
    static const char *const cmds[] = {
        "write -z 1M 64k",
        "discard 2M 128k",
        /* Partial clusters: merged with the backing's bytes around them. */
        "write -P 0x33 3000 5000",
        "write -z 614400 10000",
        "flush",
        "read -P 0x77 0 3000",
        "read -P 0x33 3000 5000",
        "read -P 0x77 8000 57536",
        "read -P 0 1M 64k",
        "read -P 0 2M 128k",
        "read -P 0x77 3M 64k",
        NULL,
    };
    g_autofree uint8_t *expect = g_malloc(DISK_SIZE);
    g_autofree char *base = NULL, *top = NULL, *map_text = NULL;
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *backing;
    struct backup_target *t;
    json_auto_t *map = NULL;
    struct fixture f;

    fixture_init(&f);
    base = fixture_path(&f, "base.qcow2");
    top = fixture_path(&f, "top.qcow2");
    {
        const char *create[] = {"qemu-img", "create", "-q", "-f",
                                "qcow2",    base,     "4M", NULL};
        const char *fill[] = {
            "qemu-io", "-f", "qcow2", base, "-c", "write -P 0x77 0 4M", NULL};

        g_assert_cmpint(run_sync(create, NULL), ==, 0);
        g_assert_cmpint(run_sync(fill, NULL), ==, 0);
    }
    backing = qcow2_reader_open(f.dir_fd, "base.qcow2", &err);
    g_assert_no_error(err);
    g_assert_nonnull(backing);

    t = target_new(&f, "top.qcow2", "base.qcow2", backing);
    g_assert_cmpint(serve(&f, t, WRITEBACK, cmds), ==, 0);
    commit_ok(&f, t, "top.qcow2");
    backup_target_free(t);
    qcow2_reader_free(backing);

    memset(expect, 0x77, DISK_SIZE);
    memset(expect + MIB, 0, 64 * KIB);
    memset(expect + 2 * MIB, 0, 128 * KIB);
    memset(expect + 3000, 0x33, 5000);
    memset(expect + 614400, 0, 10000);
    check_image(&f, "top.qcow2", expect);

    /* And it is this layer that says zero: zero clusters, not holes. */
    {
        const char *argv[] = {"qemu-img", "map", "--output=json", "-f", "qcow2",
                              top,        NULL};

        g_assert_cmpint(run_sync(argv, &map_text), ==, 0);
    }
    map = json_loads(map_text, 0, NULL);
    g_assert_true(json_is_array(map));
    check_map(map, MIB, 64 * KIB, 0, true, false);
    check_map(map, 2 * MIB, 128 * KIB, 0, true, false);
    check_map(map, 0, 64 * KIB, 0, false, true);
    check_map(map, 3 * MIB, MIB, 1, false, true);
    fixture_fini(&f);
}

/* The client end of the target's socket pair, non-blocking (the server
 * runs in this thread); the caller closes it. */
static int
raw_client(struct fixture *f)
{
    int fd = f->client_fd;

    g_assert_cmpint(fd, >=, 0);
    f->client_fd = -1;
    g_assert_cmpint(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), ==, 0);
    return fd;
}

static void
raw_send(struct fixture *f, int fd, const void *buf, size_t len)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    size_t off = 0;

    while (off < len) {
        ssize_t n = send(fd, (const char *)buf + off, len - off, MSG_NOSIGNAL);

        if (n < 0 && errno == EAGAIN) {
            ring_run_once(&f->ring, 10);
            g_assert_cmpint(g_get_monotonic_time(), <, deadline);
            continue;
        }
        g_assert_cmpint(n, >, 0);
        off += (size_t)n;
    }
}

/* Read exactly len bytes, running the server meanwhile; returns false on
 * EOF or a reset. */
static bool
raw_recv(struct fixture *f, int fd, void *buf, size_t len)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    size_t off = 0;

    while (off < len) {
        ssize_t n = recv(fd, (char *)buf + off, len - off, 0);

        if (n < 0 && errno == EAGAIN) {
            ring_run_once(&f->ring, 10);
            g_assert_cmpint(g_get_monotonic_time(), <, deadline);
            continue;
        }
        if (n <= 0) {
            return false;
        }
        off += (size_t)n;
    }
    return true;
}

static void
put_be(GByteArray *b, uint64_t v, unsigned bytes)
{
    for (unsigned i = bytes; i-- > 0;) {
        guint8 c = (guint8)(v >> (8 * i));

        g_byte_array_append(b, &c, 1);
    }
}

static uint64_t
get_be(const uint8_t *p, unsigned bytes)
{
    uint64_t v = 0;

    for (unsigned i = 0; i < bytes; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

/* Fixed newstyle handshake with GO, by hand. */
/* Returns the export's transmission flags. */
static uint16_t
raw_handshake(struct fixture *f, int fd)
{
    g_autoptr(GByteArray) b = g_byte_array_new();
    uint8_t greeting[18], hdr[20], data[64];
    uint16_t flags = 0;
    uint32_t type;

    g_assert_true(raw_recv(f, fd, greeting, sizeof(greeting)));
    g_assert_cmpmem(greeting, 16, "NBDMAGICIHAVEOPT", 16);
    put_be(b, 3, 4); /* FIXED_NEWSTYLE, NO_ZEROES */
    put_be(b, UINT64_C(0x49484156454f5054), 8);
    put_be(b, 7, 4); /* NBD_OPT_GO */
    put_be(b, 4 + 3 + 2, 4);
    put_be(b, 3, 4);
    g_byte_array_append(b, (const guint8 *)"vd0", 3);
    put_be(b, 0, 2);
    raw_send(f, fd, b->data, b->len);
    do {
        g_assert_true(raw_recv(f, fd, hdr, sizeof(hdr)));
        g_assert_cmphex(get_be(hdr, 8), ==, UINT64_C(0x3e889045565a9));
        type = (uint32_t)get_be(hdr + 12, 4);
        g_assert_cmpuint(get_be(hdr + 16, 4), <=, sizeof(data));
        g_assert_true(raw_recv(f, fd, data, get_be(hdr + 16, 4)));
        if (type == 3 && get_be(data, 2) == 0) { /* NBD_INFO_EXPORT */
            flags = (uint16_t)get_be(data + 10, 2);
        }
    } while (type == 3);           /* NBD_REP_INFO */
    g_assert_cmpuint(type, ==, 1); /* NBD_REP_ACK */
    return flags;
}

static void raw_request(struct fixture *f, int fd, uint16_t type,
                        uint64_t cookie, uint64_t off, uint32_t len);

static void
raw_disc(struct fixture *f, int fd)
{
    raw_request(f, fd, 2 /* DISC */, 99, 0, 0);
}

static void
run_until(struct fixture *f, bool (*cond)(const struct backup_target *),
          const struct backup_target *t)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

    while (!cond(t)) {
        g_assert_cmpint(ring_run_once(&f->ring, 100), >=, 0);
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
    }
}

/* Pages of the file in the page cache, of those in [off, off + len). */
static size_t
resident_pages(int fd, uint64_t off, size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE), n = len / page, count = 0;
    g_autofree unsigned char *vec = g_malloc(n);
    void *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, (off_t)off);

    g_assert_true(p != MAP_FAILED);
    g_assert_cmpint(mincore(p, len, vec), ==, 0);
    for (size_t i = 0; i < n; i++) {
        count += vec[i] & 1;
    }
    munmap(p, len);
    return count;
}

/* A target of 64 MiB, 48 MiB of data written through it by qemu-io. */
static struct backup_target *
big_backup(struct fixture *f, const char *file)
{
    static const char *const cmds[] = {"write -P 0x5a 0 48M", NULL};
    g_autoptr(GError) err = NULL;
    struct backup_target *t;

    t = backup_target_new(&f->ring, f->dir_fd, file, "vd0", 64 * MIB,
                          CLUSTER_BITS, NULL, NULL, &f->client_fd, &err);
    g_assert_no_error(err);
    g_assert_cmpint(serve(f, t, WRITEBACK, cmds), ==, 0);
    return t;
}

/* Past 32 MiB of data (RECYCLE_LAG) the oldest data, written back by
 * then, is dropped from the page cache, so the kernel reuses those pages:
 * after 48 MiB the file's first MiBs are no longer cached, and the image
 * is whole. */
static void
test_page_cache_recycled(void)
{
    g_autofree char *path = NULL;
    struct backup_target *t;
    struct statfs sfs;
    struct fixture f;
    size_t cached;
    int fd;

    fixture_init(&f);
    t = big_backup(&f, "big.qcow2");
    commit_ok(&f, t, "big.qcow2");
    backup_target_free(t);

    path = fixture_path(&f, "big.qcow2");
    fd = open(path, O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(fstatfs(fd, &sfs), ==, 0);
    /* Data from cluster 1 on; cluster 0 is the header, written at commit. */
    cached = resident_pages(fd, 64 * KIB, 8 * MIB);
    if (sfs.f_type == TMPFS_MAGIC) {
        g_test_message("tmpfs keeps its pages: %zu cached", cached);
    } else {
        g_assert_cmpuint(cached, ==, 0);
    }
    close(fd);
    {
        const char *check[] = {"qemu-img", "check", "-q", path, NULL};
        const char *read[] = {"qemu-io",
                              "-f",
                              "qcow2",
                              "-c",
                              "read -P 0x5a 0 48M",
                              "-c",
                              "read -P 0 48M 16M",
                              path,
                              NULL};
        g_autofree char *out = NULL;

        g_assert_cmpint(run_sync(check, NULL), ==, 0);
        g_assert_cmpint(run_sync(read, &out), ==, 0);
        g_assert_null(strstr(out, "Pattern verification failed"));
    }
    fixture_fini(&f);
}

/* The export's one client is the far end of its socket pair: there is no
 * socket anyone else could connect to.  It counts as connected once it has
 * spoken, and once it has gone the export is over. */
static void
test_one_client_ever(void)
{
    struct backup_target *t;
    struct fixture f;
    uint8_t byte;
    int a;

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    a = raw_client(&f);
    /* The greeting goes out at once; silence is not a connection yet. */
    g_assert_cmpint(ring_run_once(&f.ring, 10), >=, 0);
    g_assert_false(backup_target_connected(t));

    raw_handshake(&f, a);
    g_assert_true(backup_target_connected(t));
    raw_disc(&f, a);
    run_until(&f, backup_target_finished, t);
    g_assert_false(raw_recv(&f, a, &byte, 1)); /* closed after DISC */
    close(a);
    g_assert_null(backup_target_error(t));
    commit_ok(&f, t, "t.qcow2");
    backup_target_free(t);
    fixture_fini(&f);
}

static void
raw_request(struct fixture *f, int fd, uint16_t type, uint64_t cookie,
            uint64_t off, uint32_t len)
{
    g_autoptr(GByteArray) b = g_byte_array_new();

    put_be(b, 0x25609513, 4);
    put_be(b, 0, 2);
    put_be(b, type, 2);
    put_be(b, cookie, 8);
    put_be(b, off, 8);
    put_be(b, len, 4);
    raw_send(f, fd, b->data, b->len);
}

/* QEMU never sends one, but the protocol allows it: a zero-length READ
 * once left an empty output chunk that the glue sent as 0 bytes and took
 * for a dead socket. */
static void
test_zero_length_read_keeps_connection(void)
{
    struct backup_target *t;
    struct fixture f;
    uint8_t reply[16], byte;
    int fd;

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    fd = raw_client(&f);
    raw_handshake(&f, fd);
    for (uint64_t cookie = 1; cookie <= 20; cookie++) {
        raw_request(&f, fd, 0 /* READ */, cookie, 4096, 0);
        g_assert_true(raw_recv(&f, fd, reply, sizeof(reply)));
        g_assert_cmphex(get_be(reply, 4), ==, 0x67446698);
        g_assert_cmpuint(get_be(reply + 4, 4), ==, 0);
        g_assert_cmpuint(get_be(reply + 8, 8), ==, cookie);
    }
    raw_disc(&f, fd);
    run_until(&f, backup_target_finished, t);
    g_assert_false(raw_recv(&f, fd, &byte, 1));
    close(fd);
    g_assert_null(backup_target_error(t));
    commit_ok(&f, t, "t.qcow2");
    backup_target_free(t);
    fixture_fini(&f);
}

/* The export offers no FLUSH and no FUA: QEMU passes every guest flush on
 * to the backup target, and an fsync of the backup file would hold the
 * guest up for nothing (the layer is fsynced at commit).  A client that
 * sends one anyway is refused, and its connection goes on. */
static void
test_flush_not_offered(void)
{
    struct backup_target *t;
    struct fixture f;
    uint8_t reply[16];
    uint16_t flags;
    int fd;

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    fd = raw_client(&f);
    flags = raw_handshake(&f, fd);
    g_assert_cmphex(flags & 1, ==, 1);        /* NBD_FLAG_HAS_FLAGS */
    g_assert_cmphex(flags & (1 << 2), ==, 0); /* NBD_FLAG_SEND_FLUSH */
    g_assert_cmphex(flags & (1 << 3), ==, 0); /* NBD_FLAG_SEND_FUA */
    g_assert_cmphex(flags & (1 << 6), !=, 0); /* NBD_FLAG_SEND_WRITE_ZEROES */
    raw_request(&f, fd, 3 /* FLUSH */, 21, 0, 0);
    g_assert_true(raw_recv(&f, fd, reply, sizeof(reply)));
    g_assert_cmpuint(get_be(reply + 4, 4), ==, 22); /* NBD_EINVAL */
    g_assert_cmpuint(get_be(reply + 8, 8), ==, 21);
    raw_request(&f, fd, 0 /* READ */, 22, 0, 4096);
    g_assert_true(raw_recv(&f, fd, reply, sizeof(reply)));
    g_assert_cmpuint(get_be(reply + 4, 4), ==, 0);
    g_assert_cmpuint(get_be(reply + 8, 8), ==, 22);
    {
        uint8_t data[4096];
        g_assert_true(raw_recv(&f, fd, data, sizeof(data)));
    }
    raw_disc(&f, fd);
    run_until(&f, backup_target_finished, t);
    close(fd);
    g_assert_null(backup_target_error(t));
    commit_ok(&f, t, "t.qcow2");
    backup_target_free(t);
    fixture_fini(&f);
}

/* The fsync in commit, the target's only one, fails: the layer is not
 * committed, and the failure sticks. */
static void
test_commit_fsync_fault_fails_commit(void)
{
    g_autofree uint8_t *data = g_malloc(64 * KIB);
    g_autoptr(GError) err = NULL;
    struct backup_target *t;
    struct fixture f;
    uint8_t reply[16];
    int fd;

    g_assert_true(g_setenv("QBAK_FAULT_FSYNC", "1", true));
    fixture_init(&f);
    g_unsetenv("QBAK_FAULT_FSYNC");
    t = target_new(&f, "t.qcow2", NULL, NULL);
    fd = raw_client(&f);
    raw_handshake(&f, fd);
    memset(data, 0x5a, 64 * KIB);
    raw_request(&f, fd, 1 /* WRITE */, 1, 0, 64 * KIB);
    raw_send(&f, fd, data, 64 * KIB);
    g_assert_true(raw_recv(&f, fd, reply, sizeof(reply)));
    g_assert_cmpuint(get_be(reply + 4, 4), ==, 0);
    raw_disc(&f, fd);
    run_until(&f, backup_target_finished, t);
    close(fd);
    g_assert_null(backup_target_error(t));

    g_assert_false(backup_target_commit(t, &err));
    g_assert_nonnull(err);
    g_assert_nonnull(strstr(err->message, "vd0: fsync: Input/output error"));
    g_assert_cmpstr(backup_target_error(t), ==, err->message);
    g_clear_error(&err);
    /* A retry does not turn the failed fsync into a success. */
    g_assert_false(backup_target_commit(t, &err));
    g_assert_nonnull(err);
    backup_target_free(t);
    fixture_fini(&f);
}

/* How much of the handshake a client sends before it hangs up. */
static const struct {
    const char *name;
    size_t bytes;
    bool read_greeting;
} hangups[] = {
    {"before-greeting", 0, false},        {"after-greeting", 0, true},
    {"in-client-flags", 2, true},         {"in-option-header", 4 + 10, true},
    {"in-option-data", 4 + 16 + 5, true},
};

static void
test_client_hangs_up_mid_handshake(gconstpointer data)
{
    const __typeof__(hangups[0]) *h = data;
    g_autoptr(GByteArray) b = g_byte_array_new();
    struct backup_target *t;
    struct fixture f;
    uint8_t greeting[18];
    int fd;

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    fd = raw_client(&f);
    if (h->read_greeting) {
        g_assert_true(raw_recv(&f, fd, greeting, sizeof(greeting)));
    }
    put_be(b, 3, 4);
    put_be(b, UINT64_C(0x49484156454f5054), 8);
    put_be(b, 7, 4);
    put_be(b, 9, 4);
    put_be(b, 3, 4);
    g_byte_array_append(b, (const guint8 *)"vd0", 3);
    raw_send(&f, fd, b->data, h->bytes);
    close(fd);

    run_until(&f, backup_target_finished, t);
    g_assert_nonnull(backup_target_error(t));
    g_test_message("error: %s", backup_target_error(t));
    /* "NBD client disconnected without NBD_CMD_DISC", or a send that
     * failed on the closed socket. */
    g_assert_nonnull(strstr(backup_target_error(t), "NBD"));
    backup_target_free(t);
    fixture_fini(&f);
}

static void
test_free_without_client(void)
{
    struct backup_target *t;
    struct fixture f;
    uint8_t greeting[18], byte;
    int fd;

    fixture_init(&f);
    t = target_new(&f, "t.qcow2", NULL, NULL);
    fd = raw_client(&f);
    g_assert_true(raw_recv(&f, fd, greeting, sizeof(greeting)));
    /* A client that never speaks: freeing does not hang, and the client
     * sees its connection end. */
    backup_target_free(t);
    g_assert_false(raw_recv(&f, fd, &byte, 1));
    close(fd);
    fixture_fini(&f);
}

/* Set-up failures return NULL with a message and leave nothing running. */
static void
test_new_fails_cleanly(void)
{
    g_autoptr(GError) err = NULL;
    struct backup_target *t;
    struct fixture f;
    int fd;

    fixture_init(&f);
    fd = openat(f.dir_fd, "exists.qcow2", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    g_assert_cmpint(fd, >=, 0);
    close(fd);
    /* Never overwrite a file: a layer is created, not reused. */
    t = backup_target_new(&f.ring, f.dir_fd, "exists.qcow2", "vd0", DISK_SIZE,
                          CLUSTER_BITS, NULL, NULL, &f.client_fd, &err);
    g_assert_null(t);
    g_assert_error(err, G_FILE_ERROR, G_FILE_ERROR_EXIST);
    g_assert_nonnull(strstr(err->message, "vd0: "));
    g_clear_error(&err);

    /* A cluster size qcow2 does not have. */
    t = backup_target_new(&f.ring, f.dir_fd, "bits.qcow2", "vd0", DISK_SIZE, 30,
                          NULL, NULL, &f.client_fd, &err);
    g_assert_null(t);
    g_assert_cmpint(f.client_fd, <, 0);
    g_assert_nonnull(err);
    g_assert_nonnull(strstr(err->message, "vd0: "));
    g_assert_cmpuint(f.ring.inflight, ==, 0);
    fixture_fini(&f);
}

/* Storage faults under a connected client (ring.h's fault injection). */
static const struct {
    const char *name;
    const char *var;
    const char *value;
    const char *message;
} faults[] = {
    {"first-write-eio", "QBAK_FAULT_FILE_WRITE", "1", "write: Input/output"},
    {"third-write-enospc", "QBAK_FAULT_FILE_WRITE", "3:ENOSPC",
     "write: No space left on device"},
};

static void
test_storage_fault_fails_the_backup(gconstpointer data)
{
    const __typeof__(faults[0]) *fault = data;
    static const char *const cmds[] = {
        "write -P 0x5a 0 1M",
        "write -P 0x11 2M 64k",
        "write -P 0x22 3M 128k",
        "flush",
        "write -P 0x44 1M 64k",
        "flush",
        NULL,
    };
    g_autoptr(GError) err = NULL;
    struct backup_target *t;
    struct fixture f;

    g_assert_true(g_setenv(fault->var, fault->value, true));
    fixture_init(&f); /* ring_init reads the variable */
    g_unsetenv(fault->var);
    t = target_new(&f, "t.qcow2", NULL, NULL);

    /* QEMU is told every write succeeded: an error would reach the guest
     * through copy-before-write.  The backup fails instead. */
    g_assert_cmpint(serve(&f, t, WRITEBACK, cmds), ==, 0);
    g_assert_nonnull(backup_target_error(t));
    g_test_message("error: %s", backup_target_error(t));
    g_assert_nonnull(strstr(backup_target_error(t), "vd0: "));
    g_assert_nonnull(strstr(backup_target_error(t), fault->message));
    g_assert_false(backup_target_commit(t, &err));
    g_assert_nonnull(err);
    g_assert_cmpstr(err->message, ==, backup_target_error(t));
    backup_target_free(t);
    fixture_fini(&f);
}

int
main(int argc, char **argv)
{
    g_autofree char *qemu_io = g_find_program_in_path("qemu-io");
    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
    g_autoptr(GError) err = NULL;
    struct ring probe;
    int ret;

    g_test_init(&argc, &argv, NULL);
    if (!qemu_io || !qemu_img) {
        printf("SKIP: requires qemu-io and qemu-img\n");
        return 77;
    }
    if (ring_init(&probe, 4) < 0) {
        printf("SKIP: requires io_uring\n");
        return 77;
    }
    ring_fini(&probe);
    g_unsetenv("QBAK_FAULT_FILE_WRITE");
    g_unsetenv("QBAK_FAULT_FSYNC");
    top_dir = g_dir_make_tmp("qbak-test-target-XXXXXX", &err);
    g_assert_no_error(err);

    g_test_add_func("/target/qemu-io-writes-land-in-qcow2",
                    test_qemu_io_writes_land_in_qcow2);
    g_test_add_func("/target/zeroes-and-trim-hide-the-backing-file",
                    test_zeroes_and_trim_hide_the_backing_file);
    g_test_add_func("/target/concurrent-requests", test_concurrent_requests);
    g_test_add_func("/target/flush-not-offered", test_flush_not_offered);
    g_test_add_func("/target/commit-fsync-fault-fails-commit",
                    test_commit_fsync_fault_fails_commit);
    g_test_add_func("/target/one-client-ever", test_one_client_ever);
    g_test_add_func("/target/page-cache-recycled", test_page_cache_recycled);
    g_test_add_func("/target/zero-length-read-keeps-connection",
                    test_zero_length_read_keeps_connection);
    for (size_t i = 0; i < G_N_ELEMENTS(hangups); i++) {
        g_autofree char *path = g_strdup_printf(
            "/target/client-hangs-up-mid-handshake/%s", hangups[i].name);

        g_test_add_data_func(path, &hangups[i],
                             test_client_hangs_up_mid_handshake);
    }
    g_test_add_func("/target/free-without-client", test_free_without_client);
    g_test_add_func("/target/new-fails-cleanly", test_new_fails_cleanly);
    for (size_t i = 0; i < G_N_ELEMENTS(faults); i++) {
        g_autofree char *path = g_strdup_printf(
            "/target/storage-fault-fails-the-backup/%s", faults[i].name);

        g_test_add_data_func(path, &faults[i],
                             test_storage_fault_fails_the_backup);
    }
    ret = g_test_run();
    if (ret == 0) {
        rmdir(top_dir);
    }
    g_free(top_dir);
    return ret;
}

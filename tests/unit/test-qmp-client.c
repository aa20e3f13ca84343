/* Unit tests for qmp/client.c's pipelined batches (qmp_client_call_many)
 * and qmp/batch.c's flags on top of them, against a scripted QMP server
 * in a child process on a unix socket.
 *
 * The server reads whole lines; for each command it answers as its script
 * says: a return, an error, an event first, or it hangs up.  It answers
 * only once the whole batch has arrived, so the test also proves the batch
 * went out before any reply was awaited (one round trip). */
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/ring.h"
#include "qmp/batch.h"
#include "qmp/client.h"

static char sock_dir[] = "/tmp/qbak-qmp-test-XXXXXX";
static char sock_path[128];

/* One write per line: the client may parse a reply before its newline
 * and hang up. */
static void
send_line(int fd, const char *s)
{
    g_autofree char *line = g_strconcat(s, "\n", NULL);
    size_t n = strlen(line);

    if (write(fd, line, n) != (ssize_t)n) {
        fprintf(stderr, "server: write %s: %s\n", s, strerror(errno));
        _exit(3);
    }
}

/* Read lines until `want` commands are in; returns them (ids kept). */
static json_t *
read_commands(int fd, size_t want)
{
    static char buf[65536];
    static size_t have;
    json_t *cmds = json_array();

    while (json_array_size(cmds) < want) {
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            json_t *m = json_loadb(buf, (size_t)(nl - buf), 0, NULL);
            if (!m) {
                _exit(4);
            }
            json_array_append_new(cmds, m);
            have -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, have);
            continue;
        }
        ssize_t r = read(fd, buf + have, sizeof(buf) - have);
        if (r <= 0) {
            _exit(5);
        }
        have += (size_t)r;
    }
    return cmds;
}

/* script: one letter per command of the batch: 'r' return {"n": i}, 'e'
 * error, 'v' an event then a return, 'f' forged replies (for the next
 * command and again for the previous one) then the return, 'x' hang up
 * instead of answering (and for everything after it). */
static void
serve(int lfd, const char *script)
{
    int fd = accept(lfd, NULL, NULL);
    json_t *cmds;
    size_t n = strlen(script);

    if (fd < 0) {
        _exit(2);
    }
    send_line(fd, "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, "
                  "\"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}");
    cmds = read_commands(fd, 1);
    send_line(fd, "{\"return\": {}, \"id\": 1}");
    json_decref(cmds);
    if (strcmp(script, "-") == 0) {
        close(fd);
        _exit(0);
    }
    /* The whole batch before the first answer. */
    cmds = read_commands(fd, n);
    for (size_t i = 0; i < n; i++) {
        json_t *id = json_object_get(json_array_get(cmds, i), "id");
        char *line = NULL;
        if (script[i] == 'x') {
            close(fd);
            _exit(0);
        }
        if (script[i] == 'v') {
            send_line(fd, "{\"event\": \"SOMETHING\", \"data\": {}}");
        }
        if (script[i] == 'f') {
            /* Not QEMU's: a reply for the next command before this one's,
             * and a second reply for the one before. */
            long long me = (long long)json_integer_value(id);
            char *next = NULL, *again = NULL;
            if (asprintf(&next, "{\"return\": {\"n\": 999}, \"id\": %lld}",
                         me + 1) < 0 ||
                asprintf(&again, "{\"return\": {\"n\": 998}, \"id\": %lld}",
                         me - 1) < 0) {
                _exit(6);
            }
            send_line(fd, next);
            send_line(fd, again);
            free(next);
            free(again);
        }
        if (script[i] == 'e') {
            if (asprintf(&line,
                         "{\"error\": {\"class\": \"GenericError\", "
                         "\"desc\": \"no %zu\"}, \"id\": %lld}",
                         i, (long long)json_integer_value(id)) < 0) {
                _exit(6);
            }
        } else if (asprintf(&line, "{\"return\": {\"n\": %zu}, \"id\": %lld}",
                            i, (long long)json_integer_value(id)) < 0) {
            _exit(6);
        }
        send_line(fd, line);
        free(line);
    }
    json_decref(cmds);
    /* Wait for the client to hang up. */
    char c;
    while (read(fd, &c, 1) > 0) {
    }
    _exit(0);
}

static pid_t
start_server(const char *script)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    pid_t pid;

    unlink(sock_path);
    g_strlcpy(sa.sun_path, sock_path, sizeof(sa.sun_path));
    g_assert_cmpint(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    g_assert_cmpint(listen(lfd, 1), ==, 0);
    pid = fork();
    g_assert_cmpint(pid, >=, 0);
    if (pid == 0) {
        serve(lfd, script);
    }
    close(lfd);
    return pid;
}

static void
finish(pid_t pid)
{
    int st;
    g_assert_cmpint(waitpid(pid, &st, 0), ==, pid);
    g_assert_true(WIFEXITED(st));
    g_assert_cmpint(WEXITSTATUS(st), ==, 0);
}

/* Runs a batch of strlen(script) commands against the script; checks each
 * call's outcome. */
static void
run_batch(const char *script)
{
    struct ring ring;
    pid_t pid = start_server(script);
    size_t n = strlen(script);
    struct qmp_call *calls = g_new0(struct qmp_call, n);
    struct qmp_client *c;
    GError *err = NULL;
    bool hung_up = false, all_ok = true;

    g_assert_cmpint(ring_init(&ring, 64), ==, 0);
    c = qmp_client_connect(&ring, sock_path, QMP_PARSER_QMP, 5000, &err);
    g_assert_no_error(err);
    for (size_t i = 0; i < n; i++) {
        calls[i].cmd = "query-x";
        calls[i].args = json_pack("{s:I}", "i", (json_int_t)i);
    }
    bool ok = qmp_client_call_many(c, calls, n, 5000);
    for (size_t i = 0; i < n; i++) {
        hung_up |= script[i] == 'x';
        g_assert_null(calls[i].args); /* taken */
        if (hung_up || script[i] == 'e') {
            all_ok = false;
            g_assert_null(calls[i].result);
            g_assert_nonnull(calls[i].error);
            if (!hung_up) {
                g_autofree char *want = g_strdup_printf("query-x: no %zu", i);
                g_assert_cmpstr(calls[i].error->message, ==, want);
            }
        } else {
            g_assert_no_error(calls[i].error);
            g_assert_cmpint(
                json_integer_value(json_object_get(calls[i].result, "n")), ==,
                (json_int_t)i);
        }
    }
    g_assert_true(ok == all_ok);
    qmp_calls_clear(calls, n);
    g_free(calls);
    if (strchr(script, 'v')) {
        json_t *ev = qmp_client_pop_event(c);
        g_assert_nonnull(ev);
        json_decref(ev);
    }
    qmp_client_free(c);
    ring_fini(&ring);
    finish(pid);
}

static void
test_all_ok(void)
{
    run_batch("rrrrrrrrrrrrrrrrrrrr"); /* more than QEMU's queue of 8 */
}

static void
test_error_in_middle(void)
{
    run_batch("rrerre");
}

static void
test_events_between(void)
{
    run_batch("rvrvr");
}

/* Replies that overtake an older command's, or repeat an answered one,
 * are not taken for anyone's. */
static void
test_forged(void)
{
    run_batch("rfrfrf");
}

static void
test_hangup(void)
{
    run_batch("rrxrr");
}

static void
test_empty(void)
{
    struct ring ring;
    pid_t pid = start_server("-");
    struct qmp_client *c;
    GError *err = NULL;

    g_assert_cmpint(ring_init(&ring, 64), ==, 0);
    c = qmp_client_connect(&ring, sock_path, QMP_PARSER_QMP, 5000, &err);
    g_assert_no_error(err);
    g_assert_true(qmp_client_call_many(c, NULL, 0, 5000));
    qmp_client_free(c);
    ring_fini(&ring);
    finish(pid);
}

/* qmp/batch.c: each success sets its flag to its value, a failure leaves
 * the flag, is named by its "what" in errp (the first) and warnings
 * (every one). */
static void
test_flags(void)
{
    struct ring ring;
    pid_t pid = start_server("rerre");
    struct qmp_client *c;
    struct qmp_batch bt;
    GError *err = NULL;
    g_autoptr(GPtrArray) warnings = g_ptr_array_new_with_free_func(g_free);
    bool flags[5] = {false, false, false, true, false};
    const char *what[5] = {"a", "b", "c", "d", "e"};

    g_assert_cmpint(ring_init(&ring, 64), ==, 0);
    c = qmp_client_connect(&ring, sock_path, QMP_PARSER_QMP, 5000, &err);
    g_assert_no_error(err);
    qmp_batch_init(&bt, 5);
    for (size_t i = 0; i < 5; i++) {
        /* d's success undoes: it sets false */
        qmp_batch_add(&bt, what[i], "query-x",
                      json_pack("{s:I}", "i", (json_int_t)i),
                      i == 2 ? NULL : &flags[i], i != 3);
    }
    g_assert_false(qmp_batch_run(c, &bt, 5000, warnings, &err));
    g_assert_null(bt.calls);
    g_assert_true(flags[0]);
    g_assert_false(flags[1]);
    g_assert_false(flags[2]); /* no flag: nothing set */
    g_assert_false(flags[3]);
    g_assert_false(flags[4]);
    g_assert_nonnull(err);
    g_assert_cmpstr(err->message, ==, "b: query-x: no 1");
    g_assert_cmpuint(warnings->len, ==, 2);
    g_assert_cmpstr(warnings->pdata[0], ==, "b: query-x: no 1");
    g_assert_cmpstr(warnings->pdata[1], ==, "e: query-x: no 4");
    g_clear_error(&err);
    qmp_client_free(c);
    ring_fini(&ring);
    finish(pid);
}

int
main(int argc, char **argv)
{
    int ret;

    signal(SIGPIPE, SIG_IGN);
    g_test_init(&argc, &argv, NULL);
    g_assert_nonnull(mkdtemp(sock_dir));
    g_snprintf(sock_path, sizeof(sock_path), "%s/qmp", sock_dir);
    g_test_add_func("/qmp/client/batch-all-answered-in-order", test_all_ok);
    g_test_add_func("/qmp/client/batch-error-in-middle-rest-run",
                    test_error_in_middle);
    g_test_add_func("/qmp/client/batch-events-between-replies",
                    test_events_between);
    g_test_add_func("/qmp/client/batch-forged-replies-dropped", test_forged);
    g_test_add_func("/qmp/client/batch-peer-hangs-up-mid-batch", test_hangup);
    g_test_add_func("/qmp/client/batch-empty", test_empty);
    g_test_add_func("/qmp/batch/flags-and-errors", test_flags);
    ret = g_test_run();
    unlink(sock_path);
    rmdir(sock_dir);
    return ret;
}

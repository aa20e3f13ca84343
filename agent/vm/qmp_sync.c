/* Blocking QMP: see qmp_sync.h. */
#include "agent/vm/qmp_sync.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmp/client.h"

#define MAX_LINE (1u << 20)

/* One JSON line, bounded in size and time.  The buffer is per fd: a
 * process here has at most one connection. */
static json_t *
read_line(int fd, GString *buf, int timeout_ms)
{
    gint64 deadline = qmp_now_ms() + timeout_ms;

    for (;;) {
        char *nl = memchr(buf->str, '\n', buf->len);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        char chunk[4096];
        gint64 left;
        ssize_t n;

        if (nl) {
            json_t *j = json_loadb(buf->str, (size_t)(nl - buf->str), 0, NULL);
            g_string_erase(buf, 0, (gssize)(nl - buf->str + 1));
            return j ? j : json_object();
        }
        left = deadline - qmp_now_ms();
        if (left <= 0 || poll(&p, 1, (int)left) <= 0 ||
            (n = read(fd, chunk, sizeof(chunk))) <= 0 || buf->len > MAX_LINE) {
            return NULL;
        }
        g_string_append_len(buf, chunk, n);
    }
}

static GString *fd_buf;
static int buf_fd = -1;

static GString *
buffer_for(int fd)
{
    if (!fd_buf || buf_fd != fd) {
        if (fd_buf) {
            g_string_free(fd_buf, true);
        }
        fd_buf = g_string_new(NULL);
        buf_fd = fd;
    }
    return fd_buf;
}

int
qmp_sync_open(const char *path, int timeout_ms)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    json_t *j;

    g_strlcpy(sun.sun_path, path, sizeof(sun.sun_path));
    if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    j = read_line(fd, buffer_for(fd), timeout_ms);
    if (!j || !json_object_get(j, "QMP")) {
        json_decref(j);
        close(fd);
        return -1;
    }
    json_decref(j);
    j = qmp_sync_call(fd, "qmp_capabilities", NULL, timeout_ms);
    if (!j || !json_object_get(j, "return")) {
        json_decref(j);
        close(fd);
        return -1;
    }
    json_decref(j);
    return fd;
}

json_t *
qmp_sync_call(int fd, const char *cmd, json_t *args, int timeout_ms)
{
    json_auto_t *msg = json_pack("{s:s}", "execute", cmd);
    g_autofree char *text = NULL;
    GString *buf = buffer_for(fd);

    if (args) {
        json_object_set_new(msg, "arguments", args);
    }
    text = json_dumps(msg, JSON_COMPACT);
    if (send(fd, text, strlen(text), MSG_NOSIGNAL) < 0 ||
        send(fd, "\n", 1, MSG_NOSIGNAL) < 0) {
        return NULL;
    }
    for (;;) {
        json_t *r = read_line(fd, buf, timeout_ms);
        if (!r || json_object_get(r, "return") || json_object_get(r, "error")) {
            return r;
        }
        json_decref(r); /* an event */
    }
}

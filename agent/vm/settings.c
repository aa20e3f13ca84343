/* The VM's settings: see settings.h. */
#include "agent/vm/settings.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/repo.h"

/* /proc files larger than this are not read (a command line is far
 * smaller). */
#define MAX_PROC_FILE (4u << 20)

/* QMP queries worth keeping to rebuild an equivalent VM, with their
 * arguments. */
static const struct {
    const char *cmd;
    const char *args; /* JSON or NULL */
} queries[] = {
    /* First: the backup plans its disks from it while QEMU answers the
     * rest (vm_settings_capture_query_block). */
    {"query-block", NULL},
    {"query-version", NULL},
    {"query-name", NULL},
    {"query-uuid", NULL},
    {"query-kvm", NULL},
    {"query-status", NULL},
    {"query-cpus-fast", NULL},
    {"query-hotpluggable-cpus", NULL},
    {"query-memdev", NULL},
    {"query-memory-size-summary", NULL},
    {"query-memory-devices", NULL},
    {"query-named-block-nodes", "{\"flat\": true}"},
    {"query-pci", NULL},
    {"query-chardev", NULL},
    {"query-migrate-capabilities", NULL},
    {"query-migrate-parameters", NULL},
};

static void not_captured(json_t *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static void
not_captured(json_t *s, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *msg = NULL;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    json_array_append_new(json_object_get(s, "not_captured"), json_string(msg));
}

static char *
proc_link(int pid, const char *what)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/%s", pid, what);
    return g_file_read_link(path, NULL);
}

/* A NUL-separated /proc file as strings. */
static json_t *
proc_strings(int pid, const char *what)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/%s", pid, what);
    g_autofree char *buf = NULL;
    gsize len = 0;
    json_t *arr;

    if (!g_file_get_contents(path, &buf, &len, NULL) || len == 0 ||
        len > MAX_PROC_FILE) {
        return NULL;
    }
    arr = json_array();
    for (gsize off = 0; off < len;) {
        size_t n = strnlen(buf + off, len - off);
        json_array_append_new(arr, json_stringn(buf + off, n));
        off += n + 1;
    }
    return arr;
}

/* Field 22 of /proc/PID/stat: when the process started (clock ticks after
 * boot); with the pid it names one process, even after pid reuse. */
static json_int_t
proc_start_time(int pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/stat", pid);
    g_autofree char *buf = NULL;
    char *p;
    int field = 2;

    if (!g_file_get_contents(path, &buf, NULL, NULL) ||
        !(p = strrchr(buf, ')'))) {
        return -1;
    }
    while (*p && field < 22) {
        if (*p++ == ' ') {
            field++;
        }
    }
    return *p ? (json_int_t)g_ascii_strtoull(p, NULL, 10) : -1;
}

static char *
restored_from(int pid)
{
    json_auto_t *env = proc_strings(pid, "environ");
    size_t i;
    json_t *e;
    const char *prefix = VM_RESTORED_ENV "=";

    json_array_foreach(env, i, e)
    {
        const char *s = json_string_value(e);
        if (s && g_str_has_prefix(s, prefix)) {
            return g_strdup(s + strlen(prefix));
        }
    }
    return NULL;
}

static void
capture_process(json_t *s, int pid, const char *qmp_path)
{
    json_t *argv;
    char *link;
    g_autofree char *from = NULL;

    if (pid <= 0) {
        not_captured(s,
                     "command line: the monitor %s does not say which "
                     "process it is (another pid namespace?)",
                     qmp_path);
        return;
    }
    json_object_set_new(s, "pid", json_integer(pid));
    json_object_set_new(s, "start_time", json_integer(proc_start_time(pid)));
    argv = proc_strings(pid, "cmdline");
    if (argv) {
        json_object_set_new(s, "argv", argv);
    } else {
        not_captured(s, "command line: /proc/%d/cmdline unreadable", pid);
    }
    if ((link = proc_link(pid, "cwd"))) {
        json_object_set_new(s, "cwd", json_string(link));
        g_free(link);
    } else {
        not_captured(s, "working directory: /proc/%d/cwd unreadable", pid);
    }
    if ((link = proc_link(pid, "exe"))) {
        json_object_set_new(s, "exe", json_string(link));
        g_free(link);
    }
    if ((from = restored_from(pid))) {
        json_object_set_new(s, "restored_from", json_string(from));
    }
}

/* Ids given with -device on the command line. */
static GHashTable *
argv_device_ids(json_t *argv)
{
    GHashTable *ids =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    size_t n = json_array_size(argv);

    for (size_t i = 0; i + 1 < n; i++) {
        const char *a = json_string_value(json_array_get(argv, i));
        const char *v = json_string_value(json_array_get(argv, i + 1));
        if (!a || !v || (strcmp(a, "-device") && strcmp(a, "--device"))) {
            continue;
        }
        if (v[0] == '{') {
            json_auto_t *j = json_loads(v, 0, NULL);
            const char *id = json_string_value(json_object_get(j, "id"));
            if (id) {
                g_hash_table_add(ids, g_strdup(id));
            }
            continue;
        }
        g_auto(GStrv) items = g_strsplit(v, ",", -1);
        for (char **it = items; *it; it++) {
            if (g_str_has_prefix(*it, "id=")) {
                g_hash_table_add(ids, g_strdup(*it + 3));
            }
        }
    }
    return ids;
}

static char *
qom_get_string(struct qmp_client *qmp, const char *path, const char *prop,
               int timeout_ms)
{
    json_auto_t *r = qmp_client_call(
        qmp, "qom-get", json_pack("{s:s, s:s}", "path", path, "property", prop),
        timeout_ms, NULL);
    if (json_is_string(r)) {
        return g_strdup(json_string_value(r));
    }
    if (json_is_integer(r) && strcmp(prop, "addr") == 0) {
        json_int_t devfn = json_integer_value(r);
        return g_strdup_printf("0x%x.%x", (unsigned)(devfn >> 3),
                               (unsigned)(devfn & 7));
    }
    return NULL;
}

/* Devices in /machine/peripheral that no -device on the command line
 * made: added at run time (device_add).  Enough of each to add it back:
 * type, bus, address, and the backend it uses. */
static void
capture_hotplugged(json_t *s, struct qmp_client *qmp, int timeout_ms)
{
    json_t *argv = json_object_get(s, "argv");
    json_t *qmpres = json_object_get(s, "qmp");
    json_t *list = json_object_get(qmpres, "qom-list /machine/peripheral");
    json_t *anon = json_object_get(qmpres, "qom-list /machine/peripheral-anon");
    json_t *hot = json_array();
    g_autoptr(GHashTable) ids = argv_device_ids(argv);
    const char *props[] = {"drive", "chardev", "netdev", NULL};
    size_t i, nanon = 0, argv_anon = 0;
    json_t *e;

    json_object_set_new(s, "hotplugged", hot);
    json_array_foreach(list, i, e)
    {
        const char *name = json_string_value(json_object_get(e, "name"));
        const char *type = json_string_value(json_object_get(e, "type"));
        g_autofree char *path = NULL, *bus = NULL, *tname = NULL;
        json_t *dev;

        if (!name || !type || !g_str_has_prefix(type, "child<") ||
            g_hash_table_contains(ids, name)) {
            continue;
        }
        path = g_strdup_printf("/machine/peripheral/%s", name);
        tname = g_strndup(type + 6, strlen(type + 6) - 1);
        dev = json_pack("{s:s, s:s}", "id", name, "type", tname);
        bus = qom_get_string(qmp, path, "parent_bus", timeout_ms);
        if (bus) {
            const char *slash = strrchr(bus, '/');
            json_object_set_new(dev, "bus",
                                json_string(slash ? slash + 1 : bus));
        }
        if (strstr(tname, "-pci")) {
            g_autofree char *addr =
                qom_get_string(qmp, path, "addr", timeout_ms);
            if (addr) {
                json_object_set_new(dev, "addr", json_string(addr));
            }
        }
        for (const char **p = props; *p; p++) {
            g_autofree char *v = qom_get_string(qmp, path, *p, timeout_ms);
            if (v && *v) {
                json_object_set_new(dev, *p, json_string(v));
            }
        }
        json_array_append_new(hot, dev);
    }
    /* Devices without an id cannot be told apart: only counted. */
    json_array_foreach(anon, i, e)
    {
        const char *type = json_string_value(json_object_get(e, "type"));
        nanon += type && g_str_has_prefix(type, "child<");
    }
    for (i = 0; i + 1 < json_array_size(argv); i++) {
        const char *a = json_string_value(json_array_get(argv, i));
        const char *v = json_string_value(json_array_get(argv, i + 1));
        if (a && v && (!strcmp(a, "-device") || !strcmp(a, "--device")) &&
            !strstr(v, "id=") && !strstr(v, "\"id\"")) {
            argv_anon++;
        }
    }
    if (nanon > argv_anon) {
        not_captured(s,
                     "%zu device(s) without an id were added at run time: "
                     "they cannot be told apart, add them back by hand",
                     nanon - argv_anon);
    }
}

/* Whether a command line can be rebuilt: a manager that passes file
 * descriptors (libvirt) leaves nothing to reopen. */
static void
check_rebuildable(json_t *s)
{
    json_t *argv = json_object_get(s, "argv");
    size_t i;
    json_t *a;
    bool ok = json_is_array(argv);

    json_array_foreach(argv, i, a)
    {
        const char *v = json_string_value(a);
        if (v && (strstr(v, ",fd=") || g_str_has_prefix(v, "fd=") ||
                  strstr(v, "/dev/fdset/") || !strcmp(v, "-add-fd"))) {
            ok = false;
            not_captured(s, "the command line uses file descriptors passed by "
                            "its manager (as libvirt does): it cannot be "
                            "rebuilt; restore the disks and define the VM "
                            "in its manager again");
            break;
        }
    }
    json_object_set_new(s, "rebuildable", json_boolean(ok));
}

struct vm_settings_pending {
    struct qmp_client *qmp;
    int timeout_ms;
    json_t *s;
    struct qmp_call calls[G_N_ELEMENTS(queries) + 3];
};

static const char *const qom_paths[] = {"/machine/peripheral",
                                        "/machine/peripheral-anon"};

struct vm_settings_pending *
vm_settings_capture_start(struct qmp_client *qmp, const char *qmp_path,
                          const char *qga_path, int timeout_ms)
{
    struct vm_settings_pending *p = g_new0(struct vm_settings_pending, 1);
    json_t *s = json_pack("{s:i, s:o, s:o}", "format", VM_SETTINGS_FORMAT,
                          "not_captured", json_array(), "qmp", json_object());
    g_autofree char *time = repo_time_now();
    g_autofree char *qmp_abs = g_canonicalize_filename(qmp_path, NULL);
    int v = qmp_client_qemu_version(qmp);
    struct qmp_call *calls = p->calls;
    size_t nq;

    p->qmp = qmp;
    p->timeout_ms = timeout_ms;
    p->s = s;
    json_object_set_new(s, "time", json_string(time));
    json_object_set_new(
        s, "qemu_version",
        json_sprintf("%d.%d.%d", v / 10000, v / 100 % 100, v % 100));
    json_object_set_new(s, "qmp_path", json_string(qmp_abs));
    if (qga_path) {
        g_autofree char *qga_abs = g_canonicalize_filename(qga_path, NULL);
        json_object_set_new(s, "qga_path", json_string(qga_abs));
    }
    capture_process(s, qmp_client_peer_pid(qmp), qmp_path);
    /* One pipelined batch: the queries, the two qom-lists, the machine
     * type.  Answered in one round trip instead of nineteen. */
    nq = G_N_ELEMENTS(queries);
    for (size_t i = 0; i < nq; i++) {
        calls[i].cmd = queries[i].cmd;
        calls[i].args =
            queries[i].args ? json_loads(queries[i].args, 0, NULL) : NULL;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(qom_paths); i++) {
        calls[nq + i].cmd = "qom-list";
        calls[nq + i].args = json_pack("{s:s}", "path", qom_paths[i]);
    }
    calls[nq + 2].cmd = "qom-get";
    calls[nq + 2].args =
        json_pack("{s:s, s:s}", "path", "/machine", "property", "type");
    qmp_client_send_many(qmp, calls, G_N_ELEMENTS(p->calls), timeout_ms);
    return p;
}

json_t *
vm_settings_capture_query_block(struct vm_settings_pending *p, GError **errp)
{
    struct qmp_call *c = &p->calls[0];

    g_assert(strcmp(c->cmd, "query-block") == 0);
    qmp_client_wait_many(p->qmp, c, 1, p->timeout_ms);
    if (!c->result) {
        g_propagate_error(errp, g_error_copy(c->error));
        return NULL;
    }
    return json_incref(c->result);
}

json_t *
vm_settings_capture_finish(struct vm_settings_pending *p)
{
    struct qmp_client *qmp = p->qmp;
    struct qmp_call *calls = p->calls;
    int timeout_ms = p->timeout_ms;
    json_t *s = p->s;
    json_t *qmpres = json_object_get(s, "qmp");
    g_autofree char *mt = NULL;
    size_t nq = G_N_ELEMENTS(queries);

    qmp_client_wait_many(qmp, calls, G_N_ELEMENTS(p->calls), timeout_ms);
    for (size_t i = 0; i < nq + 2; i++) {
        g_autofree char *key =
            i < nq ? g_strdup(queries[i].cmd)
                   : g_strdup_printf("qom-list %s", qom_paths[i - nq]);
        if (calls[i].result) {
            json_object_set_new(qmpres, key, g_steal_pointer(&calls[i].result));
        } else {
            not_captured(s, "%s", calls[i].error->message);
        }
    }
    /* "q35" is an alias that moves with QEMU versions; a state loads only
     * into the machine type it was saved from. */
    if (json_is_string(calls[nq + 2].result)) {
        mt = g_strdup(json_string_value(calls[nq + 2].result));
    }
    qmp_calls_clear(calls, G_N_ELEMENTS(p->calls));
    g_free(p);
    if (mt && g_str_has_suffix(mt, "-machine")) {
        mt[strlen(mt) - strlen("-machine")] = 0;
    }
    if (mt) {
        json_object_set_new(s, "machine_type", json_string(mt));
    } else {
        not_captured(s, "machine type: qom-get /machine type failed");
    }
    capture_hotplugged(s, qmp, timeout_ms);
    check_rebuildable(s);
    return s;
}

void
vm_settings_capture_abandon(struct vm_settings_pending *p)
{
    if (p) {
        qmp_client_forget_many(p->qmp, p->calls, G_N_ELEMENTS(p->calls));
        json_decref(p->s);
        g_free(p);
    }
}

json_t *
vm_settings_capture(struct qmp_client *qmp, const char *qmp_path,
                    const char *qga_path, int timeout_ms)
{
    return vm_settings_capture_finish(
        vm_settings_capture_start(qmp, qmp_path, qga_path, timeout_ms));
}

bool
vm_settings_write(int dirfd, const char *name, json_t *settings, GError **errp)
{
    g_autofree char *text = json_dumps(settings, JSON_INDENT(1));
    size_t len = text ? strlen(text) : 0;
    int fd = openat(dirfd, name,
                    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

    if (fd < 0 || !text || fchmod(fd, 0600) < 0 ||
        write(fd, text, len) != (ssize_t)len) {
        int e = fd < 0 || errno == 0 ? errno : errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(e), "%s: %s",
                    name, g_strerror(e ? e : EIO));
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    close(fd);
    return true;
}

json_t *
vm_settings_summary(json_t *s)
{
    return json_pack(
        "{s:s, s:O, s:I, s:O}", "file", VM_SETTINGS_NAME, "rebuildable",
        json_object_get(s, "rebuildable"), "hotplugged",
        (json_int_t)json_array_size(json_object_get(s, "hotplugged")),
        "not_captured", json_object_get(s, "not_captured"));
}

char *
vm_settings_new_process_reason(json_t *now, json_t *prev,
                               const char *prev_point)
{
    const char *from = json_string_value(json_object_get(now, "restored_from"));
    json_t *pid = json_object_get(now, "pid");
    json_t *st = json_object_get(now, "start_time");

    if (from) {
        return g_strdup_printf("the VM was restored from %s by qbak restore "
                               "--start: a new chain",
                               from);
    }
    if (prev && json_is_integer(pid) &&
        (!json_equal(pid, json_object_get(prev, "pid")) ||
         !json_equal(st, json_object_get(prev, "start_time")))) {
        return g_strdup_printf("QEMU is another process than at point %s "
                               "(restarted or restored): its bitmaps are "
                               "gone, a new chain",
                               prev_point);
    }
    return NULL;
}

/* qbak restore --start: see restore_vm.h. */
#include "agent/vm/restore_vm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/repo.h"
#include "agent/restore.h"
#include "agent/vm/cmdline.h"
#include "agent/vm/qmp_sync.h"
#include "agent/vm/settings.h"
#include "agent/vm/vmstate.h"
#include "io/qcow2.h"
#include "io/ring.h"
#include "qmp/client.h"

#define INCOMING_FD "qbak-incoming"
#define STREAM_PREFIX "qbak-stream-"
#define PIN_QMP ".qbak-pin.qmp"
#define QEMU_LOG "qemu.log"
#define START_TIMEOUT_MS 60000

struct rvm {
    const struct restore_vm_opts *o;
    struct repo_vm *repo;
    GPtrArray *points;
    struct restore_point *p;
    json_t *settings;
    char *dir;
    bool memory;
    struct cmdline_disk *disks;
    char **disk_names;
    unsigned ndisks;
    struct cmdline_out cmd;
    char *pin_qmp;
    struct ring ring;
    bool ring_ok;
    struct qmp_client *qmp;
    pid_t pid;
};

static struct restore_point *
find_point(GPtrArray *points, const char *id)
{
    for (guint i = points->len; i > 0; i--) {
        struct restore_point *p = points->pdata[i - 1];
        if (!id || strcmp(p->id, id) == 0) {
            return p;
        }
    }
    return NULL;
}

/* The BlockBackend name of a node (-drive id), from the recorded
 * query-block. */
static const char *
backend_of(json_t *settings, const char *node)
{
    json_t *blocks =
        json_object_get(json_object_get(settings, "qmp"), "query-block");
    size_t i;
    json_t *b;

    json_array_foreach(blocks, i, b)
    {
        json_t *ins = json_object_get(b, "inserted");
        if (g_strcmp0(json_string_value(json_object_get(ins, "node-name")),
                      node) == 0) {
            const char *dev = json_string_value(json_object_get(b, "device"));
            return dev ? dev : "";
        }
    }
    return "";
}

/* Every writable disk the VM had must come back, or the new VM would run
 * on the original's images. */
static bool
check_all_disks(struct rvm *r, GError **errp)
{
    json_t *blocks =
        json_object_get(json_object_get(r->settings, "qmp"), "query-block");
    size_t i;
    json_t *b;

    json_array_foreach(blocks, i, b)
    {
        json_t *ins = json_object_get(b, "inserted");
        const char *node = json_string_value(json_object_get(ins, "node-name"));
        bool found = false;

        if (!json_is_object(ins) || !json_object_get(b, "qdev") ||
            json_is_true(json_object_get(ins, "ro"))) {
            continue;
        }
        for (unsigned k = 0; k < r->ndisks; k++) {
            found |= g_strcmp0(r->disks[k].node, node) == 0;
        }
        if (!found) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                        "point %s does not hold the VM's writable disk %s "
                        "(backed up with --disk?): the whole VM cannot be "
                        "started from it",
                        r->p->id, node ? node : "?");
            return false;
        }
    }
    return true;
}

static bool
plan(struct rvm *r, GError **errp)
{
    const struct restore_vm_opts *o = r->o;
    json_t *disks, *d, *mem, *argv;
    g_autofree char *path = NULL;
    g_autoptr(GPtrArray) args = g_ptr_array_new();
    size_t i;
    struct cmdline_in in = {0};

    r->points = repo_list_points(r->repo, errp);
    if (!r->points) {
        return false;
    }
    r->p = find_point(r->points, o->point);
    if (!r->p) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    o->point ? "%s: no committed point %s"
                             : "%s: no committed point",
                    o->vm, o->point);
        return false;
    }
    path = g_strdup_printf("%s/%s", r->p->id, VM_SETTINGS_NAME);
    r->settings = repo_read_json(r->repo->vm_fd, path, errp);
    if (!r->settings) {
        g_prefix_error(errp,
                       "point %s records no VM settings (made by an "
                       "older qbak?): ",
                       r->p->id);
        return false;
    }
    if (!json_is_true(json_object_get(r->settings, "rebuildable"))) {
        json_t *nc = json_object_get(r->settings, "not_captured");
        g_set_error(
            errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
            "point %s: the VM's command line cannot be rebuilt: %s", r->p->id,
            json_array_size(nc) ? json_string_value(json_array_get(nc, 0))
                                : "not recorded");
        return false;
    }
    mem = json_object_get(r->p->manifest, "memory");
    r->memory = !o->cold && json_is_object(mem);
    {
        g_autofree char *def = g_strdup_printf("%s-%s", o->vm, r->p->id);
        r->dir = g_canonicalize_filename(o->dir ? o->dir : def, NULL);
    }
    disks = json_object_get(r->p->manifest, "disks");
    r->ndisks = (unsigned)json_array_size(disks);
    r->disks = g_new0(struct cmdline_disk, r->ndisks + 1);
    r->disk_names = g_new0(char *, r->ndisks + 1);
    json_array_foreach(disks, i, d)
    {
        const char *name = json_string_value(json_object_get(d, "disk"));
        const char *node = json_string_value(json_object_get(d, "node"));
        if (!name || !node || !repo_name_valid(name, "disk", errp)) {
            return false;
        }
        r->disk_names[i] = g_strdup(name);
        r->disks[i].node = node;
        r->disks[i].backend = backend_of(r->settings, node);
        r->disks[i].file = g_strdup_printf("%s/%s.qcow2", r->dir, name);
    }
    if (!check_all_disks(r, errp)) {
        return false;
    }
    argv = json_object_get(r->settings, "argv");
    json_array_foreach(argv, i, d)
    {
        g_ptr_array_add(args, (gpointer)json_string_value(d));
    }
    g_ptr_array_add(args, NULL);
    in.argv = (char **)args->pdata;
    in.cwd = json_string_value(json_object_get(r->settings, "cwd"));
    in.machine_type =
        json_string_value(json_object_get(r->settings, "machine_type"));
    in.qmp_path = json_string_value(json_object_get(r->settings, "qmp_path"));
    in.qga_path = json_string_value(json_object_get(r->settings, "qga_path"));
    in.dir = r->dir;
    in.disks = r->disks;
    in.ndisks = r->ndisks;
    in.hotplugged = json_object_get(r->settings, "hotplugged");
    in.incoming = r->memory;
    if (!cmdline_rebuild(&in, &r->cmd, errp)) {
        g_prefix_error(errp, "point %s: ", r->p->id);
        return false;
    }
    if (o->live) {
        /* A monitor of its own for the pin holder, so the VM's own QMP
         * socket stays free for the next backup. */
        GPtrArray *a = r->cmd.argv;
        r->pin_qmp = g_build_filename(r->dir, PIN_QMP, NULL);
        g_ptr_array_insert(a, (gint)a->len - 1, g_strdup("-qmp"));
        g_ptr_array_insert(
            a, (gint)a->len - 1,
            g_strdup_printf("unix:%s,server=on,wait=off", r->pin_qmp));
    }
    return true;
}

/* A thin qcow2 overlay whose backing file is the point's layer: QEMU
 * reads the chain until block-stream has copied it. */
static bool
make_overlay(struct rvm *r, unsigned k, GError **errp)
{
    json_t *d = json_array_get(json_object_get(r->p->manifest, "disks"), k);
    const char *file = json_string_value(json_object_get(d, "file"));
    uint64_t size =
        (uint64_t)json_integer_value(json_object_get(d, "virtual_size"));
    g_autofree char *repo_abs = g_canonicalize_filename(r->o->repo, NULL);
    g_autofree char *backing =
        g_build_filename(repo_abs, r->o->vm, r->p->id, file, NULL);
    struct qcow2_writer *w;
    int fd;
    bool ok;

    fd = open(r->disks[k].file,
              O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", r->disks[k].file, g_strerror(errno));
        return false;
    }
    w = qcow2_writer_new(fd, size, QCOW2_DEFAULT_CLUSTER_BITS, backing, NULL,
                         errp);
    ok = w && qcow2_writer_finish(w, errp);
    qcow2_writer_free(w);
    if (ok && fsync(fd) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: fsync: %s", r->disks[k].file, g_strerror(errno));
        ok = false;
    }
    close(fd);
    return ok;
}

static bool
restore_disks(struct rvm *r, GError **errp)
{
    if (g_mkdir_with_parents(r->dir, 0700) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", r->dir, g_strerror(errno));
        return false;
    }
    for (unsigned k = 0; k < r->ndisks; k++) {
        if (r->o->live) {
            if (!make_overlay(r, k, errp)) {
                return false;
            }
        } else {
            struct restore_opts ro = {.repo = r->o->repo,
                                      .vm = r->o->vm,
                                      .disk = r->disk_names[k],
                                      .point = r->p->id,
                                      .output = r->disks[k].file,
                                      .qcow2 = true,
                                      .wait_ms = r->o->wait_ms};
            json_t *res = restore_run(&ro, errp);
            if (!res) {
                g_prefix_error(errp, "%s: ", r->disk_names[k]);
                return false;
            }
            json_decref(res);
        }
    }
    return true;
}

/* The last line QEMU wrote: why it refused to start or load. */
static char *
qemu_reason(struct rvm *r)
{
    g_autofree char *path = g_build_filename(r->dir, QEMU_LOG, NULL);
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return g_strdup("no message");
    }
    lines = g_strsplit(g_strstrip(text), "\n", -1);
    for (int i = (int)g_strv_length(lines) - 1; i >= 0; i--) {
        if (*g_strstrip(lines[i])) {
            return g_strdup(lines[i]);
        }
    }
    return g_strdup("no message");
}

static bool
spawn(struct rvm *r, GError **errp)
{
    char **argv = (char **)r->cmd.argv->pdata;
    const char *cwd = json_string_value(json_object_get(r->settings, "cwd"));
    g_autofree char *log = g_build_filename(r->dir, QEMU_LOG, NULL);
    g_autofree char *from = g_strdup_printf("%s/%s", r->o->vm, r->p->id);
    pid_t pid = fork();

    if (pid < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "fork: %s", g_strerror(errno));
        return false;
    }
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        int nul = open("/dev/null", O_RDONLY | O_CLOEXEC);
        setsid();
        if (fd < 0 || nul < 0 || dup2(nul, 0) < 0 || dup2(fd, 1) < 0 ||
            dup2(fd, 2) < 0) {
            _exit(127);
        }
        /* Nothing of ours (the repository's locks above all) goes on
         * living in QEMU. */
        for (int i = 3; i < 4096; i++) {
            close(i);
        }
        /* Relative paths on the recorded command line (kernel, images
         * not replaced) mean what they meant to the original. */
        if (!cwd || chdir(cwd) < 0) {
            if (chdir(r->dir) < 0) {
                _exit(127);
            }
        }
        setenv(VM_RESTORED_ENV, from, 1);
        execvp(argv[0], argv);
        fprintf(stderr, "qbak: exec %s: %s\n", argv[0], g_strerror(errno));
        _exit(127);
    }
    r->pid = pid;
    return true;
}

static bool
qemu_alive(struct rvm *r)
{
    return r->pid > 0 && waitpid(r->pid, NULL, WNOHANG) == 0;
}

static bool
qemu_died(struct rvm *r, const char *what, GError **errp)
{
    g_autofree char *why = qemu_reason(r);
    g_clear_error(errp);
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED, "%s: QEMU exited: %s",
                what, why);
    r->pid = 0;
    return false;
}

static bool
connect_qmp(struct rvm *r, GError **errp)
{
    gint64 deadline = qmp_now_ms() + START_TIMEOUT_MS;

    for (;;) {
        g_autoptr(GError) err = NULL;
        if (!qemu_alive(r)) {
            return qemu_died(r, "start", errp);
        }
        r->qmp = qmp_client_connect(&r->ring, r->cmd.qmp, QMP_PARSER_QMP,
                                    r->o->timeout_ms, &err);
        if (r->qmp) {
            return true;
        }
        if (qmp_now_ms() > deadline) {
            g_propagate_prefixed_error(errp, g_steal_pointer(&err),
                                       "the new VM's monitor: ");
            return false;
        }
        g_usleep(50000);
    }
}

/* Bitmaps of ours that came with the state (the fallback migrates them)
 * describe the original's chain, not this VM's: its first backup must be
 * a full, a new chain. */
static void
drop_our_bitmaps(struct rvm *r)
{
    json_auto_t *blocks =
        qmp_client_call(r->qmp, "query-block", NULL, r->o->timeout_ms, NULL);
    size_t i, k;
    json_t *b, *bm;

    json_array_foreach(blocks, i, b)
    {
        json_t *ins = json_object_get(b, "inserted");
        const char *node = json_string_value(json_object_get(ins, "node-name"));
        json_array_foreach(json_object_get(ins, "dirty-bitmaps"), k, bm)
        {
            const char *name = json_string_value(json_object_get(bm, "name"));
            if (node && name && g_str_has_prefix(name, "qbak-")) {
                json_decref(qmp_client_call(
                    r->qmp, "block-dirty-bitmap-remove",
                    json_pack("{s:s, s:s}", "node", node, "name", name),
                    r->o->timeout_ms, NULL));
            }
        }
    }
}

static bool
load_memory(struct rvm *r, GError **errp)
{
    g_autofree char *path = g_strdup_printf("%s/%s", r->p->id, VMSTATE_FILE);
    int fd = openat(r->repo->vm_fd, path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    json_t *ret;

    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", path, g_strerror(errno));
        return false;
    }
    ret = qmp_client_call_fd(r->qmp, "getfd",
                             json_pack("{s:s}", "fdname", INCOMING_FD), fd,
                             r->o->timeout_ms, errp);
    close(fd);
    if (!ret) {
        return false;
    }
    json_decref(ret);
    /* The capabilities the state was saved with (dirty-bitmaps for the
     * stop-and-migrate fallback): the stream has their sections. */
    {
        json_t *caps = json_object_get(
            json_object_get(r->p->manifest, "memory"), "capabilities");
        json_t *list = json_array();
        size_t i;
        json_t *c;

        json_array_foreach(caps, i, c)
        {
            if (json_is_string(c)) {
                json_array_append_new(
                    list, json_pack("{s:O, s:b}", "capability", c, "state", 1));
            }
        }
        if (json_array_size(list)) {
            ret = qmp_client_call(r->qmp, "migrate-set-capabilities",
                                  json_pack("{s:o}", "capabilities", list),
                                  r->o->timeout_ms, errp);
            if (!ret) {
                return false;
            }
            json_decref(ret);
        } else {
            json_decref(list);
        }
    }
    ret = qmp_client_call(r->qmp, "migrate-incoming",
                          json_pack("{s:s}", "uri", "fd:" INCOMING_FD),
                          r->o->timeout_ms, errp);
    if (!ret) {
        return false;
    }
    json_decref(ret);
    for (;;) {
        g_autoptr(GError) err = NULL;
        json_auto_t *m = qmp_client_call(r->qmp, "query-migrate", NULL,
                                         r->o->timeout_ms, &err);
        const char *st = json_string_value(json_object_get(m, "status"));

        /* A state that does not load makes QEMU 7.2 exit: its reason is
         * on its stderr. */
        if (!m) {
            if (!qemu_alive(r) ||
                g_error_matches(err, QMP_ERROR, QMP_ERROR_CLOSED)) {
                g_usleep(200000);
                return qemu_died(r, "the memory state did not load", errp);
            }
            g_propagate_error(errp, g_steal_pointer(&err));
            return false;
        }
        if (g_strcmp0(st, "completed") == 0) {
            drop_our_bitmaps(r);
            return true;
        }
        if (g_strcmp0(st, "failed") == 0) {
            const char *d = json_string_value(json_object_get(m, "error-desc"));
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                        "the memory state did not load: %s",
                        d ? d : "no reason given");
            return false;
        }
        qmp_client_wait_event(r->qmp, 100, NULL);
        json_t *ev;
        while ((ev = qmp_client_pop_event(r->qmp))) {
            json_decref(ev);
        }
    }
}

static bool
start_streams(struct rvm *r, GError **errp)
{
    /* Test only: QBAK_TEST_STREAM_SPEED=BYTES slows streaming down, so
     * that a test can act while it runs (pinning, a crash mid-stream). */
    const char *speed = getenv("QBAK_TEST_STREAM_SPEED");

    for (unsigned k = 0; k < r->ndisks; k++) {
        g_autofree char *job = g_strdup_printf(STREAM_PREFIX "%u", k);
        json_t *args =
            json_pack("{s:s, s:s}", "job-id", job, "device", r->disks[k].node);
        json_t *ret;

        if (speed != NULL) {
            json_object_set_new(args, "speed",
                                json_integer(g_ascii_strtoll(speed, NULL, 10)));
        }
        ret = qmp_client_call(r->qmp, "block-stream", args, r->o->timeout_ms,
                              errp);
        if (!ret) {
            g_prefix_error(errp, "%s: ", r->disk_names[k]);
            return false;
        }
        json_decref(ret);
    }
    return true;
}

/* The pin holder: keeps the VM's browse lock (prune waits) until no
 * stream job of ours is left in QEMU, or QEMU is gone. */
G_GNUC_NORETURN static void
pin_main(const char *qmp_path)
{
    int fd = -1;

    setsid();
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    for (int i = 0; i < 600 && fd < 0; i++) {
        fd = qmp_sync_open(qmp_path, 30000);
        if (fd < 0) {
            g_usleep(100000);
        }
    }
    while (fd >= 0) {
        json_auto_t *r = qmp_sync_call(fd, "query-block-jobs", NULL, 600000);
        json_t *jobs = json_object_get(r, "return");
        size_t i;
        json_t *j;
        bool ours = false;

        if (!json_is_array(jobs)) {
            break;
        }
        json_array_foreach(jobs, i, j)
        {
            ours |= g_str_has_prefix(
                json_string_value(json_object_get(j, "device")) ?: "",
                STREAM_PREFIX);
        }
        if (!ours) {
            break;
        }
        g_usleep(500000);
    }
    _exit(0);
}

static pid_t
pin_point(struct rvm *r, GError **errp)
{
    struct repo_vm *browse = repo_vm_open(
        r->o->repo, r->o->vm, false, REPO_LOCK_BROWSE, r->o->wait_ms, errp);
    pid_t pid;

    if (!browse) {
        return -1;
    }
    pid = fork();
    if (pid == 0) {
        for (int i = 3; i < 4096; i++) {
            if (i != browse->browse_fd) {
                close(i);
            }
        }
        pin_main(r->pin_qmp);
    }
    repo_vm_close(browse); /* the child's copy holds the lock */
    if (pid < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "fork: %s", g_strerror(errno));
    }
    return pid;
}

static json_t *
result(struct rvm *r, pid_t pin)
{
    json_t *disks = json_array(), *cmd = json_array();

    for (unsigned k = 0; k < r->ndisks; k++) {
        json_array_append_new(disks,
                              json_pack("{s:s, s:s}", "disk", r->disk_names[k],
                                        "file", r->disks[k].file));
    }
    for (guint i = 0; i + 1 < r->cmd.argv->len; i++) {
        json_array_append_new(cmd, json_string(r->cmd.argv->pdata[i]));
    }
    return json_pack("{s:s, s:s, s:o, s:s, s:s?, s:b, s:o, s:o, s:s, s:b, "
                     "s:o}",
                     "vm", r->o->vm, "point", r->p->id, "pid",
                     r->pid > 0 ? json_integer(r->pid) : json_null(), "qmp",
                     r->cmd.qmp, "qga", r->cmd.qga, "memory", r->memory,
                     "disks", disks, "command", cmd, "dir", r->dir, "live",
                     r->o->live, "pinned_by",
                     pin > 0 ? json_integer(pin) : json_null());
}

/* A state captured inside a freeze resumes frozen: thaw it through the
 * new VM's agent. */
static bool
thaw_guest(struct rvm *r, GError **errp)
{
    json_t *fr = json_object_get(r->p->manifest, "freeze");
    struct qmp_client *qga;
    json_t *ret;

    if (!r->memory || !json_is_object(fr) ||
        json_integer_value(json_object_get(fr, "filesystems")) <= 0) {
        return true;
    }
    if (!r->cmd.qga) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                    "the guest resumed frozen and has no agent channel to "
                    "thaw it");
        return false;
    }
    qga = qmp_client_connect(&r->ring, r->cmd.qga, QMP_PARSER_QGA,
                             r->o->timeout_ms, errp);
    if (!qga || !qga_client_sync(qga, r->o->timeout_ms, errp)) {
        qmp_client_free(qga);
        g_prefix_error(errp, "thawing the resumed guest: ");
        return false;
    }
    ret = qmp_client_call(qga, "guest-fsfreeze-thaw", NULL, r->o->timeout_ms,
                          errp);
    qmp_client_free(qga);
    if (!ret) {
        g_prefix_error(errp, "thawing the resumed guest: ");
        return false;
    }
    json_decref(ret);
    return true;
}

static bool
start(struct rvm *r, GError **errp)
{
    json_t *ret;

    if (!spawn(r, errp) || !connect_qmp(r, errp)) {
        return false;
    }
    if (r->memory && !load_memory(r, errp)) {
        return false;
    }
    ret = qmp_client_call(r->qmp, "query-status", NULL, r->o->timeout_ms, errp);
    if (!ret) {
        return qemu_alive(r) ? false : qemu_died(r, "start", errp);
    }
    if (!json_is_true(json_object_get(ret, "running"))) {
        json_decref(ret);
        ret = qmp_client_call(r->qmp, "cont", NULL, r->o->timeout_ms, errp);
        if (!ret) {
            return false;
        }
    }
    json_decref(ret);
    return thaw_guest(r, errp) && (!r->o->live || start_streams(r, errp));
}

json_t *
restore_vm_run(const struct restore_vm_opts *o, GError **errp)
{
    struct rvm r = {.o = o};
    json_t *res = NULL;
    pid_t pin = 0;
    int ret;

    r.repo =
        repo_vm_open(o->repo, o->vm, false, REPO_LOCK_SHARED, o->wait_ms, errp);
    if (!r.repo || !plan(&r, errp)) {
        goto out;
    }
    if (o->dry_run) {
        res = result(&r, 0);
        goto out;
    }
    ret = ring_init(&r.ring, 64);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "io_uring: %s", g_strerror(-ret));
        goto out;
    }
    r.ring_ok = true;
    if (!restore_disks(&r, errp) || !start(&r, errp)) {
        goto out;
    }
    if (o->live && (pin = pin_point(&r, errp)) < 0) {
        goto out;
    }
    res = result(&r, pin);
out:
    qmp_client_free(r.qmp);
    if (!res && r.pid > 0) {
        /* Nothing left running after a failure. */
        kill(r.pid, SIGKILL);
        waitpid(r.pid, NULL, 0);
    }
    if (r.ring_ok) {
        ring_fini(&r.ring);
    }
    cmdline_out_fini(&r.cmd);
    for (unsigned k = 0; k < r.ndisks; k++) {
        g_free((char *)r.disks[k].file);
        g_free(r.disk_names[k]);
    }
    g_free(r.disks);
    g_free(r.disk_names);
    g_free(r.pin_qmp);
    g_free(r.dir);
    json_decref(r.settings);
    if (r.points) {
        g_ptr_array_free(r.points, true);
    }
    repo_vm_close(r.repo);
    return res;
}

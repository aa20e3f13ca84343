/* qbak run: see run.h.
 *
 * Each VM's backup, then its prune, is a child process running this same
 * binary (`qbak backup --json`, `qbak prune --json`): a VM whose QEMU
 * misbehaves, or a bug that crashes qbak on one VM, costs that VM only.
 * The parent waits in ppoll() with SIGCHLD, SIGINT, SIGTERM and SIGHUP
 * blocked outside it, so no child's exit and no signal is missed; a
 * signal is forwarded to every child (backup then cancels its jobs and
 * thaws the guest, committing nothing) and no new child starts. */
#include "agent/host/run.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent/backup.h"
#include "agent/cli.h"
#include "agent/host/state.h"
#include "agent/progress.h"
#include "qmp/parser.h"

/* The timer that calls `run` fires every minute: a VM whose RPO would
 * pass before the next run is due now. */
#define TIMER_PERIOD_S 60
#define MAX_CHILD_OUTPUT (1 << 20)

enum phase { PHASE_BACKUP, PHASE_PRUNE };

/* Where a VM is in this run.  A run lasts while any of its backups does,
 * and VMs that fall due meanwhile start too: a long backup of one VM must
 * not hold back the others' RPOs (the timer cannot start a second run
 * while one is active). */
enum vm_state {
    VM_WAITING,     /* not due (yet) */
    VM_PENDING,     /* due, waiting for a slot */
    VM_RUNNING,     /* its backup or prune runs */
    VM_OK,          /* its last attempt succeeded; may fall due again */
    VM_FAILED,      /* failed or busy: retried by the next run, not this */
    VM_INTERRUPTED, /* a signal came before it started */
};

struct vm_run {
    struct host_vm *vm;
    enum vm_state state;
    bool first; /* due when the run started */
    unsigned attempts;
    json_t *out; /* this VM's entry in the result (owned by the result) */
    enum phase phase;
    pid_t pid;
    int out_fd, err_fd;    /* memfds: the child's stdout and stderr */
    int prog_fd;           /* the backup's progress reports (a pipe), or -1 */
    GString *prog_buf;     /* a partial line read from it */
    GPtrArray *prog_items; /* "vm/disk" items it put on the run's line */
    gint64 start_us;
    char *start_time;
    char *point;
    int64_t bytes;
};

static volatile sig_atomic_t child_exited;

static void
on_sigchld(int sig)
{
    child_exited = 1;
}

int
host_run_default_jobs(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return (int)CLAMP(n, 2, 16);
}

/* Whether vm is due: its last attempt failed (it is retried at every run
 * until it succeeds), or its newest point is older than its RPO less one
 * timer period and the last backup's duration (at most half the RPO
 * early), so the point after next lands within the RPO. */
static bool
is_due(struct host_vm *vm, json_t *entry)
{
    g_autofree char *point = NULL;
    g_autoptr(GError) err = NULL;
    int64_t t, slack;
    unsigned count;
    json_t *rec;

    if (!host_newest_point(vm->repo, vm->name, &point, &t, &count, &err) ||
        !point || t < 0) {
        return true; /* never backed up, or unreadable: backup will say */
    }
    json_object_set_new(entry, "newest_point", json_string(point));
    rec = host_record_read(vm->repo, vm->name);
    if (rec && g_strcmp0(json_string_value(json_object_get(rec, "outcome")),
                         "ok") != 0) {
        json_decref(rec);
        return true;
    }
    slack = TIMER_PERIOD_S +
            (int64_t)json_number_value(json_object_get(rec, "duration_s"));
    json_decref(rec);
    slack = MIN(slack, vm->rpo_s / 2);
    return g_get_real_time() / G_USEC_PER_SEC - t >= vm->rpo_s - slack;
}

static GPtrArray *
backup_argv(const struct host_run_opts *o, struct host_vm *vm)
{
    GPtrArray *a = g_ptr_array_new_with_free_func(g_free);

    g_ptr_array_add(a, g_strdup(o->self));
    g_ptr_array_add(a, g_strdup("backup"));
    g_ptr_array_add(a, g_strdup_printf("--qmp=%s", vm->qmp));
    g_ptr_array_add(a, g_strdup_printf("--repo=%s", vm->repo));
    g_ptr_array_add(a, g_strdup_printf("--vm=%s", vm->name));
    if (vm->qga) {
        g_ptr_array_add(a, g_strdup_printf("--qga=%s", vm->qga));
    }
    if (vm->quiesce) {
        g_ptr_array_add(a, g_strdup_printf("--quiesce=%s", vm->quiesce));
    }
    if (vm->memory) {
        g_ptr_array_add(a, g_strdup_printf("--memory=%s", vm->memory));
    }
    if (vm->mode) {
        g_ptr_array_add(a, g_strdup_printf("--mode=%s", vm->mode));
    }
    if (vm->scratch) {
        g_ptr_array_add(a, g_strdup_printf("--scratch=%s", vm->scratch));
    }
    if (vm->scratch_max) {
        g_ptr_array_add(a, g_strdup_printf("--scratch-max=%" G_GINT64_FORMAT,
                                           vm->scratch_max));
    }
    if (vm->nice >= 0) {
        g_ptr_array_add(a, g_strdup_printf("--nice=%d", vm->nice));
    }
    for (char **d = vm->disks; d && *d; d++) {
        g_ptr_array_add(a, g_strdup_printf("--disk=%s", *d));
    }
    if (vm->full) {
        g_ptr_array_add(a, g_strdup("--full"));
    }
    if (vm->speed) {
        g_ptr_array_add(
            a, g_strdup_printf("--speed=%" G_GINT64_FORMAT, vm->speed));
    }
    if (vm->timeout_s) {
        g_ptr_array_add(
            a, g_strdup_printf("--timeout=%" G_GINT64_FORMAT, vm->timeout_s));
    }
    if (vm->stall_s) {
        g_ptr_array_add(a, g_strdup_printf("--stall-timeout=%" G_GINT64_FORMAT,
                                           vm->stall_s));
    }
    if (vm->wait_s) {
        g_ptr_array_add(
            a, g_strdup_printf("--wait=%" G_GINT64_FORMAT, vm->wait_s));
    }
    if (o->progress) {
        g_ptr_array_add(a, g_strdup("--progress-fd=3"));
    }
    g_ptr_array_add(a, g_strdup("--json"));
    g_ptr_array_add(a, NULL);
    return a;
}

static GPtrArray *
prune_argv(const struct host_run_opts *o, struct host_vm *vm)
{
    GPtrArray *a = g_ptr_array_new_with_free_func(g_free);

    g_ptr_array_add(a, g_strdup(o->self));
    g_ptr_array_add(a, g_strdup("prune"));
    g_ptr_array_add(a, g_strdup_printf("--repo=%s", vm->repo));
    g_ptr_array_add(a, g_strdup_printf("--vm=%s", vm->name));
    for (int k = 0; k < HOST_KEEP_N; k++) {
        if (vm->keep[k] >= 0) {
            g_ptr_array_add(a,
                            g_strdup_printf("--%s=%" G_GINT64_FORMAT,
                                            host_keep_names[k], vm->keep[k]));
        }
    }
    if (vm->wait_s) {
        g_ptr_array_add(
            a, g_strdup_printf("--wait=%" G_GINT64_FORMAT, vm->wait_s));
    }
    g_ptr_array_add(a, g_strdup("--json"));
    g_ptr_array_add(a, NULL);
    return a;
}

static bool
spawn(struct vm_run *v, GPtrArray *argv, int prog_wfd,
      const sigset_t *orig_mask, GError **errp)
{
    v->out_fd = memfd_create("qbak-run-out", MFD_CLOEXEC);
    v->err_fd = memfd_create("qbak-run-err", MFD_CLOEXEC);
    if (v->out_fd < 0 || v->err_fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "memfd_create: %s", g_strerror(errno));
        return false;
    }
    v->pid = fork();
    if (v->pid < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "fork: %s", g_strerror(errno));
        return false;
    }
    if (v->pid == 0) {
        int null = open("/dev/null", O_RDONLY | O_CLOEXEC);

        /* Its own process group: a Ctrl-C reaches the parent, which
         * forwards it once, rather than every child twice. */
        setpgid(0, 0);
        sigprocmask(SIG_SETMASK, orig_mask, NULL);
        if (null < 0 || dup2(null, 0) < 0 || dup2(v->out_fd, 1) < 0 ||
            dup2(v->err_fd, 2) < 0) {
            _exit(127);
        }
        /* The progress pipe is fd 3 (backup --progress-fd=3). */
        if (prog_wfd == 3 ? fcntl(3, F_SETFD, 0) < 0
                          : prog_wfd >= 0 && dup2(prog_wfd, 3) < 0) {
            _exit(127);
        }
        execv(argv->pdata[0], (char **)argv->pdata);
        dprintf(2, "qbak: exec %s: %s\n", (char *)argv->pdata[0],
                g_strerror(errno));
        _exit(127);
    }
    return true;
}

/* What the child wrote on fd (at most MAX_CHILD_OUTPUT), closing fd. */
static char *
slurp(int *fd)
{
    off_t n = lseek(*fd, 0, SEEK_END);
    char *buf;
    ssize_t got;

    if (n < 0) {
        n = 0;
    }
    n = MIN(n, MAX_CHILD_OUTPUT);
    buf = g_malloc(n + 1);
    got = pread(*fd, buf, n, 0);
    buf[got > 0 ? got : 0] = '\0';
    close(*fd);
    *fd = -1;
    return buf;
}

/* The child's error: its last line on stderr without "qbak ", or how it
 * died. */
static char *
child_error(const char *what, int status, const char *err)
{
    g_auto(GStrv) lines = g_strsplit(err, "\n", -1);
    const char *last = NULL;

    for (char **l = lines; *l; l++) {
        if (**l) {
            last = *l;
        }
    }
    if (WIFSIGNALED(status)) {
        return g_strdup_printf("%s: killed by signal %d%s%s", what,
                               WTERMSIG(status), last ? ": " : "",
                               last ? last : "");
    }
    if (last) {
        g_autofree char *p = qmp_parser_printable(last);
        return g_strdup(g_str_has_prefix(p, "qbak ") ? p + 5 : p);
    }
    return g_strdup_printf("%s: exit status %d", what, WEXITSTATUS(status));
}

static void
finish(struct vm_run *v, const char *outcome, const char *error,
       int exit_status)
{
    double secs = (double)(g_get_monotonic_time() - v->start_us) / 1e6;
    json_auto_t *rec =
        json_pack("{s:s, s:s, s:s?, s:s?, s:f, s:I, s:i}", "time",
                  v->start_time, "outcome", outcome, "error", error, "point",
                  v->point, "duration_s", secs, "bytes_written",
                  (json_int_t)v->bytes, "exit_status", exit_status);
    g_autoptr(GError) err = NULL;

    json_object_update(v->out, rec);
    if (!host_record_write(v->vm->repo, v->vm->name, rec, &err)) {
        /* The outcome stands; status will show the older record. */
        json_object_set_new(v->out, "record_error", json_string(err->message));
    }
    v->pid = 0;
}

/* A child of v ended with status; returns whether v has another phase. */
static bool
child_done(const struct host_run_opts *o, struct vm_run *v, int status)
{
    g_autofree char *out = slurp(&v->out_fd);
    g_autofree char *errtext = slurp(&v->err_fd);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    const char *what = v->phase == PHASE_BACKUP ? "backup" : "prune";

    if (code != 0) {
        g_autofree char *msg = child_error(what, status, errtext);
        finish(v, code == QBAK_EXIT_BUSY ? "busy" : "failed", msg, code);
        return false;
    }
    if (v->phase == PHASE_BACKUP) {
        json_auto_t *res = json_loads(out, 0, NULL);
        size_t i;
        json_t *d;

        v->point = g_strdup(json_string_value(json_object_get(res, "point")));
        json_array_foreach(json_object_get(res, "disks"), i, d)
        {
            v->bytes += json_integer_value(json_object_get(d, "bytes_written"));
        }
        if (!v->point) {
            finish(v, "failed", "backup: printed no point", 1);
            return false;
        }
        if (host_vm_has_retention(v->vm) && !backup_interrupted) {
            v->phase = PHASE_PRUNE;
            return true;
        }
    } else {
        json_auto_t *res = json_loads(out, 0, NULL);
        json_object_set(v->out, "prune", res ? res : json_null());
    }
    finish(v, "ok", NULL, 0);
    return false;
}

static void
show_progress(struct progress *prog, guint done, guint total, guint running,
              guint failed)
{
    g_autofree char *label = NULL;

    if (prog) {
        label = g_strdup_printf("qbak run: %u of %u VMs done, %u running, "
                                "%u failed",
                                done, total, running, failed);
        progress_set_label(prog, label);
        progress_show(prog);
    }
}

static bool
start_phase(const struct host_run_opts *o, struct vm_run *v,
            const sigset_t *orig_mask)
{
    g_autoptr(GPtrArray) argv =
        v->phase == PHASE_BACKUP ? backup_argv(o, v->vm) : prune_argv(o, v->vm);
    g_autoptr(GError) err = NULL;
    int pfd[2] = {-1, -1};

    if (o->progress && v->phase == PHASE_BACKUP &&
        pipe2(pfd, O_CLOEXEC | O_NONBLOCK) < 0) {
        pfd[0] = pfd[1] = -1; /* no progress for this VM, that is all */
    }
    if (!spawn(v, argv, pfd[1], orig_mask, &err)) {
        g_autofree char *msg = g_strdup_printf("start: %s", err->message);
        if (v->out_fd >= 0) {
            close(v->out_fd);
        }
        if (v->err_fd >= 0) {
            close(v->err_fd);
        }
        if (pfd[0] >= 0) {
            close(pfd[0]);
            close(pfd[1]);
        }
        finish(v, "failed", msg, 1);
        return false;
    }
    if (pfd[1] >= 0) {
        close(pfd[1]);
    }
    v->prog_fd = pfd[0];
    return true;
}

/* Reads v's progress reports onto the run's line. */
static void
read_progress(struct progress *prog, struct vm_run *v)
{
    char buf[4096];
    ssize_t n;

    while ((n = read(v->prog_fd, buf, sizeof(buf))) > 0) {
        char *nl;

        g_string_append_len(v->prog_buf, buf, n);
        while ((nl = strchr(v->prog_buf->str, '\n'))) {
            char item[128];
            uint64_t done, total;

            *nl = '\0';
            if (progress_parse_line(v->prog_buf->str, item, &done, &total)) {
                g_autofree char *name =
                    g_strdup_printf("%s/%s", v->vm->name, item);

                if (!g_ptr_array_find_with_equal_func(v->prog_items, name,
                                                      g_str_equal, NULL)) {
                    g_ptr_array_add(v->prog_items, g_strdup(name));
                }
                progress_set(prog, name, done, total);
            }
            g_string_erase(v->prog_buf, 0, nl - v->prog_buf->str + 1);
        }
        if (v->prog_buf->len > 4096) {
            g_string_truncate(v->prog_buf, 0); /* no line: not ours */
        }
    }
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        close(v->prog_fd);
        v->prog_fd = -1;
    }
}

/* v is done: its items leave the line. */
static void
drop_progress(struct progress *prog, struct vm_run *v)
{
    if (v->prog_fd >= 0) {
        close(v->prog_fd);
        v->prog_fd = -1;
    }
    for (guint i = 0; i < v->prog_items->len; i++) {
        progress_remove(prog, v->prog_items->pdata[i]);
    }
    g_ptr_array_set_size(v->prog_items, 0);
}

static GPtrArray *
select_vms(const struct host_run_opts *o, GError **errp)
{
    GPtrArray *sel = g_ptr_array_new();

    if (!o->vms) {
        for (guint i = 0; i < o->config->vms->len; i++) {
            g_ptr_array_add(sel, o->config->vms->pdata[i]);
        }
        return sel;
    }
    for (char **n = o->vms; *n; n++) {
        struct host_vm *vm = host_config_find(o->config, *n);
        if (!vm) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                        "%s: no [vm %s] in %s", *n, *n, o->config->path);
            g_ptr_array_free(sel, true);
            return NULL;
        }
        if (!g_ptr_array_find(sel, vm, NULL)) {
            g_ptr_array_add(sel, vm);
        }
    }
    return sel;
}

/* The state of one run: its VMs and counters. */
struct run {
    const struct host_run_opts *o;
    struct vm_run *vms;
    guint n;
    guint count[VM_INTERRUPTED + 1]; /* VMs in each state */
    gint64 recheck_us;               /* when WAITING and OK VMs are next
                                        checked for being due */
    struct progress *prog;
    struct pollfd *pollfds; /* one per VM: the progress pipes */
    struct vm_run **pollers;
    sigset_t orig; /* the signal mask outside ppoll() */
};

static void
set_state(struct run *r, struct vm_run *v, enum vm_state st)
{
    r->count[v->state]--;
    r->count[st]++;
    v->state = st;
}

static void
start_more(struct run *r)
{
    for (guint i = 0; i < r->n && !backup_interrupted &&
                      r->count[VM_RUNNING] < (guint)r->o->jobs;
         i++) {
        struct vm_run *v = &r->vms[i];

        if (v->state != VM_PENDING) {
            continue;
        }
        g_clear_pointer(&v->start_time, g_free);
        g_clear_pointer(&v->point, g_free);
        v->bytes = 0;
        v->start_us = g_get_monotonic_time();
        v->start_time = repo_time_now();
        v->phase = PHASE_BACKUP;
        v->attempts++;
        json_object_set_new(v->out, "attempts", json_integer(v->attempts));
        set_state(r, v,
                  start_phase(r->o, v, &r->orig) ? VM_RUNNING : VM_FAILED);
    }
}

/* While a backup of those due at the start runs, VMs that fall due start
 * too; checked every quarter of the shortest RPO among them, 1 to 30 s.
 * Only while one of the first runs: VMs that keep falling due cannot keep
 * a run going for ever. */
static void
recheck_due(struct run *r)
{
    int64_t min_rpo = 120;
    bool first_running = false;

    for (guint i = 0; i < r->n; i++) {
        first_running |= r->vms[i].first && r->vms[i].state == VM_RUNNING;
    }
    if (!first_running || g_get_monotonic_time() < r->recheck_us) {
        return;
    }
    for (guint i = 0; i < r->n; i++) {
        struct vm_run *v = &r->vms[i];

        if (v->state == VM_WAITING || v->state == VM_OK) {
            min_rpo = MIN(min_rpo, v->vm->rpo_s);
            if (is_due(v->vm, v->out)) {
                json_object_set_new(v->out, "due", json_true());
                set_state(r, v, VM_PENDING);
            }
        }
    }
    r->recheck_us =
        g_get_monotonic_time() + CLAMP(min_rpo / 4, 1, 30) * G_USEC_PER_SEC;
}

/* A signal: forwarded once to every child; no VM starts after it. */
static void
forward_signal(struct run *r, int sig)
{
    for (guint i = 0; i < r->n; i++) {
        struct vm_run *v = &r->vms[i];

        if (v->pid > 0) {
            kill(v->pid, sig);
        }
        if (v->state == VM_PENDING) {
            /* Not attempted: no record. */
            json_object_set_new(v->out, "outcome", json_string("interrupted"));
            set_state(r, v, VM_INTERRUPTED);
        }
    }
}

static void
reap(struct run *r, pid_t pid, int status)
{
    for (guint i = 0; i < r->n; i++) {
        struct vm_run *v = &r->vms[i];
        const char *outcome, *e;

        if (v->pid != pid) {
            continue;
        }
        drop_progress(r->prog, v);
        if (child_done(r->o, v, status) && start_phase(r->o, v, &r->orig)) {
            return; /* still running: its prune */
        }
        outcome = json_string_value(json_object_get(v->out, "outcome"));
        set_state(r, v, g_strcmp0(outcome, "ok") == 0 ? VM_OK : VM_FAILED);
        if (r->prog) {
            e = json_string_value(json_object_get(v->out, "error"));
            fprintf(stderr, "\r\033[K%s: %s%s%s\n", v->vm->name, outcome,
                    e ? ": " : "", e ? e : "");
        }
        return;
    }
}

/* Sleeps until a child ends, a signal comes, a backup reports progress,
 * or it is time to check which VMs are due. */
static void
wait_for_news(struct run *r)
{
    struct pollfd *fds = r->pollfds;
    struct vm_run **owner = r->pollers;
    gint64 wait_us = r->recheck_us - g_get_monotonic_time();
    struct timespec tick;
    nfds_t nfds = 0;

    if (r->prog) {
        wait_us = MIN(wait_us, 500000); /* the line's rate stays current */
    }
    wait_us = MAX(wait_us, 1000);
    tick.tv_sec = wait_us / G_USEC_PER_SEC;
    tick.tv_nsec = wait_us % G_USEC_PER_SEC * 1000;

    for (guint i = 0; i < r->n; i++) {
        if (r->vms[i].pid > 0 && r->vms[i].prog_fd >= 0) {
            fds[nfds] = (struct pollfd){r->vms[i].prog_fd, POLLIN, 0};
            owner[nfds++] = &r->vms[i];
        }
    }
    if (ppoll(fds, nfds, &tick, &r->orig) > 0) {
        for (nfds_t k = 0; k < nfds; k++) {
            if (fds[k].revents) {
                read_progress(r->prog, owner[k]);
            }
        }
    }
}

static json_t *
plan(const struct host_run_opts *o, GPtrArray *sel, struct run *r)
{
    json_t *list = json_array();

    r->n = sel->len;
    r->vms = g_new0(struct vm_run, r->n);
    r->pollfds = g_new0(struct pollfd, r->n + 1);
    r->pollers = g_new0(struct vm_run *, r->n + 1);
    for (guint i = 0; i < r->n; i++) {
        struct vm_run *v = &r->vms[i];
        json_t *e = json_pack(
            "{s:s, s:I}", "vm", ((struct host_vm *)sel->pdata[i])->name,
            "rpo_s", (json_int_t)((struct host_vm *)sel->pdata[i])->rpo_s);
        bool due;

        v->vm = sel->pdata[i];
        v->out = e;
        v->out_fd = v->err_fd = v->prog_fd = -1;
        v->prog_buf = g_string_new(NULL);
        v->prog_items = g_ptr_array_new_with_free_func(g_free);
        due = o->all || is_due(v->vm, e);
        json_object_set_new(e, "due", json_boolean(due));
        json_object_set_new(e, "attempts", json_integer(0));
        if (!due) {
            json_object_set_new(e, "outcome", json_string("not-due"));
        }
        v->state = due ? VM_PENDING : VM_WAITING;
        v->first = due;
        r->count[v->state]++;
        json_array_append_new(list, e);
    }
    return list;
}

json_t *
host_run(const struct host_run_opts *o, bool *all_ok, GError **errp)
{
    g_autoptr(GPtrArray) sel = select_vms(o, errp);
    struct run r = {.o = o};
    json_t *list;
    sigset_t block;
    struct sigaction sa = {.sa_handler = on_sigchld}, old_sa;
    int forwarded = 0;
    guint failed;

    if (!sel) {
        return NULL;
    }
    list = plan(o, sel, &r);
    r.prog = progress_new("qbak run", o->progress);
    /* Signals and child exits are blocked but in ppoll(): none is lost
     * between a check and the sleep. */
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, &old_sa);
    sigemptyset(&block);
    sigaddset(&block, SIGCHLD);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, &r.orig);

    r.recheck_us = g_get_monotonic_time() + G_USEC_PER_SEC;
    for (;;) {
        guint done =
            r.count[VM_OK] + r.count[VM_FAILED] + r.count[VM_INTERRUPTED];
        int status;
        pid_t pid;

        start_more(&r);
        if (backup_interrupted && !forwarded) {
            forwarded = backup_interrupted;
            forward_signal(&r, forwarded);
        }
        show_progress(
            r.prog, done, done + r.count[VM_PENDING] + r.count[VM_RUNNING],
            r.count[VM_RUNNING], r.count[VM_FAILED] + r.count[VM_INTERRUPTED]);
        if (!r.count[VM_PENDING] && !r.count[VM_RUNNING]) {
            break;
        }
        child_exited = 0;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            reap(&r, pid, status);
        }
        if (pid == 0 && !(backup_interrupted && !forwarded)) {
            wait_for_news(&r);
        }
        if (!backup_interrupted && r.count[VM_RUNNING]) {
            recheck_due(&r);
        }
    }
    progress_end(r.prog, false);
    sigprocmask(SIG_SETMASK, &r.orig, NULL);
    sigaction(SIGCHLD, &old_sa, NULL);
    for (guint i = 0; i < r.n; i++) {
        g_free(r.vms[i].start_time);
        g_free(r.vms[i].point);
        g_string_free(r.vms[i].prog_buf, TRUE);
        g_ptr_array_unref(r.vms[i].prog_items);
    }
    g_free(r.vms);
    g_free(r.pollfds);
    g_free(r.pollers);
    failed = r.count[VM_FAILED] + r.count[VM_INTERRUPTED];
    *all_ok = failed == 0;
    return json_pack("{s:o, s:i, s:i, s:i, s:b}", "vms", list, "due",
                     r.count[VM_OK] + failed, "ok", r.count[VM_OK], "failed",
                     failed, "interrupted", backup_interrupted != 0);
}

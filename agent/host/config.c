/* The host's configuration file: see config.h and man qbak.conf(5).
 *
 * GKeyFile parses the values but tells no line numbers, and it silently
 * merges a repeated [group] and keeps the last of a repeated key.  So the
 * text is scanned first, line by line, for groups and keys: that scan
 * finds the duplicates and lines GKeyFile would reject, and remembers
 * where each key is so every later error can say FILE:LINE. */
#include "agent/host/config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "agent/error.h"
#include "agent/repo.h"

const char *const host_keep_names[HOST_KEEP_N] = {
    "keep-last",   "keep-hourly",  "keep-daily",
    "keep-weekly", "keep-monthly", "keep-yearly",
};

static const char *const known_keys[] = {
    "repo",        "qmp",         "qga",        "quiesce",       "disks",
    "rpo",         "speed",       "timeout",    "stall-timeout", "wait",
    "keep-last",   "keep-hourly", "keep-daily", "keep-weekly",   "keep-monthly",
    "keep-yearly", "full",        "memory",     "mode",          "scratch",
    "scratch-max", "nice",
};

#define VM_PREFIX "vm "

/* Where the scan found things: "group" -> line, "group\nkey" -> line. */
struct scan {
    const char *path;
    GHashTable *lines;
    GPtrArray *groups; /* in file order, borrowed from lines' keys */
};

static int
line_of(struct scan *s, const char *group, const char *key)
{
    g_autofree char *k =
        key ? g_strdup_printf("%s\n%s", group, key) : g_strdup(group);

    return GPOINTER_TO_INT(g_hash_table_lookup(s->lines, k));
}

G_GNUC_PRINTF(5, 6)
static bool
fail_at(struct scan *s, GError **errp, const char *group, const char *key,
        const char *fmt, ...)
{
    va_list ap;
    g_autofree char *msg = NULL;
    int line = line_of(s, group, key);

    if (!line && key) {
        line = line_of(s, group, NULL);
    }
    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED, "%s:%d: [%s] %s%s%s",
                s->path, line, group, key ? key : "", key ? ": " : "", msg);
    return false;
}

static bool
scan_text(struct scan *s, const char *text, GError **errp)
{
    g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
    const char *group = NULL;

    for (int i = 0; lines[i]; i++) {
        char *l = g_strstrip(lines[i]);
        char *eq;
        int n = i + 1;

        if (!*l || *l == '#') {
            continue;
        }
        if (*l == '[') {
            char *end = strchr(l, ']');
            g_autofree char *name = NULL;

            if (!end || end[1]) {
                g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                            "%s:%d: a group line must be [NAME]", s->path, n);
                return false;
            }
            name = g_strndup(l + 1, (gsize)(end - l - 1));
            if (g_hash_table_contains(s->lines, name)) {
                g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                            "%s:%d: [%s]: duplicate section (first on line "
                            "%d)",
                            s->path, n, name, line_of(s, name, NULL));
                return false;
            }
            /* The table owns the name; groups and group borrow it. */
            group = name;
            g_hash_table_insert(s->lines, g_steal_pointer(&name),
                                GINT_TO_POINTER(n));
            g_ptr_array_add(s->groups, (gpointer)group);
            continue;
        }
        eq = strchr(l, '=');
        if (!eq) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                        "%s:%d: not KEY = VALUE, [GROUP] or a # comment",
                        s->path, n);
            return false;
        }
        *eq = '\0';
        g_strchomp(l);
        if (!group) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                        "%s:%d: %s: a key before any [group]", s->path, n, l);
            return false;
        }
        g_autofree char *k = g_strdup_printf("%s\n%s", group, l);
        if (g_hash_table_contains(s->lines, k)) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                        "%s:%d: [%s] %s: set twice (first on line %d)", s->path,
                        n, group, l, line_of(s, group, l));
            return false;
        }
        g_hash_table_insert(s->lines, g_steal_pointer(&k), GINT_TO_POINTER(n));
    }
    return true;
}

bool
host_parse_duration(const char *s, int64_t *secs)
{
    char *end;
    int64_t mult = 1;
    long long v;

    if (!s || !g_ascii_isdigit(*s)) {
        return false;
    }
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || v < 0) {
        return false;
    }
    switch (*end) {
    case '\0':
    case 's':
        break;
    case 'm':
        mult = 60;
        break;
    case 'h':
        mult = 3600;
        break;
    case 'd':
        mult = 86400;
        break;
    default:
        return false;
    }
    if (*end && end[1]) {
        return false;
    }
    if (v > INT64_MAX / mult / 1000000) { /* room for microseconds */
        return false;
    }
    *secs = v * mult;
    return true;
}

bool
host_parse_size(const char *s, int64_t *bytes)
{
    char *end;
    int shift = 0;
    long long v;

    if (!s || !g_ascii_isdigit(*s)) {
        return false;
    }
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || v < 0) {
        return false;
    }
    switch (g_ascii_toupper(*end)) {
    case '\0':
        break;
    case 'K':
        shift = 10;
        break;
    case 'M':
        shift = 20;
        break;
    case 'G':
        shift = 30;
        break;
    case 'T':
        shift = 40;
        break;
    default:
        return false;
    }
    if (*end && end[1]) {
        return false;
    }
    if (v > (INT64_MAX >> shift)) {
        return false;
    }
    *bytes = (int64_t)v << shift;
    return true;
}

static void
host_vm_free(struct host_vm *vm)
{
    g_free(vm->name);
    g_free(vm->repo);
    g_free(vm->qmp);
    g_free(vm->qga);
    g_free(vm->quiesce);
    g_free(vm->memory);
    g_free(vm->mode);
    g_free(vm->scratch);
    g_strfreev(vm->disks);
    g_free(vm);
}

void
host_config_free(struct host_config *c)
{
    if (c) {
        g_free(c->path);
        g_ptr_array_unref(c->vms);
        g_free(c);
    }
}

struct host_vm *
host_config_find(struct host_config *c, const char *name)
{
    for (guint i = 0; i < c->vms->len; i++) {
        struct host_vm *vm = c->vms->pdata[i];
        if (strcmp(vm->name, name) == 0) {
            return vm;
        }
    }
    return NULL;
}

bool
host_vm_has_retention(const struct host_vm *vm)
{
    for (int k = 0; k < HOST_KEEP_N; k++) {
        if (vm->keep[k] >= 0) {
            return true;
        }
    }
    return false;
}

static bool
duration_key(struct scan *s, const char *group, const char *key, const char *v,
             int64_t min, int64_t max, int64_t *out, GError **errp)
{
    if (!host_parse_duration(v, out)) {
        return fail_at(s, errp, group, key,
                       "'%s' is not a duration (90s, 5m, 1h, 1d)", v);
    }
    if (*out < min || *out > max) {
        return fail_at(s, errp, group, key,
                       "must be %" G_GINT64_FORMAT "s to %" G_GINT64_FORMAT "s",
                       min, max);
    }
    return true;
}

static bool
absolute_path(struct scan *s, const char *group, const char *key, const char *v,
              char **out, GError **errp)
{
    if (!g_path_is_absolute(v)) {
        return fail_at(s, errp, group, key, "'%s' is not an absolute path", v);
    }
    g_free(*out);
    *out = g_strdup(v);
    return true;
}

/* Applies one key of group to vm. */
static bool
apply_key(struct scan *s, GKeyFile *kf, const char *group, const char *key,
          struct host_vm *vm, GError **errp)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *v = g_key_file_get_string(kf, group, key, &err);
    guint i;

    if (!v) {
        return fail_at(s, errp, group, key, "%s", err->message);
    }
    for (i = 0; i < G_N_ELEMENTS(known_keys); i++) {
        if (strcmp(key, known_keys[i]) == 0) {
            break;
        }
    }
    if (i == G_N_ELEMENTS(known_keys)) {
        return fail_at(s, errp, group, key, "unknown key");
    }
    if (strcmp(key, "repo") == 0) {
        return absolute_path(s, group, key, v, &vm->repo, errp);
    }
    if (strcmp(key, "qmp") == 0) {
        return absolute_path(s, group, key, v, &vm->qmp, errp);
    }
    if (strcmp(key, "qga") == 0) {
        return absolute_path(s, group, key, v, &vm->qga, errp);
    }
    if (strcmp(key, "quiesce") == 0) {
        if (strcmp(v, "auto") && strcmp(v, "require") && strcmp(v, "off")) {
            return fail_at(s, errp, group, key,
                           "'%s': must be auto, require or off", v);
        }
        g_free(vm->quiesce);
        vm->quiesce = g_steal_pointer(&v);
        return true;
    }
    if (strcmp(key, "mode") == 0) {
        if (strcmp(v, "auto") && strcmp(v, "push") && strcmp(v, "pull")) {
            return fail_at(s, errp, group, key,
                           "'%s': must be auto, push or pull", v);
        }
        g_free(vm->mode);
        vm->mode = g_steal_pointer(&v);
        return true;
    }
    if (strcmp(key, "scratch") == 0) {
        return absolute_path(s, group, key, v, &vm->scratch, errp);
    }
    if (strcmp(key, "scratch-max") == 0) {
        if (!host_parse_size(v, &vm->scratch_max) ||
            vm->scratch_max < (1 << 20)) {
            return fail_at(s, errp, group, key,
                           "'%s' is not a size of at least 1M", v);
        }
        return true;
    }
    if (strcmp(key, "nice") == 0) {
        char *end;
        long n = strtol(v, &end, 10);
        if (*v == '\0' || *end != '\0' || n < 0 || n > 19) {
            return fail_at(s, errp, group, key,
                           "'%s' is not a nice value from 0 to 19", v);
        }
        vm->nice = (int)n;
        return true;
    }
    if (strcmp(key, "memory") == 0) {
        if (strcmp(v, "on") && strcmp(v, "try") && strcmp(v, "off")) {
            return fail_at(s, errp, group, key, "'%s': must be on, try or off",
                           v);
        }
        g_free(vm->memory);
        vm->memory = g_steal_pointer(&v);
        return true;
    }
    if (strcmp(key, "disks") == 0) {
        g_auto(GStrv) parts = g_strsplit_set(v, " \t,;", -1);
        GPtrArray *d = g_ptr_array_new();

        for (char **p = parts; *p; p++) {
            if (**p) {
                g_ptr_array_add(d, g_strdup(*p));
            }
        }
        g_ptr_array_add(d, NULL);
        g_strfreev(vm->disks);
        vm->disks = (char **)g_ptr_array_free(d, FALSE);
        if (!vm->disks[0]) {
            return fail_at(s, errp, group, key, "names no disk");
        }
        return true;
    }
    if (strcmp(key, "rpo") == 0) {
        return duration_key(s, group, key, v, 1, 366 * 86400, &vm->rpo_s, errp);
    }
    if (strcmp(key, "timeout") == 0) {
        return duration_key(s, group, key, v, 1, 86400, &vm->timeout_s, errp);
    }
    if (strcmp(key, "stall-timeout") == 0) {
        return duration_key(s, group, key, v, 1, 86400, &vm->stall_s, errp);
    }
    if (strcmp(key, "wait") == 0) {
        return duration_key(s, group, key, v, 0, 86400, &vm->wait_s, errp);
    }
    if (strcmp(key, "full") == 0) {
        if (!strcmp(v, "true") || !strcmp(v, "yes")) {
            vm->full = true;
        } else if (!strcmp(v, "false") || !strcmp(v, "no")) {
            vm->full = false;
        } else {
            return fail_at(s, errp, group, key, "'%s': must be true or false",
                           v);
        }
        return true;
    }
    if (strcmp(key, "speed") == 0) {
        if (!host_parse_size(v, &vm->speed)) {
            return fail_at(s, errp, group, key,
                           "'%s' is not a size (bytes per second: 200M, "
                           "1G)",
                           v);
        }
        return true;
    }
    for (int k = 0; k < HOST_KEEP_N; k++) {
        if (strcmp(key, host_keep_names[k]) == 0) {
            char *end;
            long long n;

            errno = 0;
            n = strtoll(v, &end, 10);
            if (errno || *end || end == v || n < 1 || n > 1000000) {
                return fail_at(s, errp, group, key,
                               "'%s': must be a count from 1 to 1000000", v);
            }
            vm->keep[k] = n;
            return true;
        }
    }
    return fail_at(s, errp, group, key, "unknown key");
}

static bool
apply_group(struct scan *s, GKeyFile *kf, const char *group, struct host_vm *vm,
            GError **errp)
{
    g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);

    for (char **k = keys; k && *k; k++) {
        if (!apply_key(s, kf, group, *k, vm, errp)) {
            return false;
        }
    }
    return true;
}

static struct host_vm *
vm_new(const char *name)
{
    struct host_vm *vm = g_new0(struct host_vm, 1);

    vm->name = g_strdup(name);
    for (int k = 0; k < HOST_KEEP_N; k++) {
        vm->keep[k] = -1;
    }
    vm->nice = -1;
    return vm;
}

static struct host_vm *
vm_from(struct scan *s, GKeyFile *kf, const struct host_vm *defaults,
        const char *group, GError **errp)
{
    const char *name = group + strlen(VM_PREFIX);
    struct host_vm *vm = vm_new(name);
    g_autoptr(GError) err = NULL;

    if (!repo_name_valid(name, "VM name", &err)) {
        fail_at(s, errp, group, NULL, "%s", err->message);
        goto fail;
    }
    vm->repo = g_strdup(defaults->repo);
    vm->qmp = g_strdup(defaults->qmp);
    vm->qga = g_strdup(defaults->qga);
    vm->quiesce = g_strdup(defaults->quiesce);
    vm->memory = g_strdup(defaults->memory);
    vm->mode = g_strdup(defaults->mode);
    vm->scratch = g_strdup(defaults->scratch);
    vm->scratch_max = defaults->scratch_max;
    vm->nice = defaults->nice;
    vm->disks = g_strdupv(defaults->disks);
    vm->rpo_s = defaults->rpo_s;
    vm->speed = defaults->speed;
    vm->full = defaults->full;
    vm->timeout_s = defaults->timeout_s;
    vm->stall_s = defaults->stall_s;
    vm->wait_s = defaults->wait_s;
    memcpy(vm->keep, defaults->keep, sizeof(vm->keep));
    if (!apply_group(s, kf, group, vm, errp)) {
        goto fail;
    }
    if (!vm->qmp) {
        fail_at(s, errp, group, "qmp", "not set: a VM needs its QMP socket");
        goto fail;
    }
    if (!vm->repo) {
        fail_at(s, errp, group, "repo",
                "not set here nor in [defaults]: where do points go?");
        goto fail;
    }
    if (vm->mode && strcmp(vm->mode, "pull") == 0 && vm->memory &&
        strcmp(vm->memory, "off") != 0) {
        fail_at(s, errp, group, "memory", "needs mode = push or auto");
        goto fail;
    }
    if (vm->quiesce && strcmp(vm->quiesce, "require") == 0 && !vm->qga) {
        fail_at(s, errp, group, "quiesce", "require needs qga");
        goto fail;
    }
    return vm;
fail:
    host_vm_free(vm);
    return NULL;
}

struct host_config *
host_config_load(const char *path, GError **errp)
{
    g_autofree char *text = NULL;
    gsize len;
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_autoptr(GError) err = NULL;
    g_autoptr(GHashTable) lines =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    g_autoptr(GPtrArray) groups = g_ptr_array_new();
    struct scan s = {path, lines, groups};
    struct host_vm *defaults = vm_new("defaults");
    struct host_config *c = NULL;

    defaults->rpo_s = 86400;
    if (!g_file_get_contents(path, &text, &len, errp)) {
        goto out;
    }
    if (strlen(text) != len) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "%s: contains a NUL byte", path);
        goto out;
    }
    if (!scan_text(&s, text, errp)) {
        goto out;
    }
    if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE, &err)) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED, "%s: %s", path,
                    err->message);
        goto out;
    }
    if (g_key_file_has_group(kf, "defaults") &&
        !apply_group(&s, kf, "defaults", defaults, errp)) {
        goto out;
    }
    c = g_new0(struct host_config, 1);
    c->path = g_strdup(path);
    c->vms = g_ptr_array_new_with_free_func((GDestroyNotify)host_vm_free);
    for (guint i = 0; i < groups->len; i++) {
        const char *g = groups->pdata[i];
        struct host_vm *vm;

        if (strcmp(g, "defaults") == 0) {
            continue;
        }
        if (!g_str_has_prefix(g, VM_PREFIX) || !g[strlen(VM_PREFIX)]) {
            fail_at(&s, errp, g, NULL,
                    "unknown section: [defaults] or [vm NAME]");
            g_clear_pointer(&c, host_config_free);
            goto out;
        }
        vm = vm_from(&s, kf, defaults, g, errp);
        if (!vm) {
            g_clear_pointer(&c, host_config_free);
            goto out;
        }
        g_ptr_array_add(c->vms, vm);
    }
out:
    host_vm_free(defaults);
    return c;
}

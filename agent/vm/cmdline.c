/* Rebuilding a recorded QEMU command line: see cmdline.h. */
#include "agent/vm/cmdline.h"

#include <string.h>

/* Options that take no value (the rest take exactly one). */
static const char *const no_value[] = {"S",
                                       "daemonize",
                                       "nodefaults",
                                       "no-reboot",
                                       "no-shutdown",
                                       "snapshot",
                                       "enable-kvm",
                                       "nographic",
                                       "no-hpet",
                                       "no-acpi",
                                       "no-user-config",
                                       "nodefconfig",
                                       "full-screen",
                                       "version",
                                       "h",
                                       "help",
                                       "s",
                                       "only-migratable",
                                       "enable-fips",
                                       "win2k-hack",
                                       "no-fd-bootchk",
                                       "no-quit",
                                       "preconfig",
                                       "enable-sync-profile",
                                       "no-frame",
                                       "alt-grab",
                                       "ctrl-grab",
                                       "no-kvm",
                                       "old-param",
                                       "semihosting",
                                       "rtc-td-hack",
                                       "no-kvm-irqchip",
                                       "no-kvm-pit",
                                       "no-kvm-pit-reinjection",
                                       "usb",
                                       "singlestep",
                                       NULL};

struct state {
    const struct cmdline_in *in;
    struct cmdline_out *out;
    char *qmp_canon, *qga_canon;
    char *qga_chardev; /* id of the chardev of org.qemu.guest_agent.0 */
    GPtrArray *drop_nodes;
    bool *placed;
    unsigned nsock, nfile;
};

GPtrArray *
cmdline_opts_split(const char *s)
{
    GPtrArray *items = g_ptr_array_new_with_free_func(g_free);
    GString *cur = g_string_new(NULL);

    for (const char *p = s;; p++) {
        if (*p == ',' && p[1] == ',') {
            g_string_append_c(cur, ',');
            p++;
        } else if (*p == ',' || *p == 0) {
            g_ptr_array_add(items, g_string_free(cur, false));
            if (*p == 0) {
                break;
            }
            cur = g_string_new(NULL);
        } else {
            g_string_append_c(cur, *p);
        }
    }
    return items;
}

char *
cmdline_opts_join(GPtrArray *items)
{
    GString *s = g_string_new(NULL);

    for (guint i = 0; i < items->len; i++) {
        const char *it = items->pdata[i];
        if (i) {
            g_string_append_c(s, ',');
        }
        for (; *it; it++) {
            g_string_append_c(s, *it);
            if (*it == ',') {
                g_string_append_c(s, ',');
            }
        }
    }
    return g_string_free(s, false);
}

/* The value of key in items, or NULL. */
static const char *
opt_get(GPtrArray *items, const char *key)
{
    size_t n = strlen(key);

    for (guint i = 0; i < items->len; i++) {
        const char *it = items->pdata[i];
        if (strncmp(it, key, n) == 0 && it[n] == '=') {
            return it + n + 1;
        }
    }
    return NULL;
}

static void
opt_set(GPtrArray *items, const char *key, const char *value)
{
    size_t n = strlen(key);

    for (guint i = 0; i < items->len; i++) {
        char *it = items->pdata[i];
        if (strncmp(it, key, n) == 0 && it[n] == '=') {
            items->pdata[i] = g_strdup_printf("%s=%s", key, value);
            g_free(it);
            return;
        }
    }
    g_ptr_array_add(items, g_strdup_printf("%s=%s", key, value));
}

/* The option's name without its dashes, or NULL for a non-option. */
static const char *
opt_name(const char *arg)
{
    if (arg[0] != '-' || arg[1] == 0) {
        return NULL;
    }
    return arg[1] == '-' ? arg + 2 : arg + 1;
}

static bool
takes_value(const char *name)
{
    for (const char *const *p = no_value; *p; p++) {
        if (strcmp(*p, name) == 0) {
            return false;
        }
    }
    return true;
}

static const struct cmdline_disk *
disk_by_node(struct state *st, const char *node, unsigned *idx)
{
    for (unsigned i = 0; node && i < st->in->ndisks; i++) {
        if (g_strcmp0(st->in->disks[i].node, node) == 0) {
            *idx = i;
            return &st->in->disks[i];
        }
    }
    return NULL;
}

static const struct cmdline_disk *
disk_by_backend(struct state *st, const char *id, unsigned *idx)
{
    for (unsigned i = 0; id && *id && i < st->in->ndisks; i++) {
        if (g_strcmp0(st->in->disks[i].backend, id) == 0) {
            *idx = i;
            return &st->in->disks[i];
        }
    }
    return NULL;
}

static char *
canon(struct state *st, const char *path)
{
    return g_canonicalize_filename(path, st->in->cwd ? st->in->cwd : "/");
}

/* The new path of a unix socket the original listened on or connected to.
 * chardev_id: the chardev's id when known (the agent's is recognised by
 * it). */
static char *
map_socket(struct state *st, const char *path, const char *chardev_id)
{
    g_autofree char *c = canon(st, path);

    if (st->qmp_canon && strcmp(c, st->qmp_canon) == 0 && !st->out->qmp) {
        st->out->qmp = g_build_filename(st->in->dir, "qmp.sock", NULL);
        return g_strdup(st->out->qmp);
    }
    if (!st->out->qga && ((st->qga_canon && strcmp(c, st->qga_canon) == 0) ||
                          (chardev_id && st->qga_chardev &&
                           strcmp(chardev_id, st->qga_chardev) == 0))) {
        st->out->qga = g_build_filename(st->in->dir, "qga.sock", NULL);
        return g_strdup(st->out->qga);
    }
    return g_strdup_printf("%s/sock-%u.sock", st->in->dir, ++st->nsock);
}

static char *
map_file(struct state *st, const char *path)
{
    g_autofree char *base = g_path_get_basename(path);
    return g_strdup_printf("%s/%u-%s", st->in->dir, ++st->nfile, base);
}

/* "-qmp unix:PATH,server=on", "-serial file:PATH", ...: the legacy
 * chardev syntax. */
static char *
map_legacy_chardev(struct state *st, const char *v)
{
    if (g_str_has_prefix(v, "unix:")) {
        const char *path = v + 5, *comma = strchr(path, ',');
        g_autofree char *p =
            comma ? g_strndup(path, (gsize)(comma - path)) : g_strdup(path);
        g_autofree char *np = map_socket(st, p, NULL);
        return g_strdup_printf("unix:%s%s", np, comma ? comma : "");
    }
    if (g_str_has_prefix(v, "file:")) {
        g_autofree char *np = map_file(st, v + 5);
        return g_strdup_printf("file:%s", np);
    }
    return g_strdup(v);
}

static bool
map_chardev(struct state *st, const char *v, char **res, GError **errp)
{
    g_autoptr(GPtrArray) items = cmdline_opts_split(v);
    const char *backend = items->pdata[0];
    const char *path = opt_get(items, "path");
    const char *id = opt_get(items, "id");

    if (opt_get(items, "fd") || opt_get(items, "logfile")) {
        if (opt_get(items, "fd")) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "chardev %s is a file descriptor its manager passed "
                        "(libvirt does): the command line cannot be rebuilt",
                        id ? id : "?");
            return false;
        }
        g_autofree char *nl = map_file(st, opt_get(items, "logfile"));
        opt_set(items, "logfile", nl);
    }
    if (path && strcmp(backend, "socket") == 0) {
        g_autofree char *np = map_socket(st, path, id);
        opt_set(items, "path", np);
    } else if (path &&
               (strcmp(backend, "file") == 0 || strcmp(backend, "pipe") == 0)) {
        g_autofree char *np = map_file(st, path);
        opt_set(items, "path", np);
    }
    *res = cmdline_opts_join(items);
    return true;
}

static char *
map_machine(struct state *st, const char *v)
{
    g_autoptr(GPtrArray) items = cmdline_opts_split(v);
    const char *type = st->in->machine_type;

    if (!type) {
        return g_strdup(v);
    }
    if (items->len && !strchr(items->pdata[0], '=')) {
        g_free(items->pdata[0]);
        items->pdata[0] = g_strdup(type);
    } else if (opt_get(items, "type")) {
        opt_set(items, "type", type);
    } else {
        g_ptr_array_insert(items, 0, g_strdup(type));
    }
    return cmdline_opts_join(items);
}

static char *
new_blockdev(const struct cmdline_disk *d, GPtrArray *keep)
{
    g_autoptr(GPtrArray) items = g_ptr_array_new_with_free_func(g_free);

    g_ptr_array_add(items, g_strdup("driver=qcow2"));
    g_ptr_array_add(items, g_strdup_printf("node-name=%s", d->node));
    g_ptr_array_add(items, g_strdup("file.driver=file"));
    g_ptr_array_add(items, g_strdup_printf("file.filename=%s", d->file));
    for (guint i = 0; keep && i < keep->len; i++) {
        g_ptr_array_add(items, g_strdup(keep->pdata[i]));
    }
    return cmdline_opts_join(items);
}

/* Options of the replaced format node that still mean the same. */
static bool
kept_blockdev_key(const char *key)
{
    return g_str_has_prefix(key, "cache.") || !strcmp(key, "discard") ||
           !strcmp(key, "detect-zeroes");
}

/* -blockdev in JSON or QemuOpts form: the backed-up format node is
 * replaced, its protocol child dropped (a first pass collects them). */
static char *
map_blockdev(struct state *st, const char *v, bool collect)
{
    const struct cmdline_disk *d;
    unsigned idx;

    if (v[0] == '{') {
        json_auto_t *j = json_loads(v, 0, NULL);
        const char *node = json_string_value(json_object_get(j, "node-name"));
        g_autoptr(GPtrArray) keep = g_ptr_array_new_with_free_func(g_free);
        const char *key;
        json_t *val;

        if (!(d = disk_by_node(st, node, &idx))) {
            return g_strdup(v);
        }
        if (collect) {
            const char *file = json_string_value(json_object_get(j, "file"));
            if (file) {
                g_ptr_array_add(st->drop_nodes, g_strdup(file));
            }
            return NULL;
        }
        json_object_foreach(j, key, val)
        {
            if (kept_blockdev_key(key) && json_is_string(val)) {
                g_ptr_array_add(keep, g_strdup_printf("%s=%s", key,
                                                      json_string_value(val)));
            } else if (kept_blockdev_key(key) && json_is_boolean(val)) {
                g_ptr_array_add(
                    keep, g_strdup_printf("%s=%s", key,
                                          json_is_true(val) ? "on" : "off"));
            }
        }
        st->placed[idx] = true;
        return new_blockdev(d, keep);
    } else {
        g_autoptr(GPtrArray) items = cmdline_opts_split(v);
        g_autoptr(GPtrArray) keep = g_ptr_array_new_with_free_func(g_free);

        if (!(d = disk_by_node(st, opt_get(items, "node-name"), &idx))) {
            return g_strdup(v);
        }
        if (collect) {
            const char *file = opt_get(items, "file");
            if (file) {
                g_ptr_array_add(st->drop_nodes, g_strdup(file));
            }
            return NULL;
        }
        for (guint i = 0; i < items->len; i++) {
            g_autofree char *key = g_strdup(items->pdata[i]);
            char *eq = strchr(key, '=');
            if (eq) {
                *eq = 0;
                if (kept_blockdev_key(key)) {
                    g_ptr_array_add(keep, g_strdup(items->pdata[i]));
                }
            }
        }
        st->placed[idx] = true;
        return new_blockdev(d, keep);
    }
}

static char *
blockdev_node(const char *v)
{
    const char *n;

    if (v[0] == '{') {
        json_auto_t *j = json_loads(v, 0, NULL);
        n = json_string_value(json_object_get(j, "node-name"));
        return g_strdup(n ? n : "");
    } else {
        g_autoptr(GPtrArray) items = cmdline_opts_split(v);
        n = opt_get(items, "node-name");
        return g_strdup(n ? n : "");
    }
}

static bool
dropped_node(struct state *st, const char *node)
{
    for (guint i = 0; i < st->drop_nodes->len; i++) {
        if (strcmp(st->drop_nodes->pdata[i], node) == 0) {
            return true;
        }
    }
    return false;
}

/* -drive: the backed-up one (matched by id, its BlockBackend name) runs
 * on the restored image; a writable one nothing replaces is refused, or
 * the new VM would write to the original's image. */
static bool
map_drive(struct state *st, const char *v, char **res, GError **errp)
{
    g_autoptr(GPtrArray) items = cmdline_opts_split(v);
    const char *id = opt_get(items, "id");
    const struct cmdline_disk *d;
    unsigned idx;

    if (!(d = disk_by_backend(st, id, &idx))) {
        const char *ro = opt_get(items, "readonly");
        if (opt_get(items, "file") &&
            g_strcmp0(opt_get(items, "media"), "cdrom") &&
            !(ro && (!strcmp(ro, "on") || !strcmp(ro, "true")))) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "-drive %s: a writable disk this point does not hold",
                        v);
            return false;
        }
        *res = g_strdup(v);
        return true;
    }
    opt_set(items, "file", d->file);
    opt_set(items, "format", "qcow2");
    st->placed[idx] = true;
    *res = cmdline_opts_join(items);
    return true;
}

static void
add(struct cmdline_out *out, const char *a, const char *b)
{
    g_ptr_array_add(out->argv, g_strdup(a));
    if (b) {
        g_ptr_array_add(out->argv, g_strdup(b));
    }
}

static void
first_pass(struct state *st)
{
    char **argv = st->in->argv;

    for (unsigned i = 1; argv[i]; i++) {
        const char *name = opt_name(argv[i]);
        if (!name || !takes_value(name) || !argv[i + 1]) {
            continue;
        }
        if (strcmp(name, "device") == 0) {
            g_autoptr(GPtrArray) items = cmdline_opts_split(argv[i + 1]);
            if (g_strcmp0(opt_get(items, "name"), "org.qemu.guest_agent.0") ==
                    0 &&
                opt_get(items, "chardev") && !st->qga_chardev) {
                st->qga_chardev = g_strdup(opt_get(items, "chardev"));
            }
        } else if (strcmp(name, "blockdev") == 0) {
            g_free(map_blockdev(st, argv[i + 1], true));
        }
        i++;
    }
}

static char *
hotplug_device(json_t *dev)
{
    GString *s = g_string_new(json_string_value(json_object_get(dev, "type")));
    const char *keys[] = {"bus", "addr", "drive", "chardev", "netdev", NULL};

    g_string_append_printf(s, ",id=%s",
                           json_string_value(json_object_get(dev, "id")));
    for (const char **k = keys; *k; k++) {
        const char *v = json_string_value(json_object_get(dev, *k));
        if (v && *v) {
            g_string_append_printf(s, ",%s=%s", *k, v);
        }
    }
    return g_string_free(s, false);
}

static bool
second_pass(struct state *st, GError **errp)
{
    char **argv = st->in->argv;
    struct cmdline_out *out = st->out;
    bool machine = false;

    add(out, argv[0], NULL);
    for (unsigned i = 1; argv[i]; i++) {
        const char *a = argv[i], *name = opt_name(a), *v;
        char *nv = NULL;

        if (!name) {
            add(out, a, NULL); /* a stray word: QEMU takes it as -hda */
            continue;
        }
        if (!takes_value(name)) {
            if (strcmp(name, "daemonize") && strcmp(name, "S")) {
                add(out, a, NULL);
            }
            continue;
        }
        v = argv[++i];
        if (!v) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: no value on the recorded command line", a);
            return false;
        }
        if (!strcmp(name, "pidfile") || !strcmp(name, "incoming") ||
            !strcmp(name, "loadvm")) {
            continue;
        }
        if (!strcmp(name, "add-fd") || g_str_has_prefix(v, "/dev/fdset/")) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s %s: file descriptors its manager passed (libvirt "
                        "does): the command line cannot be rebuilt",
                        a, v);
            return false;
        }
        if (!strcmp(name, "machine") || !strcmp(name, "M")) {
            machine = true;
            nv = map_machine(st, v);
        } else if (!strcmp(name, "qmp") || !strcmp(name, "qmp-pretty") ||
                   !strcmp(name, "monitor") || !strcmp(name, "serial") ||
                   !strcmp(name, "parallel") || !strcmp(name, "debugcon")) {
            nv = map_legacy_chardev(st, v);
        } else if (!strcmp(name, "chardev")) {
            if (!map_chardev(st, v, &nv, errp)) {
                return false;
            }
        } else if (!strcmp(name, "blockdev")) {
            g_autofree char *node = blockdev_node(v);
            if (dropped_node(st, node)) {
                continue;
            }
            nv = map_blockdev(st, v, false);
        } else if (!strcmp(name, "drive")) {
            if (!map_drive(st, v, &nv, errp)) {
                return false;
            }
        } else if (!strcmp(name, "hda") || !strcmp(name, "hdb") ||
                   !strcmp(name, "hdc") || !strcmp(name, "hdd") ||
                   !strcmp(name, "sd") || !strcmp(name, "mtdblock")) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s %s: give the disk a -drive id or a -blockdev "
                        "node name so it can be replaced",
                        a, v);
            return false;
        }
        add(out, a, nv ? nv : v);
        g_free(nv);
    }
    if (!machine && st->in->machine_type) {
        add(out, "-machine", st->in->machine_type);
    }
    for (unsigned k = 0; k < st->in->ndisks; k++) {
        if (!st->placed[k]) {
            /* A disk added at run time (blockdev-add): its node comes back
             * on the command line, for the hot-plugged device below. */
            g_autofree char *bd = new_blockdev(&st->in->disks[k], NULL);
            add(out, "-blockdev", bd);
        }
    }
    if (json_is_array(st->in->hotplugged)) {
        size_t i;
        json_t *dev;
        json_array_foreach(st->in->hotplugged, i, dev)
        {
            g_autofree char *d = hotplug_device(dev);
            add(out, "-device", d);
        }
    }
    if (!out->qmp) {
        g_autofree char *q = NULL;
        out->qmp = g_build_filename(st->in->dir, "qmp.sock", NULL);
        q = g_strdup_printf("unix:%s,server=on,wait=off", out->qmp);
        add(out, "-qmp", q);
    }
    if (st->in->incoming) {
        add(out, "-incoming", "defer");
    }
    g_ptr_array_add(out->argv, NULL);
    return true;
}

bool
cmdline_rebuild(const struct cmdline_in *in, struct cmdline_out *out,
                GError **errp)
{
    struct state st = {.in = in, .out = out};
    bool ok;

    memset(out, 0, sizeof(*out));
    if (!in->argv || !in->argv[0]) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "no recorded command line");
        return false;
    }
    out->argv = g_ptr_array_new_with_free_func(g_free);
    st.qmp_canon = in->qmp_path ? canon(&st, in->qmp_path) : NULL;
    st.qga_canon = in->qga_path ? canon(&st, in->qga_path) : NULL;
    st.drop_nodes = g_ptr_array_new_with_free_func(g_free);
    st.placed = g_new0(bool, in->ndisks + 1);
    first_pass(&st);
    ok = second_pass(&st, errp);
    g_free(st.qmp_canon);
    g_free(st.qga_canon);
    g_free(st.qga_chardev);
    g_free(st.placed);
    g_ptr_array_free(st.drop_nodes, true);
    if (!ok) {
        cmdline_out_fini(out);
    }
    return ok;
}

void
cmdline_out_fini(struct cmdline_out *out)
{
    if (out->argv) {
        g_ptr_array_free(out->argv, true);
    }
    g_free(out->qmp);
    g_free(out->qga);
    memset(out, 0, sizeof(*out));
}

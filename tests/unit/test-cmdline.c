/* Unit tests for agent/vm/cmdline.c: recorded QEMU command lines rebuilt
 * for a restored VM, one table row per behaviour.  Arguments are written
 * as one string with '|' between them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/vm/cmdline.h"

struct row {
    const char *name;
    const char *argv;
    const char *hotplugged; /* JSON or NULL */
    bool incoming;
    const char *want; /* NULL: must fail */
    const char *want_qga;
    const char *err_has;
};

static const struct cmdline_disk disks[] = {
    {"drive0", "", "/r/vd0.qcow2"},
    {"#block123", "ide0", "/r/ide0.qcow2"},
};

static const struct row rows[] = {
    {"/cmdline/blockdev-replaced-child-dropped",
     "qemu|-blockdev|driver=file,filename=d.qcow2,node-name=file0|-blockdev|"
     "driver=qcow2,file=file0,node-name=drive0,discard=unmap|-device|"
     "virtio-blk-pci,drive=drive0,id=vd0",
     NULL, false,
     "qemu|-blockdev|driver=qcow2,node-name=drive0,file.driver=file,file."
     "filename=/r/vd0.qcow2,discard=unmap|-device|virtio-blk-pci,drive=drive0,"
     "id=vd0|-machine|pc-q35-7.2|-blockdev|driver=qcow2,node-name=#block123,"
     "file.driver=file,file.filename=/r/ide0.qcow2|-qmp|unix:/r/qmp.sock,"
     "server=on,wait=off",
     NULL, NULL},
    {"/cmdline/blockdev-json",
     "qemu|-blockdev|{\"driver\":\"file\",\"filename\":\"x\",\"node-name\":"
     "\"f0\"}|-blockdev|{\"driver\":\"qcow2\",\"file\":\"f0\",\"node-name\":"
     "\"drive0\",\"cache\":{\"direct\":true}}|-drive|file=/a,,b.img,id=ide0,"
     "format=raw,if=none",
     NULL, false,
     "qemu|-blockdev|driver=qcow2,node-name=drive0,file.driver=file,file."
     "filename=/r/vd0.qcow2|-drive|file=/r/ide0.qcow2,id=ide0,format=qcow2,"
     "if=none|-machine|pc-q35-7.2|-qmp|unix:/r/qmp.sock,server=on,wait=off",
     NULL, NULL},
    {"/cmdline/sockets-moved-machine-pinned-incoming",
     "qemu|--machine|q35,accel=tcg|-qmp|unix:qbak.qmp,server=on,wait=off|"
     "-qmp|unix:/w/test.qmp,server=on,wait=off|-daemonize|-pidfile|/run/p|-S|"
     "-incoming|tcp:0:4444|-serial|file:console.log|-chardev|socket,path=/w/"
     "q.sock,server=on,wait=off,id=qga0|-device|virtserialport,chardev=qga0,"
     "name=org.qemu.guest_agent.0|-blockdev|node-name=drive0,driver=raw,file="
     "p|-drive|id=ide0,file=x",
     NULL, true,
     "qemu|--machine|pc-q35-7.2,accel=tcg|-qmp|unix:/r/qmp.sock,server=on,"
     "wait=off|-qmp|unix:/r/sock-1.sock,server=on,wait=off|-serial|file:/r/"
     "1-console.log|-chardev|socket,path=/r/"
     "qga.sock,server=on,wait=off,id=qga0|"
     "-device|virtserialport,chardev=qga0,name=org.qemu.guest_agent.0|"
     "-blockdev|driver=qcow2,node-name=drive0,file.driver=file,file.filename=/"
     "r/vd0.qcow2|-drive|id=ide0,file=/r/ide0.qcow2,format=qcow2|-incoming|"
     "defer",
     "/r/qga.sock", NULL},
    {"/cmdline/hotplugged-devices-added",
     "qemu|-M|type=pc,accel=tcg|-blockdev|driver=qcow2,node-name=drive0,file."
     "driver=file,file.filename=a|-drive|id=ide0,file=b",
     "[{\"id\":\"rng0\",\"type\":\"virtio-rng-pci\",\"bus\":\"pcie.0\","
     "\"addr\":\"0x5.0\"}]",
     false,
     "qemu|-M|type=pc-q35-7.2,accel=tcg|-blockdev|driver=qcow2,node-name="
     "drive0,file.driver=file,file.filename=/r/vd0.qcow2|-drive|id=ide0,file=/"
     "r/ide0.qcow2,format=qcow2|-device|virtio-rng-pci,id=rng0,bus=pcie.0,"
     "addr=0x5.0|-qmp|unix:/r/qmp.sock,server=on,wait=off",
     NULL, NULL},
    {"/cmdline/libvirt-fd-refused",
     "qemu|-chardev|socket,id=charmonitor,fd=23,server=on,wait=off", NULL,
     false, NULL, NULL, "libvirt"},
    {"/cmdline/fdset-refused",
     "qemu|-add-fd|set=1,fd=30|-blockdev|driver=file,filename=/dev/fdset/1,"
     "node-name=f",
     NULL, false, NULL, NULL, "libvirt"},
    {"/cmdline/unreplaced-writable-drive-refused",
     "qemu|-drive|file=/other.img,if=virtio", NULL, false, NULL, NULL,
     "does not hold"},
    {"/cmdline/readonly-cdrom-kept",
     "qemu|-drive|file=/iso,media=cdrom|-drive|id=ide0,file=x|-blockdev|"
     "node-name=drive0,driver=raw,file=f",
     NULL, false,
     "qemu|-drive|file=/iso,media=cdrom|-drive|id=ide0,file=/r/ide0.qcow2,"
     "format=qcow2|-blockdev|driver=qcow2,node-name=drive0,file.driver=file,"
     "file.filename=/r/vd0.qcow2|-machine|pc-q35-7.2|-qmp|unix:/r/qmp.sock,"
     "server=on,wait=off",
     NULL, NULL},
    {"/cmdline/legacy-hda-refused", "qemu|-hda|disk.img", NULL, false, NULL,
     NULL, "-drive id"},
};

static char *
join(GPtrArray *argv)
{
    GString *s = g_string_new(NULL);

    for (guint i = 0; i < argv->len && argv->pdata[i]; i++) {
        if (i) {
            g_string_append_c(s, '|');
        }
        g_string_append(s, argv->pdata[i]);
    }
    return g_string_free(s, false);
}

static void
run_row(gconstpointer data)
{
    const struct row *r = data;
    g_auto(GStrv) argv = g_strsplit(r->argv, "|", -1);
    json_t *hp = r->hotplugged ? json_loads(r->hotplugged, 0, NULL) : NULL;
    struct cmdline_in in = {.argv = argv,
                            .cwd = "/w",
                            .machine_type = "pc-q35-7.2",
                            .qmp_path = "/w/qbak.qmp",
                            .qga_path = NULL,
                            .dir = "/r",
                            .disks = disks,
                            .ndisks = 2,
                            .hotplugged = hp,
                            .incoming = r->incoming};
    struct cmdline_out out;
    GError *err = NULL;
    bool ok = cmdline_rebuild(&in, &out, &err);

    if (!r->want) {
        g_assert_false(ok);
        g_assert_nonnull(err);
        g_assert_nonnull(strstr(err->message, r->err_has));
        g_error_free(err);
    } else {
        g_autofree char *got = NULL;
        if (!ok) {
            g_error("%s: %s", r->name, err->message);
        }
        got = join(out.argv);
        g_assert_cmpstr(got, ==, r->want);
        g_assert_null(out.argv->pdata[out.argv->len - 1]);
        g_assert_cmpstr(out.qmp, ==, "/r/qmp.sock");
        g_assert_cmpstr(out.qga, ==, r->want_qga);
        cmdline_out_fini(&out);
    }
    json_decref(hp);
}

static void
test_opts_roundtrip(void)
{
    const char *cases[] = {"a=b,c=d", "file=/x,,y,if=none", "", "x", ",,",
                           NULL};

    for (const char **c = cases; *c; c++) {
        g_autoptr(GPtrArray) items = cmdline_opts_split(*c);
        g_autofree char *back = cmdline_opts_join(items);
        g_assert_cmpstr(back, ==, *c);
    }
    g_autoptr(GPtrArray) it = cmdline_opts_split("file=/a,,b,if=none");
    g_assert_cmpuint(it->len, ==, 2);
    g_assert_cmpstr(it->pdata[0], ==, "file=/a,b");
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/cmdline/opts-escaped-commas-roundtrip",
                    test_opts_roundtrip);
    for (size_t i = 0; i < G_N_ELEMENTS(rows); i++) {
        g_test_add_data_func(rows[i].name, &rows[i], run_row);
    }
    return g_test_run();
}

/* Rebuilding a QEMU command line recorded at backup time (from
 * /proc/PID/cmdline) for a VM restored from a point: the disks point at
 * the restored images, every socket and chardev output file moves into the
 * restore directory (QEMU takes over an existing unix socket, so the
 * original VM's monitor would be stolen), the machine type is pinned, what
 * would detach or preload the process is dropped, hot-plugged devices are
 * added back.  A pure function: no I/O, table-driven unit test in
 * tests/unit/test-cmdline.c. */
#ifndef QBAK_AGENT_VM_CMDLINE_H
#define QBAK_AGENT_VM_CMDLINE_H

#include <glib.h>
#include <jansson.h>
#include <stdbool.h>

/* One restored disk: the format node that was backed up (as in the
 * manifest), the BlockBackend name (-drive id=, "" for -blockdev), and the
 * qcow2 image the new VM runs on. */
struct cmdline_disk {
    const char *node;
    const char *backend;
    const char *file;
};

struct cmdline_in {
    char **argv;              /* recorded, NULL-terminated */
    const char *cwd;          /* the original's, for relative socket paths */
    const char *machine_type; /* pinned (qom-get /machine type), or NULL */
    const char *qmp_path;     /* the monitor qbak used (absolute), or NULL */
    const char *qga_path;     /* the agent socket qbak used, or NULL */
    const char *dir;          /* where the new sockets and files go */
    const struct cmdline_disk *disks;
    unsigned ndisks;
    json_t *hotplugged; /* borrows: [{"id","type","bus","addr","drive"}] */
    bool incoming;      /* add -incoming defer (a point with memory) */
};

struct cmdline_out {
    GPtrArray *argv; /* NULL-terminated, owned strings */
    char *qmp;       /* the new VM's QMP socket */
    char *qga;       /* its guest agent socket, or NULL */
};

/* Returns false with *errp when the command line cannot be rebuilt (fds
 * passed on it, as libvirt does; a disk that is nowhere on it). */
bool cmdline_rebuild(const struct cmdline_in *in, struct cmdline_out *out,
                     GError **errp);
void cmdline_out_fini(struct cmdline_out *out);

/* QemuOpts "a=b,c=d" (",," an escaped comma) split into its items, and
 * back.  Exposed for the unit test. */
GPtrArray *cmdline_opts_split(const char *s);
char *cmdline_opts_join(GPtrArray *items);

#endif

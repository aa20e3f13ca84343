/* Pull mode's state, shared by its QEMU side (backup_pull.c), its NBD
 * export and copy (backup_pull_copy.c) and its recovery
 * (backup_pull_recover.c). */
#ifndef QBAK_AGENT_BACKUP_PULL_INT_H
#define QBAK_AGENT_BACKUP_PULL_INT_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "qmp/batch.h"

#define PULL_MARKER ".pull-pending"

struct pull_disk {
    char *qdev;
    char *scr, *cbw, *acc, *exp_bitmap, *export_id;
    char *pass; /* several disks: the raw node the device sits on (see the
                 * graph at the top of backup_pull.c) */
    char *scratch_path;
    int scratch_fd; /* read-only, to measure the scratch file */
    uint64_t scratch_limit;
    bool scr_added, cbw_added, acc_added, bitmap_added, export_added;
    bool pass_added, pass_on_cbw;
    bool swapped; /* the device is off its own node (on pass or cbw) */
    struct nbd_client *client;
    struct pull_copy *copy;
};

struct pull {
    GPtrArray *disks; /* struct pull_disk *, as b->disks */
    bool multi;       /* several disks: the point goes through pass nodes */
    struct qmp_batch teardown; /* sent, replies awaited (calls non-NULL) */
    bool teardown_on_cbw;      /* false once the pass nodes left the filters */
    bool server_started;
    bool marker;
    /* The NBD server's listening socket, made before the point (a mkdir
     * of a busy file system once took 135 ms after it); -1, NULL once
     * the server has it. */
    int lfd;
    char *sock_dir;
    uint64_t scratch_peak;
};

/* The NBD server's listening socket in a private directory, made before
 * the point; dropped (closed, its name removed) once QEMU has it. */
bool pull_make_listener(struct pull *p, guint n, GError **errp);
void pull_drop_listener(struct pull *p);

#endif

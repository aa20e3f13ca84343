/* Step 3 of removing a point (see prune.h): one layer folded into its
 * parent's file, with the checksums merged alongside. */
#include "agent/prune_int.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/damage.h"
#include "agent/error.h"
#include "agent/recover.h"
#include "io/image_lock.h"
#include "io/qcow2.h"
#include "io/qcow2_sums.h"

static void
merge_progress(void *opaque, uint64_t done)
{
    struct prune_ctx *c = opaque;

    if (++c->progress_calls == 1) {
        recover_crash_point("prune-merging");
    }
}

/* An fsync run by an io_uring worker while the caller goes on (plainly,
 * at the wait, without io_uring). */
struct bg_fsync {
    struct io_uring ring;
    int fd;
    bool have_ring, inflight;
};

static void
bg_fsync_start(struct bg_fsync *b, int fd)
{
    struct io_uring_sqe *sqe;

    b->fd = fd;
    b->inflight = false;
    b->have_ring = io_uring_queue_init(1, &b->ring, 0) == 0;
    if (b->have_ring && (sqe = io_uring_get_sqe(&b->ring)) != NULL) {
        io_uring_prep_fsync(sqe, fd, 0);
        b->inflight = io_uring_submit(&b->ring) == 1;
    }
}

/* Waits for the fsync (fails naming dir/name) and closes the fd. */
static bool
bg_fsync_wait(struct bg_fsync *b, GError **errp, const char *dir,
              const char *name)
{
    int res = 0;

    if (b->inflight) {
        struct io_uring_cqe *cqe;
        int r;

        while ((r = io_uring_wait_cqe(&b->ring, &cqe)) == -EINTR) {
        }
        /* A failed wait cannot tell whether the fsync ran: a failure. */
        res = r < 0 ? r : cqe->res;
        if (r == 0) {
            io_uring_cqe_seen(&b->ring, cqe);
        }
    } else if (fsync(b->fd) < 0) {
        res = -errno;
    }
    if (b->have_ring) {
        io_uring_queue_exit(&b->ring);
    }
    close(b->fd);
    if (res < 0) {
        return qbak_errno(errp, -res, "%s/%s: fsync", dir, name);
    }
    return true;
}

/* Whether fd and dirfd/name are the same file. */
static bool
same_file(int fd, int dirfd, const char *name)
{
    struct stat a, b;

    return fstat(fd, &a) == 0 &&
           fstatat(dirfd, name, &b, AT_SYMLINK_NOFOLLOW) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Step 3 for one disk: C's layer folded into P's file, the merged
 * checksums made C's, P's file renamed over C's layer.  With a group
 * (the doomed points between P and C, oldest first), their layers are
 * folded along with C's, in one pass.  *untouched: a failure left P's
 * file the image it was. */
bool
prune_merge_layer(struct prune_ctx *c, struct prune_dir *p, int pfd,
                  const char *pfile, struct prune_dir *ch, int cfd,
                  const char *cfile, const char *disk, GPtrArray *group,
                  bool *untouched, GError **errp)
{
    unsigned n = group ? group->len + 1 : 1;
    g_autofree char *cpath = g_strdup_printf("%s/%s", ch->id, cfile);
    g_autofree char *sums = g_strdup_printf("%s%s", cfile, QCOW2_SUMS_SUFFIX);
    g_autofree char *sums_tmp = g_strdup_printf("%s.prune", sums);
    g_autofree char *replaced = g_strdup_printf(".replaced-%s", cfile);
    struct qcow2_sums *merged = NULL;
    struct bg_fsync sums_sync;
    struct qcow2_merge_stats stats = {0};
    struct qcow2_reader *chain;
    GError *err = NULL;
    int target;
    bool ok, busy;

    *untouched = true;
    chain = qcow2_reader_open_with_sums(c->r->vm_fd, cpath, errp);
    if (!chain) {
        return false;
    }
    if (qcow2_reader_chain_depth(chain) < n + 1 ||
        !same_file(qcow2_reader_layer_fd(chain, n), pfd, pfile)) {
        qcow2_reader_free(chain);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "%s: its backing file is not %s/%s", cpath, p->id, pfile);
        return false;
    }
    /* A merge of layers of different geometry is not damage: refuse it
     * before io/ would fail it as a bad image. */
    if (qcow2_reader_layer_cluster_bits(chain, 0) !=
            qcow2_reader_layer_cluster_bits(chain, n) ||
        qcow2_reader_layer_virtual_size(chain, 0) !=
            qcow2_reader_layer_virtual_size(chain, n)) {
        qcow2_reader_free(chain);
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                    "point %s, disk %s: cannot merge into point %s: the "
                    "layers differ in cluster size or disk size",
                    ch->id, disk, p->id);
        return false;
    }
    target = openat(pfd, pfile, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (target < 0) {
        qcow2_reader_free(chain);
        return qbak_errno(errp, errno, "%s/%s", p->id, pfile);
    }
    /* A QEMU reading through this file (a live restore) sees its data
     * change under it: QEMU's own image locks keep the two apart. */
    if (!image_lock_writer(target, &busy, errp) || busy) {
        if (busy) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_BUSY,
                        "%s/%s: open in another program (a QEMU), which "
                        "forbids changing it",
                        p->id, pfile);
        }
        close(target);
        qcow2_reader_free(chain);
        return false;
    }
    /* The merged checksums come from the layers' checksum files alone,
     * which the merge does not touch: written now under a temporary name
     * nothing reads, and fsynced while the merge runs (one wait fewer
     * after it).  A crash leaves the temporary file to the next run's
     * merge, which replaces it. */
    merged = qcow2_merge_sums(chain, n);
    unlinkat(cfd, sums_tmp, 0);
    if (merged) {
        bool written =
            qcow2_sums_write_sync(cfd, sums_tmp, merged, false, errp);
        int sfd = written
                      ? openat(cfd, sums_tmp, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
                      : -1;

        qcow2_sums_free(merged);
        if (sfd < 0) {
            if (written) {
                qbak_errno(errp, errno, "%s/%s", ch->id, sums_tmp);
            }
            unlinkat(cfd, sums_tmp, 0);
            close(target);
            qcow2_reader_free(chain);
            return false;
        }
        bg_fsync_start(&sums_sync, sfd);
    }
    ok = qcow2_merge_layers(chain, n, target, NULL, &stats, merge_progress, c,
                            &err);
    qcow2_reader_free(chain);
    close(target); /* the merge made it durable */
    *untouched = !ok && !stats.parent_changed;
    if (merged &&
        !bg_fsync_wait(&sums_sync, ok ? errp : NULL, ch->id, sums_tmp)) {
        unlinkat(cfd, sums_tmp, 0);
        if (ok) {
            return false;
        }
    }
    if (!ok) {
        unlinkat(cfd, sums_tmp, 0);
        if (g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_INVAL)) {
            /* io/ names the guest offset of a cluster that fails its
             * checksum. */
            const char *at = strstr(err->message, "guest offset ");
            int64_t off = at ? (int64_t)g_ascii_strtoull(
                                   at + strlen("guest offset "), NULL, 10)
                             : -1;

            /* Depth 0 is C, the group's points lie below it. */
            struct prune_dir *bad =
                stats.damaged_depth > 0 && group
                    ? group->pdata[group->len - (guint)stats.damaged_depth]
                    : ch;

            damage_mark(c->r, bad->id, disk, off, err->message, "prune", NULL);
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_DAMAGED,
                        "point %s, disk %s: damaged, not merged into point "
                        "%s: %s",
                        bad->id, disk, p->id, err->message);
            g_error_free(err);
        } else {
            g_propagate_prefixed_error(errp, err, "point %s, disk %s: ", p->id,
                                       disk);
        }
        return false;
    }
    c->merged_bytes += stats.data_bytes;
    recover_crash_point("prune-merged");

    /* The merged checksums cover C's clusters with C's own hashes, so
     * they hold for C's layer as much as for the merged file: they go
     * first, and a reader between the two renames checks C right. */
    if (merged) {
        if (renameat(cfd, sums_tmp, cfd, sums) < 0) {
            return qbak_errno(errp, errno, "%s/%s: rename", ch->id, sums);
        }
        if (!prune_fsync_dir(cfd, ch->id, errp)) {
            return false;
        }
    } else if (unlinkat(cfd, sums, 0) == 0) {
        if (!prune_fsync_dir(cfd, ch->id, errp)) {
            return false;
        }
    } else if (errno != ENOENT) {
        return qbak_errno(errp, errno, "%s/%s: unlink", ch->id, sums);
    }
    recover_crash_point("prune-renaming");
    /* C's old layer keeps a name in P's directory, which goes when P's
     * does (prune_finish_removals): the rename then drops a name, not a
     * file, and the old layer's blocks are freed after the prune's last
     * fsync, not in the journal commits that order its steps (on a file
     * system mounted with discard each commit that frees blocks also
     * waits for their discard).  The extra name is harmless at every
     * step: P's directory goes whole, and a rerun after a crash before
     * the rename finds it naming C's layer still, and replaces it.  Best
     * effort: without it the rename frees the old layer. */
    unlinkat(pfd, replaced, 0);
    (void)linkat(cfd, cfile, pfd, replaced, 0);
    if (renameat(pfd, pfile, cfd, cfile) < 0) {
        return qbak_errno(errp, errno, "%s/%s: rename to %s", p->id, pfile,
                          cpath);
    }
    /* C's directory only: should P's old entry survive a power loss
     * too, it is a second name of the merged file, which recovery finds
     * renamed already and the directory's removal unlinks. */
    if (!prune_fsync_dir(cfd, ch->id, errp)) {
        return false;
    }
    recover_crash_point("prune-renamed");
    return true;
}

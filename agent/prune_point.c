/* Removing one restore point, merging its layers into the points that
 * build on them (the merge of a layer itself: prune_merge.c): see prune.h
 * for the steps and why each is safe. */
#include "agent/prune_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/error.h"
#include "agent/recover.h"
#include "io/image_lock.h"
#include "io/qcow2.h"
#include "io/qcow2_sums.h"

#define FILE_MODE 0640

static bool create_marker(int dirfd, const char *name, GError **errp);

static int
open_dir(int dirfd, const char *name, GError **errp)
{
    int fd =
        openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0) {
        qbak_errno(errp, errno, "%s", name);
    }
    return fd;
}

bool
prune_fsync_dir(int fd, const char *what, GError **errp)
{
    if (fsync(fd) < 0) {
        return qbak_errno(errp, errno, "%s: fsync", what);
    }
    return true;
}

static bool
write_all(int fd, const char *buf, size_t len)
{
    size_t off = 0;

    while (off < len) {
        ssize_t n = write(fd, buf + off, len - off);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (n == 0) {
                errno = EIO;
            }
            return false;
        }
        off += (size_t)n;
    }
    return true;
}

/* dirfd/name replaced by j as a whole: a temporary file, fsynced, renamed
 * over it, the directory fsynced (unless sync_dir is false: the caller
 * fsyncs it). */
static bool
write_json(int dirfd, const char *name, json_t *j, bool sync_dir, GError **errp)
{
    g_autofree char *text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
    g_autofree char *tmp = g_strdup_printf("%s.tmp", name);
    int fd;

    unlinkat(dirfd, tmp, 0);
    fd =
        openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
               FILE_MODE);
    if (fd < 0) {
        return qbak_errno(errp, errno, "%s: create", tmp);
    }
    if (!write_all(fd, text, strlen(text)) || !write_all(fd, "\n", 1) ||
        fsync(fd) < 0) {
        int err = errno;
        close(fd);
        unlinkat(dirfd, tmp, 0);
        return qbak_errno(errp, err, "%s: write", tmp);
    }
    close(fd);
    if (renameat(dirfd, tmp, dirfd, name) < 0) {
        int err = errno;
        unlinkat(dirfd, tmp, 0);
        return qbak_errno(errp, err, "%s: rename", name);
    }
    return !sync_dir || prune_fsync_dir(dirfd, name, errp);
}

static bool
write_json_durable(int dirfd, const char *name, json_t *j, GError **errp)
{
    return write_json(dirfd, name, j, true, errp);
}

bool
prune_marker_set(int dirfd, const char *name, bool present, GError **errp)
{
    if (!present) {
        if (unlinkat(dirfd, name, 0) < 0 && errno != ENOENT) {
            return qbak_errno(errp, errno, "%s: unlink", name);
        }
        return prune_fsync_dir(dirfd, name, errp);
    }
    return create_marker(dirfd, name, errp);
}

/* An empty marker file: its directory entry is all it holds, made
 * durable by the directory's fsync. */
static bool
create_marker(int dirfd, const char *name, GError **errp)
{
    int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
                    FILE_MODE);

    if (fd < 0) {
        return qbak_errno(errp, errno, "%s: create", name);
    }
    close(fd);
    return prune_fsync_dir(dirfd, name, errp);
}

json_t *
prune_manifest_disk(json_t *manifest, const char *disk)
{
    size_t i;
    json_t *d;

    json_array_foreach(json_object_get(manifest, "disks"), i, d)
    {
        if (g_strcmp0(json_string_value(json_object_get(d, "disk")), disk) ==
            0) {
            return d;
        }
    }
    return NULL;
}

static const char *
entry_str(json_t *entry, const char *key)
{
    return json_string_value(json_object_get(entry, key));
}

struct prune_dir *
prune_child(struct prune_ctx *c, const struct prune_dir *p, const char *disk,
            const char *file)
{
    g_autofree char *want = g_strdup_printf("../%s/%s", p->id, file);

    for (guint i = 0; i < c->dirs->len; i++) {
        struct prune_dir *q = c->dirs->pdata[i];
        json_t *e;

        if (q->gone || strcmp(q->id, p->id) <= 0) {
            continue;
        }
        e = prune_manifest_disk(q->manifest, disk);
        if (e && g_strcmp0(entry_str(e, "backing"), want) == 0) {
            return q;
        }
    }
    return NULL;
}

/* Whether a point that stays (not delisted) reads disk through x's
 * layer: x itself or a point further up its chain. */
static bool
live(struct prune_ctx *c, struct prune_dir *x, const char *disk)
{
    unsigned steps = 0;

    while (x && steps++ <= c->dirs->len) {
        json_t *e = prune_manifest_disk(x->manifest, disk);

        if (!x->delisted && !x->gone) {
            return true;
        }
        if (!e || !entry_str(e, "file")) {
            return false;
        }
        x = prune_child(c, x, disk, entry_str(e, "file"));
    }
    return false;
}

/* The point id a backing name "../<id>/<file>" names, or NULL. */
static char *
backing_point(const char *backing)
{
    const char *slash;

    if (!backing || !g_str_has_prefix(backing, "../")) {
        return NULL;
    }
    slash = strchr(backing + 3, '/');
    return slash ? g_strndup(backing + 3, (gsize)(slash - backing - 3)) : NULL;
}

/* C's manifest after P's layer of disk became C's: C holds what it held,
 * built on what P was built on. */
static bool
update_manifest(struct prune_dir *p, json_t *pentry, struct prune_dir *ch,
                int cfd, const char *disk, GError **errp)
{
    json_t *m = json_deep_copy(ch->manifest);
    json_t *e = prune_manifest_disk(m, disk);
    const char *cfile = entry_str(e, "file");
    g_autofree char *sums = g_strdup_printf("%s%s", cfile, QCOW2_SUMS_SUFFIX);
    g_autofree char *parent = NULL;
    struct stat st;
    size_t i;
    json_t *d;

    if (json_object_get(pentry, "backing")) {
        json_object_set(e, "backing", json_object_get(pentry, "backing"));
    } else {
        json_object_del(e, "backing");
    }
    if (g_strcmp0(entry_str(pentry, "type"), "full") == 0) {
        json_object_set_new(e, "type", json_string("full"));
    }
    if (json_object_get(pentry, "cluster_size")) {
        json_object_set(e, "cluster_size",
                        json_object_get(pentry, "cluster_size"));
    }
    if (fstatat(cfd, cfile, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        json_object_set_new(e, "bytes_written", json_integer(st.st_size));
    }
    if (faccessat(cfd, sums, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
        json_object_set_new(e, "sums", json_string(sums));
        json_object_set_new(e, "sums_algorithm", json_string("xxh3-64"));
    } else {
        json_object_del(e, "sums");
        json_object_del(e, "sums_algorithm");
    }
    /* The parent is the point an incremental disk builds on, if any. */
    json_array_foreach(json_object_get(m, "disks"), i, d)
    {
        if (!parent) {
            parent = backing_point(entry_str(d, "backing"));
        }
    }
    json_object_set_new(m, "parent",
                        parent ? json_string(parent) : json_null());
    if (!write_json_durable(cfd, MANIFEST_NAME, m, errp)) {
        json_decref(m);
        g_prefix_error(errp, "%s/", ch->id);
        return false;
    }
    json_decref(ch->manifest);
    ch->manifest = m;
    recover_crash_point("prune-manifest");
    return true;
}

/* ch and the points above it whose layers of disk fold into P's file
 * with it: every doomed or delisted one, up to the first point that
 * stays, *kept (NULL when none does: nothing kept reads through them).
 * Empty when ch itself stays. */
static GPtrArray *
fold_group(struct prune_ctx *c, struct prune_dir *ch, const char *disk,
           struct prune_dir **kept)
{
    GPtrArray *group = g_ptr_array_new();
    struct prune_dir *x = ch;
    unsigned steps = 0;

    while (x && (x->delisted || x->doomed) && steps++ <= c->dirs->len) {
        json_t *e = prune_manifest_disk(x->manifest, disk);

        g_ptr_array_add(group, x);
        x = e && entry_str(e, "file")
                ? prune_child(c, x, disk, entry_str(e, "file"))
                : NULL;
    }
    *kept = x && !x->delisted && !x->doomed ? x : NULL;
    return group;
}

/* Which of two names the layer at path (for messages) has for its backing
 * file: 0 for a, 1 for b (a first, should they be equal); -1 (REFUSED) for
 * neither, so that a prune never works on a chain it does not know. */
static int
backing_which(const char *path, const char *named, const char *a, const char *b,
              GError **errp)
{
    if (g_strcmp0(named, a) == 0) {
        return 0;
    }
    if (g_strcmp0(named, b) == 0) {
        return 1;
    }
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_REFUSED,
                "%s: backing file %s is neither %s nor %s", path,
                named ? named : "(none)", a ? a : "(none)", b ? b : "(none)");
    return -1;
}

/* Lists again the points fold_into_kept delisted, after a failure that
 * left every file reading as it did.  Best effort: one left delisted is
 * completed by the next prune. */
static void
relist(struct prune_ctx *c, GPtrArray *delisted)
{
    for (guint i = 0; i < delisted->len; i++) {
        struct prune_dir *x = delisted->pdata[i];
        int fd = open_dir(c->r->vm_fd, x->id, NULL);

        if (fd >= 0 && prune_marker_set(fd, REPO_POINT_PRUNING, false, NULL)) {
            x->delisted = false;
        }
        if (fd >= 0) {
            close(fd);
        }
    }
}

/* The group's points not delisted yet delisted (each added to delisted
 * once its marker exists), their markers made durable together: one wait
 * for the file system's journal instead of one per point (a full and ten
 * incrementals pruned to one: nine waits became one).  Nothing changes
 * before all are durable, so a crash meanwhile leaves some of them
 * delisted and every file as it was: recovery removes those (each alone
 * is a removal it completes, as after a crash between two of the former
 * one-by-one fsyncs), or a failure here relists them all. */
static bool
delist_group(struct prune_ctx *c, GPtrArray *group, GPtrArray *delisted,
             GError **errp)
{
    g_autoptr(GArray) fds = g_array_new(false, false, sizeof(int));
    g_autoptr(GPtrArray) names = g_ptr_array_new();
    bool ok = true;

    for (guint i = 0; i < group->len && ok; i++) {
        struct prune_dir *x = group->pdata[i];
        int xfd, mfd;

        if (x->delisted) {
            continue;
        }
        xfd = open_dir(c->r->vm_fd, x->id, errp);
        if (xfd < 0) {
            ok = false;
            break;
        }
        g_array_append_val(fds, xfd);
        g_ptr_array_add(names, x->id);
        mfd = openat(xfd, REPO_POINT_PRUNING,
                     O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, FILE_MODE);
        if (mfd < 0) {
            ok = qbak_errno(errp, errno, "%s/%s: create", x->id,
                            REPO_POINT_PRUNING);
            break;
        }
        close(mfd);
        x->delisted = true;
        g_ptr_array_add(delisted, x);
    }
    if (ok) {
        ok = repo_fsync_all((const int *)(void *)fds->data,
                            (const char *const *)names->pdata, fds->len,
                            c->r->vm, errp);
    }
    for (guint i = 0; i < fds->len; i++) {
        close(g_array_index(fds, int, i));
    }
    return ok;
}

/* Step 3 for one disk of P when the points above P up to a kept point K
 * all go (a prune to the newest point, say): the group's layers and K's
 * are folded into P's file at once, each cluster written once, and P's
 * file becomes K's layer.  The group's points are delisted first: once
 * P's file holds newer data they no longer read as they did.  After a
 * crash, K's header says whether P's file is K's layer already; before
 * that, the fold is run again (the chain reads the same throughout). */
static bool
fold_into_kept(struct prune_ctx *c, struct prune_dir *p, int pfd,
               json_t *pentry, GPtrArray *group, struct prune_dir *k,
               GError **errp)
{
    const char *disk = entry_str(pentry, "disk");
    const char *pfile = entry_str(pentry, "file");
    struct prune_dir *top = group->pdata[group->len - 1];
    json_t *kentry = prune_manifest_disk(k->manifest, disk);
    const char *kfile = entry_str(kentry, "file");
    const char *tfile =
        entry_str(prune_manifest_disk(top->manifest, disk), "file");
    g_autoptr(GPtrArray) delisted = g_ptr_array_new();
    g_autofree char *kpath = NULL, *kback = NULL;
    struct qcow2_reader *rd;
    int which;
    bool ok = true, untouched = true;
    int kfd;

    if (!kfile || !tfile || !repo_name_valid(kfile, "layer file", errp)) {
        if (errp && !*errp) {
            g_set_error(errp, QBAK_ERROR, QBAK_ERROR_FAILED,
                        "disk %s: no layer file in its manifest", disk);
        }
        g_prefix_error(errp, "point %s: ", kfile ? top->id : k->id);
        return false;
    }
    kpath = g_strdup_printf("%s/%s", k->id, kfile);
    kback = g_strdup_printf("../%s/%s", top->id, tfile);
    if (!delist_group(c, group, delisted, errp)) {
        relist(c, delisted);
        return false;
    }
    if (delisted->len) {
        recover_crash_point("prune-delisted-fold");
    }
    rd = qcow2_reader_open(c->r->vm_fd, kpath, errp);
    if (!rd) {
        relist(c, delisted);
        g_prefix_error(errp, "point %s: ", k->id);
        return false;
    }
    which = backing_which(kpath, qcow2_reader_backing_file(rd), kback,
                          entry_str(pentry, "backing"), errp);
    if (which < 0) {
        qcow2_reader_free(rd);
        relist(c, delisted);
        return false;
    }
    bool folded = which == 1;
    qcow2_reader_free(rd);
    kfd = open_dir(c->r->vm_fd, k->id, errp);
    if (kfd < 0) {
        relist(c, delisted);
        return false;
    }
    if (!folded) {
        ok = prune_merge_layer(c, p, pfd, pfile, k, kfd, kfile, disk, group,
                               &untouched, errp);
        if (!ok && untouched) {
            relist(c, delisted);
        }
    }
    if (ok && g_strcmp0(entry_str(kentry, "backing"), kback) == 0) {
        ok = update_manifest(p, pentry, k, kfd, disk, errp);
    }
    close(kfd);
    return ok;
}

/* Step 3 for one disk of P, from whatever state a crash left. */
static bool
remove_layer(struct prune_ctx *c, struct prune_dir *p, int pfd, json_t *pentry,
             GError **errp)
{
    const char *disk = entry_str(pentry, "disk");
    const char *pfile = entry_str(pentry, "file");
    g_autofree char *pback = NULL;
    struct prune_dir *ch, *kept;
    GPtrArray *group;
    json_t *centry;
    const char *cfile;
    int which;
    g_autofree char *cpath = NULL;
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *rd;
    bool names_p, ok;
    int cfd;

    if (!disk || !pfile || !repo_name_valid(pfile, "layer file", errp)) {
        g_prefix_error(errp, "point %s: ", p->id);
        return false;
    }
    ch = prune_child(c, p, disk, pfile);
    if (!ch) {
        return true; /* nothing builds on this layer: it goes with P */
    }
    group = fold_group(c, ch, disk, &kept);
    if (group->len > 0 && kept != NULL) {
        ok = fold_into_kept(c, p, pfd, pentry, group, kept, errp);
        g_ptr_array_free(group, true);
        return ok;
    }
    g_ptr_array_free(group, true);
    centry = prune_manifest_disk(ch->manifest, disk);
    cfile = entry_str(centry, "file");
    if (!cfile || !repo_name_valid(cfile, "layer file", errp)) {
        g_prefix_error(errp, "point %s: ", ch->id);
        return false;
    }
    cpath = g_strdup_printf("%s/%s", ch->id, cfile);
    pback = g_strdup_printf("../%s/%s", p->id, pfile);
    /* C's header says whether P's file has become C's layer yet. */
    rd = qcow2_reader_open(c->r->vm_fd, cpath, &err);
    if (!rd) {
        if (!live(c, ch, disk)) {
            return true; /* both go; C is delisted already */
        }
        g_propagate_prefixed_error(errp, g_steal_pointer(&err),
                                   "point %s: ", ch->id);
        return false;
    }
    which = backing_which(cpath, qcow2_reader_backing_file(rd), pback,
                          entry_str(pentry, "backing"), errp);
    if (which < 0) {
        qcow2_reader_free(rd);
        return false;
    }
    names_p = which == 0;
    qcow2_reader_free(rd);
    if (names_p && !live(c, ch, disk)) {
        return true; /* nothing kept reads through P's layer */
    }
    cfd = open_dir(c->r->vm_fd, ch->id, errp);
    if (cfd < 0) {
        return false;
    }
    ok = true;
    if (names_p) {
        bool untouched;
        ok = prune_merge_layer(c, p, pfd, pfile, ch, cfd, cfile, disk, NULL,
                               &untouched, errp);
    }
    if (ok && g_strcmp0(entry_str(centry, "backing"), pback) == 0) {
        ok = update_manifest(p, pentry, ch, cfd, disk, errp);
    }
    close(cfd);
    return ok;
}

/* P's layer of entry e is not open in a QEMU (a live restore reading
 * through it, qemu-nbd, ...): removing it would pull it from under that
 * program, and a QEMU started again over the same chain would miss it. */
static bool
check_not_open(struct prune_dir *p, int pfd, json_t *e, GError **errp)
{
    const char *file = entry_str(e, "file");
    bool in_use = false;
    int fd;

    if (!file) {
        return true; /* remove_layer says what is wrong */
    }
    fd = openat(pfd, file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        return true; /* gone already: a crash after its removal */
    }
    if (fd < 0) {
        return qbak_errno(errp, errno, "%s/%s", p->id, file);
    }
    if (!image_lock_in_use(fd, &in_use, errp)) {
        close(fd);
        g_prefix_error(errp, "%s/%s: ", p->id, file);
        return false;
    }
    close(fd);
    if (in_use) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_BUSY,
                    "%s/%s: open in another program (a QEMU); prune again "
                    "once it is closed",
                    p->id, file);
        return false;
    }
    return true;
}

/* Whether removing p's layer of entry e would merge damaged data into a
 * point that stays, or a good layer into a damaged point. */
static bool
check_damage(struct prune_ctx *c, struct prune_dir *p, json_t *e, GError **errp)
{
    const char *disk = entry_str(e, "disk");
    const char *file = entry_str(e, "file");
    struct prune_dir *ch = disk && file ? prune_child(c, p, disk, file) : NULL;
    struct prune_dir *kept, *bad = p->damaged ? p : NULL;
    g_autoptr(GPtrArray) group = NULL;

    if (!ch) {
        return true;
    }
    /* Every layer that would be folded into P's file: ch's, and those of
     * the doomed points above it up to the point that stays. */
    group = fold_group(c, ch, disk, &kept);
    if (group->len > 0) {
        if (!kept) {
            return true; /* nothing kept reads through them: no merge */
        }
        g_ptr_array_add(group, kept);
    } else {
        if (!live(c, ch, disk)) {
            return true;
        }
        g_ptr_array_add(group, ch);
    }
    for (guint i = 0; i < group->len && !bad; i++) {
        struct prune_dir *x = group->pdata[i];
        bad = x->damaged ? x : NULL;
    }
    if (!bad) {
        return true;
    }
    g_set_error(errp, QBAK_ERROR, QBAK_ERROR_DAMAGED,
                "point %s is damaged (%s): not merging %s into %s", bad->id,
                bad->damaged, bad == p ? ch->id : bad->id, p->id);
    return false;
}

bool
prune_journal_write(struct prune_ctx *c, GPtrArray *order, GError **errp)
{
    g_autofree char *now = repo_time_now();
    json_t *points = json_array();
    json_t *j;
    bool ok;

    for (guint k = 0; k < order->len; k++) {
        struct prune_dir *p = order->pdata[k];
        json_t *disks = json_array();
        size_t i;
        json_t *e;

        json_array_foreach(json_object_get(p->manifest, "disks"), i, e)
        {
            const char *file = entry_str(e, "file");
            struct prune_dir *ch =
                file ? prune_child(c, p, entry_str(e, "disk"), file) : NULL;

            json_array_append_new(disks,
                                  json_pack("{s:O?, s:O?, s:s?}", "disk",
                                            json_object_get(e, "disk"), "file",
                                            json_object_get(e, "file"), "into",
                                            ch ? ch->id : NULL));
        }
        json_array_append_new(
            points, json_pack("{s:s, s:o}", "point", p->id, "disks", disks));
    }
    j = json_pack("{s:i, s:s, s:o}", "format", 1, "time", now, "remove",
                  points);
    /* The VM directory's fsync that makes the journal's name durable
     * waits for the first point's delisting and goes in one batch with
     * it (prune_remove_point): one wait fewer.  Recovery needs only the
     * markers (prune_recover completes every delisted point, journal or
     * not), so a crash that keeps the marker and loses the journal's
     * name leaves nothing it cannot complete, and one that keeps the
     * journal alone leaves a plan that changed nothing yet, as before. */
    ok = write_json(c->r->vm_fd, PRUNE_JOURNAL, j, false, errp);
    c->vm_sync_pending = ok;
    json_decref(j);
    return ok;
}

bool
prune_journal_remove(struct repo_vm *r, GError **errp)
{
    if (unlinkat(r->vm_fd, PRUNE_JOURNAL, 0) < 0) {
        if (errno == ENOENT) {
            return true;
        }
        return qbak_errno(errp, errno, "%s", PRUNE_JOURNAL);
    }
    return prune_fsync_dir(r->vm_fd, r->vm, errp);
}

bool
prune_sync_pending(struct prune_ctx *c, GError **errp)
{
    if (!c->vm_sync_pending) {
        return true;
    }
    if (!prune_fsync_dir(c->r->vm_fd, c->r->vm, errp)) {
        return false;
    }
    c->vm_sync_pending = false;
    return true;
}

/* P's marker created, and made durable together with the VM directory
 * when its fsync is pending (the journal's name): one batch. */
static bool
delist_point(struct prune_ctx *c, struct prune_dir *p, int pfd, GError **errp)
{
    int fds[2] = {pfd, c->r->vm_fd};
    const char *names[2] = {p->id, "."};
    int mfd = openat(pfd, REPO_POINT_PRUNING,
                     O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, FILE_MODE);

    if (mfd < 0) {
        return qbak_errno(errp, errno, "%s/%s: create", p->id,
                          REPO_POINT_PRUNING);
    }
    close(mfd);
    if (!repo_fsync_all(fds, names, c->vm_sync_pending ? 2 : 1, c->r->vm,
                        errp)) {
        return false;
    }
    p->delisted = true;
    c->vm_sync_pending = false;
    return true;
}

bool
prune_remove_point(struct prune_ctx *c, struct prune_dir *p, GError **errp)
{
    g_autofree char *pruned = g_strdup_printf(PRUNED_PREFIX "%s", p->id);
    size_t i;
    json_t *e;
    int pfd;

    /* Damage known beforehand refuses the removal before anything
     * changes (during a merge, checksums find it too late for that). */
    json_array_foreach(json_object_get(p->manifest, "disks"), i, e)
    {
        if (!check_damage(c, p, e, errp)) {
            return false;
        }
    }
    pfd = open_dir(c->r->vm_fd, p->id, errp);
    if (pfd < 0) {
        return false;
    }
    json_array_foreach(json_object_get(p->manifest, "disks"), i, e)
    {
        if (!check_not_open(p, pfd, e, errp)) {
            close(pfd);
            return false;
        }
    }
    if (!p->delisted) {
        if (!delist_point(c, p, pfd, errp)) {
            close(pfd);
            return false;
        }
        recover_crash_point("prune-delisted");
    } else if (!prune_sync_pending(c, errp)) {
        close(pfd);
        return false;
    }
    json_array_foreach(json_object_get(p->manifest, "disks"), i, e)
    {
        if (!remove_layer(c, p, pfd, e, errp)) {
            close(pfd);
            return false;
        }
    }
    close(pfd);
    recover_crash_point("prune-removing");
    /* Nothing reads through P's files any more: one rename takes the
     * whole point away, and what is left of it is a leftover anyone may
     * delete. */
    if (renameat(c->r->vm_fd, p->id, c->r->vm_fd, pruned) < 0) {
        return qbak_errno(errp, errno, "%s: rename", p->id);
    }
    /* Not fsynced here (the journal's removal is): should the rename be
     * lost, P comes back delisted with nothing building on it, and
     * recovery removes it again. */
    p->gone = true;
    /* What is left is a leftover (prune_cleanup_removed): its removal
     * need not be durable, and waits for the end of the run
     * (prune_finish_removals) unless the leftovers grow large. */
    if (!prune_defer_removal(c, pruned, errp)) {
        return false;
    }
    recover_crash_point("prune-removed");
    return true;
}

/* qbak verify: see verify.h.
 *
 * Points are taken newest first: opening a point's chain reaches every
 * older layer of it, so each layer is read once, and an older point whose
 * chain was already walked from a newer one takes its findings from the
 * cache instead of opening it again.
 */
#include "agent/verify.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "agent/damage.h"
#include "agent/error.h"
#include "agent/repo.h"
#include "agent/verify_int.h"
#include "io/qcow2.h"

#define RING_ENTRIES 64

struct verify {
    const struct verify_opts *o;
    struct ring ring;
    struct verify_pool *pool;
    struct verify_stats st;
    unsigned good, damaged, unverifiable;
};

/* One VM's walk. */
struct verify_vm {
    struct verify *v;
    struct repo_vm *repo;
    GPtrArray *points;
    /* "point/file" -> struct verify_finding * of the chain from that
     * layer down (structure and data), owned */
    GHashTable *chains;
};

static void
finding_free(struct verify_finding *f)
{
    g_free(f->reason);
    g_free(f);
}

static struct restore_point *
find_point(GPtrArray *points, const char *id)
{
    for (guint k = 0; k < points->len; k++) {
        struct restore_point *p = points->pdata[k];
        if (strcmp(p->id, id) == 0) {
            return p;
        }
    }
    return NULL;
}

/* The point a backing name "../<point>/<file>" refers to, or NULL. */
static char *
backing_point(const char *backing)
{
    const char *slash =
        g_str_has_prefix(backing, "../") ? strchr(backing + 3, '/') : NULL;

    return slash ? g_strndup(backing + 3, (gsize)(slash - backing - 3)) : NULL;
}

/* Whether the reader's layer name is the file of point (by its last two
 * components, however the name was spelled). */
static bool
layer_is(const char *name, const char *point, const char *file)
{
    g_autofree char *base = g_path_get_basename(name);
    g_autofree char *dir = g_path_get_dirname(name);
    g_autofree char *dbase = g_path_get_basename(dir);

    return strcmp(base, file) == 0 && strcmp(dbase, point) == 0;
}

static void
worst(struct verify_finding *into, const struct verify_finding *f)
{
    if (f->state > into->state) {
        verify_finding_set(into, f->state, f->offset, "%s", f->reason);
    }
}

/* Walks the chain of (p, md) as opened in r: checks each layer against
 * its own point's manifest, reads and checks each layer not seen before,
 * and caches every layer's chain finding.  Layers are done bottom up, so a
 * chain's finding is its own layer's combined with the one below. */
static void
walk_chain(struct verify_vm *vv, struct qcow2_reader *r,
           struct restore_point *top, const char *disk,
           struct verify_finding *top_broken)
{
    unsigned depth = qcow2_reader_chain_depth(r);
    g_autoptr(GPtrArray) pts = g_ptr_array_new();
    g_autoptr(GPtrArray) mds = g_ptr_array_new();
    struct verify_finding broken = {VERIFY_GOOD, -1, NULL};
    struct restore_point *p = top;

    /* The manifests' idea of the chain, top down, beside the reader's. */
    for (unsigned k = 0; k < depth && !broken.reason; k++) {
        const struct manifest_disk *md = manifest_disk(p->info, disk);
        g_autofree char *parent = NULL;

        if (!md) {
            verify_finding_set(&broken, VERIFY_DAMAGED, -1,
                               "point %s of the chain has no disk %s", p->id,
                               disk);
            break;
        }
        if (!layer_is(qcow2_reader_layer_name(r, k), p->id, md->file)) {
            verify_finding_set(&broken, VERIFY_DAMAGED, -1,
                               "%s: layer %u is %s, the manifests say %s/%s",
                               top->id, k, qcow2_reader_layer_name(r, k), p->id,
                               md->file);
            break;
        }
        if (qcow2_reader_layer_virtual_size(r, k) != md->virtual_size ||
            (k == 0 && (UINT64_C(1) << qcow2_reader_cluster_bits(r)) !=
                           md->cluster_size)) {
            verify_finding_set(&broken, VERIFY_DAMAGED, -1,
                               "%s/%s: virtual or cluster size differs from "
                               "its manifest",
                               p->id, md->file);
            break;
        }
        g_ptr_array_add(pts, p);
        g_ptr_array_add(mds, (gpointer)md);
        if (md->full != (k + 1 == depth)) {
            verify_finding_set(&broken, VERIFY_DAMAGED, -1,
                               "%s/%s: the manifest says %s, the image has "
                               "%s backing file",
                               p->id, md->file, md->type,
                               md->full ? "a" : "no");
            break;
        }
        if (md->full) {
            break;
        }
        parent = backing_point(md->backing);
        p = parent ? find_point(vv->points, parent) : NULL;
        if (!p) {
            verify_finding_set(&broken, VERIFY_DAMAGED, -1,
                               "point %s of the chain is missing",
                               parent ? parent : md->backing);
            break;
        }
        if (p->damage) {
            verify_finding_set(&broken, VERIFY_DAMAGED, -1,
                               "point %s of the chain is damaged: %s", p->id,
                               p->damage);
            break;
        }
    }
    /* Bottom up: what is below a layer decides its chain too.  A broken
     * structure is charged to the layer where the walk stopped, and to
     * everything above it. */
    struct verify_finding *below = NULL;
    for (guint k = pts->len; k > 0; k--) {
        struct restore_point *lp = pts->pdata[k - 1];
        const struct manifest_disk *md = mds->pdata[k - 1];
        g_autofree char *key = g_strdup_printf("%s/%s", lp->id, md->file);
        struct verify_finding *f = g_hash_table_lookup(vv->chains, key);
        g_autofree char *label = NULL;

        if (f && !(k == pts->len && broken.reason)) {
            below = f;
            continue;
        }
        f = g_new0(struct verify_finding, 1);
        f->offset = -1;
        if (k == pts->len && broken.reason) {
            worst(f, &broken);
        } else {
            label = g_strdup_printf("%s %s %s", vv->repo->vm, lp->id, disk);
            /* Its findings name the layer's file. */
            verify_layer(vv->v->pool, &vv->v->ring, r, k - 1, md->sums != NULL,
                         label, vv->v->o->progress, &vv->v->st, f);
        }
        if (below && below->state > f->state) {
            verify_finding_set(f, below->state, below->offset, "%s",
                               below->reason);
        }
        g_hash_table_replace(vv->chains, g_steal_pointer(&key), f);
        below = f;
    }
    if (pts->len == 0 && broken.reason) {
        /* The top layer itself is not what its manifest says. */
        worst(top_broken, &broken);
    }
    g_free(broken.reason);
}

/* The finding for disk at point p (NULL finding: nothing to check). */
static void
verify_disk(struct verify_vm *vv, struct restore_point *p,
            const struct manifest_disk *md, struct verify_finding *out)
{
    g_autofree char *key = g_strdup_printf("%s/%s", p->id, md->file);
    struct verify_finding *f = g_hash_table_lookup(vv->chains, key);
    g_autoptr(GError) err = NULL;
    struct qcow2_reader *r;

    if (!f) {
        r = qcow2_reader_open_with_sums(vv->repo->vm_fd, key, &err);
        if (!r) {
            /* A bad header or table, a truncated file, a missing backing
             * file: nothing of this chain can be trusted. */
            verify_finding_set(out, VERIFY_DAMAGED, -1, "%s", err->message);
            return;
        }
        walk_chain(vv, r, p, md->disk, out);
        qcow2_reader_free(r);
        f = g_hash_table_lookup(vv->chains, key);
    }
    if (!f) {
        if (out->state == VERIFY_GOOD) {
            verify_finding_set(out, VERIFY_DAMAGED, -1,
                               "%s: the chain does not match its manifests",
                               key);
        }
        return;
    }
    out->state = f->state;
    out->offset = f->offset;
    out->reason = g_strdup(f->reason);
}

static const char *
state_name(enum verify_state s)
{
    return s == VERIFY_GOOD           ? "good"
           : s == VERIFY_UNVERIFIABLE ? "unverifiable"
                                      : "damaged";
}

static json_t *
finding_json(const char *disk, const struct verify_finding *f)
{
    return json_pack("{s:s?, s:s, s:o, s:s?}", "disk", disk, "state",
                     state_name(f->state), "offset",
                     f->offset >= 0 ? json_integer(f->offset) : json_null(),
                     "reason", f->reason);
}

static json_t *
verify_point(struct verify_vm *vv, struct restore_point *p)
{
    const struct verify_opts *o = vv->v->o;
    struct verify_finding pf = {VERIFY_GOOD, -1, NULL};
    const char *bad_disk = NULL;
    json_t *disks = json_array();
    json_t *out;

    if (p->damage) {
        verify_finding_set(&pf, VERIFY_DAMAGED, -1, "%s", p->damage);
        json_array_append_new(disks, finding_json(NULL, &pf));
    }
    for (size_t i = 0; p->info && i < p->info->n_disks; i++) {
        const struct manifest_disk *md = &p->info->disks[i];
        struct verify_finding f = {VERIFY_GOOD, -1, NULL};

        if (o->disk && strcmp(o->disk, md->disk) != 0) {
            continue;
        }
        verify_disk(vv, p, md, &f);
        json_array_append_new(disks, finding_json(md->disk, &f));
        if (f.state > pf.state) {
            bad_disk = md->disk;
            verify_finding_set(&pf, f.state, f.offset, "%s", f.reason);
        }
        g_free(f.reason);
    }
    if (pf.state == VERIFY_DAMAGED) {
        g_autoptr(GError) err = NULL;
        /* Durable, so that the next backup of the disk is full and list
         * shows it, whatever happens to this run's output. */
        if (!damage_mark(vv->repo, p->id, bad_disk, pf.offset, pf.reason,
                         "verify", &err)) {
            g_printerr("qbak verify: %s\n", err->message);
        }
    }
    vv->v->good += pf.state == VERIFY_GOOD;
    vv->v->damaged += pf.state == VERIFY_DAMAGED;
    vv->v->unverifiable += pf.state == VERIFY_UNVERIFIABLE;
    out = json_pack("{s:s, s:s, s:o}", "point", p->id, "state",
                    state_name(pf.state), "disks", disks);
    g_free(pf.reason);
    return out;
}

static bool
point_has_disk(struct restore_point *p, const char *disk)
{
    return !disk || manifest_disk(p->info, disk) || p->damage;
}

static json_t *
verify_vm(struct verify *v, const char *vm, GError **errp)
{
    const struct verify_opts *o = v->o;
    struct verify_vm vv = {.v = v};
    json_t *arr = NULL, *out = NULL;
    bool any = false;

    vv.repo =
        repo_vm_open(o->repo, vm, false, REPO_LOCK_SHARED, o->wait_ms, errp);
    if (!vv.repo || !(vv.points = repo_scan_points(vv.repo, errp))) {
        goto out;
    }
    vv.chains = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                      (GDestroyNotify)finding_free);
    arr = json_array();
    for (guint k = vv.points->len; k > 0; k--) {
        struct restore_point *p = vv.points->pdata[k - 1];
        if ((o->point && strcmp(o->point, p->id) != 0) ||
            !point_has_disk(p, o->disk)) {
            continue;
        }
        any = true;
        json_array_insert_new(arr, 0, verify_point(&vv, p));
    }
    if (!any && (o->point || o->disk)) {
        g_set_error(errp, QBAK_ERROR, QBAK_ERROR_NOT_FOUND,
                    "%s: no point %s%s%s", vm, o->point ? o->point : "",
                    o->disk ? " with disk " : "", o->disk ? o->disk : "");
        goto out;
    }
    out = json_pack("{s:s, s:O}", "vm", vm, "points", arr);
out:
    json_decref(arr);
    if (vv.chains) {
        g_hash_table_destroy(vv.chains);
    }
    if (vv.points) {
        g_ptr_array_free(vv.points, true);
    }
    repo_vm_close(vv.repo);
    return out;
}

static GPtrArray *
vm_names(const char *repo, GError **errp)
{
    GDir *dir = g_dir_open(repo, 0, errp);
    GPtrArray *names;
    const char *name;

    if (!dir) {
        return NULL;
    }
    names = g_ptr_array_new_with_free_func(g_free);
    while ((name = g_dir_read_name(dir))) {
        g_autofree char *path = g_build_filename(repo, name, NULL);
        if (name[0] != '.' && g_file_test(path, G_FILE_TEST_IS_DIR)) {
            g_ptr_array_add(names, g_strdup(name));
        }
    }
    g_dir_close(dir);
    g_ptr_array_sort(names, (GCompareFunc)g_ascii_strcasecmp);
    return names;
}

json_t *
verify_run(const struct verify_opts *o, GError **errp)
{
    struct verify v = {.o = o};
    g_autoptr(GPtrArray) names = NULL;
    json_t *vms = NULL, *result = NULL;
    int busy = 0;
    gint64 start = g_get_monotonic_time();
    int ret;

    if (o->vm) {
        names = g_ptr_array_new_with_free_func(g_free);
        g_ptr_array_add(names, g_strdup(o->vm));
    } else if (!(names = vm_names(o->repo, errp))) {
        return NULL;
    }
    ret = ring_init(&v.ring, RING_ENTRIES);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "io_uring: %s", g_strerror(-ret));
        return NULL;
    }
    v.pool = verify_pool_new();
    vms = json_array();
    for (guint i = 0; i < names->len; i++) {
        g_autoptr(GError) err = NULL;
        json_t *one = verify_vm(&v, names->pdata[i], &err);

        /* Over a whole repository, a VM a backup or prune holds is left
         * for the next run; the others are still verified. */
        if (!one && !o->vm &&
            g_error_matches(err, QBAK_ERROR, QBAK_ERROR_BUSY)) {
            one = json_pack("{s:s, s:b, s:[]}", "vm", names->pdata[i], "busy",
                            true, "points");
            busy++;
        }
        if (!one) {
            g_propagate_error(errp, g_steal_pointer(&err));
            goto out;
        }
        json_array_append_new(vms, one);
    }
    result = json_pack("{s:O, s:i, s:i, s:i, s:i, s:I, s:f, s:f}", "vms", vms,
                       "good", v.good, "damaged", v.damaged, "unverifiable",
                       v.unverifiable, "busy", busy, "bytes_read",
                       (json_int_t)v.st.bytes_read, "duration_s",
                       (double)(g_get_monotonic_time() - start) / 1e6,
                       "checksum_cpu_s", v.st.checksum_cpu_s);
out:
    json_decref(vms);
    ring_fini(&v.ring);
    verify_pool_free(v.pool);
    return result;
}

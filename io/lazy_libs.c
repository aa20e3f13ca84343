/* libguestfs and libnbd, loaded on first use.
 *
 * Linked the usual way, the two pull in some 60 shared libraries (libvirt,
 * GnuTLS, libxml2, Kerberos, ICU, ...) that the dynamic loader maps and
 * relocates before main() on every run: with a cold page cache that is 0.15
 * to 0.3 s here, more than a 1 % incremental backup or the merge of one
 * takes, and 15 MiB of RSS.  Only file-level access (libguestfs) and pull
 * mode (libnbd) need them, so qbak links neither: each function it calls is
 * defined here with the header's own prototype (the compiler checks it
 * against the declaration) and calls the library's function, which the
 * first call loads with dlopen.
 *
 * A new libguestfs or libnbd call fails to link until it gets a line below
 * (the prototype as in the header; unnamed parameters get a name).  The
 * constructors (guestfs_create, nbd_create) fail as the libraries do when
 * the library cannot be loaded; every other call needs a handle from them,
 * so its library is loaded by then. */
#include "io/lazy_libs.h"

#include <dlfcn.h>
#include <guestfs.h>
#include <libnbd.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

struct lazy_lib {
    const char *soname;
    void *handle;
    char error[256];
};

static struct lazy_lib guestfs = {"libguestfs.so.0", NULL, ""};
static struct lazy_lib nbd = {"libnbd.so.0", NULL, ""};

/* The library's symbol, or NULL with lib->error set.  Concurrent first
 * calls may both dlopen: dlopen counts references and returns the same
 * handle, so that is harmless. */
static void *
lazy_sym(struct lazy_lib *lib, const char *name)
{
    void *h = __atomic_load_n(&lib->handle, __ATOMIC_ACQUIRE);
    void *sym;

    if (h == NULL) {
        h = dlopen(lib->soname, RTLD_NOW | RTLD_LOCAL);
        if (h == NULL) {
            snprintf(lib->error, sizeof(lib->error), "cannot load %s: %s",
                     lib->soname, dlerror());
            return NULL;
        }
        __atomic_store_n(&lib->handle, h, __ATOMIC_RELEASE);
    }
    sym = dlsym(h, name);
    if (sym == NULL) {
        snprintf(lib->error, sizeof(lib->error), "%s: no %s", lib->soname,
                 name);
    }
    return sym;
}

static pthread_t preload_thread;
static bool preload_running;

/* Only loads: a failure is left for the first real call to find and
 * report (lazy_sym), so this thread never writes lib->error. */
static void *
preload_main(void *arg)
{
    struct lazy_lib *lib = arg;
    void *h = dlopen(lib->soname, RTLD_NOW | RTLD_LOCAL);
    void *none = NULL;

    if (h && !__atomic_compare_exchange_n(&lib->handle, &none, h, false,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        dlclose(h); /* loaded meanwhile: drop the second reference */
    }
    return NULL;
}

void
lazy_libs_preload_nbd(void)
{
    sigset_t all, old;

    if (preload_running || __atomic_load_n(&nbd.handle, __ATOMIC_ACQUIRE)) {
        return;
    }
    /* Signals stay with the main thread (its handlers set flags it
     * polls): the loader starts with all of them blocked. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    preload_running =
        pthread_create(&preload_thread, NULL, preload_main, &nbd) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void
lazy_libs_preload_wait(void)
{
    if (preload_running) {
        pthread_join(preload_thread, NULL);
        preload_running = false;
    }
}

/* For calls that cannot fail to find their library (see above); should
 * one, it is a broken installation: say so and stop. */
static void *
lazy_must(struct lazy_lib *lib, const char *name)
{
    void *sym = lazy_sym(lib, name);

    if (sym == NULL) {
        fprintf(stderr, "qbak: %s\n", lib->error);
        abort();
    }
    return sym;
}

#define LAZY_PTR(lib, ret, name, params)                                       \
    static ret(*fn_) params;                                                   \
    ret(*f_) params = __atomic_load_n(&fn_, __ATOMIC_ACQUIRE);                 \
    if (f_ == NULL) {                                                          \
        f_ = (ret(*) params)lazy_must(&lib, #name);                            \
        __atomic_store_n(&fn_, f_, __ATOMIC_RELEASE);                          \
    }

#define LAZY_FN(lib, ret, name, params, args)                                  \
    ret name params                                                            \
    {                                                                          \
        LAZY_PTR(lib, ret, name, params)                                       \
        return f_ args;                                                        \
    }

#define LAZY_VOID(lib, name, params, args)                                     \
    void name params                                                           \
    {                                                                          \
        LAZY_PTR(lib, void, name, params)                                      \
        f_ args;                                                               \
    }

guestfs_h *
guestfs_create(void)
{
    guestfs_h *(*f)(void) =
        (guestfs_h * (*)(void)) lazy_sym(&guestfs, "guestfs_create");

    if (f == NULL) {
        fprintf(stderr, "qbak: %s\n", guestfs.error);
        return NULL;
    }
    return f();
}

struct nbd_handle *
nbd_create(void)
{
    struct nbd_handle *(*f)(void) =
        (struct nbd_handle * (*)(void)) lazy_sym(&nbd, "nbd_create");

    return f != NULL ? f() : NULL;
}

const char *
nbd_get_error(void)
{
    const char *(*f)(void) =
        (const char *(*)(void))lazy_sym(&nbd, "nbd_get_error");

    /* Before the library loads, the error is that it did not. */
    return f != NULL ? f() : nbd.error;
}

/* libguestfs */
LAZY_FN(guestfs, int, guestfs_add_drive_opts_argv,
        (guestfs_h * g, const char *filename,
         const struct guestfs_add_drive_opts_argv *optargs),
        (g, filename, optargs))
LAZY_FN(guestfs, char **, guestfs_blkid, (guestfs_h * g, const char *device),
        (g, device))
LAZY_FN(guestfs, int64_t, guestfs_blockdev_getsize64,
        (guestfs_h * g, const char *device), (g, device))
LAZY_VOID(guestfs, guestfs_close, (guestfs_h * g), (g))
LAZY_FN(guestfs, char *, guestfs_dmesg, (guestfs_h * g), (g))
LAZY_FN(guestfs, int, guestfs_download,
        (guestfs_h * g, const char *remotefilename, const char *filename),
        (g, remotefilename, filename))
LAZY_VOID(guestfs, guestfs_free_statns, (struct guestfs_statns * a0), (a0))
LAZY_VOID(guestfs, guestfs_free_statns_list, (struct guestfs_statns_list * a0),
          (a0))
LAZY_FN(guestfs, char **, guestfs_glob_expand_opts_argv,
        (guestfs_h * g, const char *pattern,
         const struct guestfs_glob_expand_opts_argv *optargs),
        (g, pattern, optargs))
LAZY_FN(guestfs, char **, guestfs_inspect_get_mountpoints,
        (guestfs_h * g, const char *root), (g, root))
LAZY_FN(guestfs, char **, guestfs_inspect_os, (guestfs_h * g), (g))
LAZY_FN(guestfs, const char *, guestfs_last_error, (guestfs_h * g), (g))
LAZY_FN(guestfs, int, guestfs_launch, (guestfs_h * g), (g))
LAZY_FN(guestfs, char **, guestfs_list_partitions, (guestfs_h * g), (g))
LAZY_FN(guestfs, char **, guestfs_ls, (guestfs_h * g, const char *directory),
        (g, directory))
LAZY_FN(guestfs, struct guestfs_statns *, guestfs_lstatns,
        (guestfs_h * g, const char *path), (g, path))
LAZY_FN(guestfs, struct guestfs_statns_list *, guestfs_lstatnslist,
        (guestfs_h * g, const char *path, char *const *names), (g, path, names))
LAZY_FN(guestfs, int, guestfs_lvm_set_filter,
        (guestfs_h * g, char *const *devices), (g, devices))
LAZY_FN(guestfs, char **, guestfs_lvs, (guestfs_h * g), (g))
LAZY_FN(guestfs, int, guestfs_mkmountpoint,
        (guestfs_h * g, const char *exemptpath), (g, exemptpath))
LAZY_FN(guestfs, int, guestfs_mount_local_argv,
        (guestfs_h * g, const char *localmountpoint,
         const struct guestfs_mount_local_argv *optargs),
        (g, localmountpoint, optargs))
LAZY_FN(guestfs, int, guestfs_mount_local_run, (guestfs_h * g), (g))
LAZY_FN(guestfs, int, guestfs_mount_options,
        (guestfs_h * g, const char *options, const char *mountable,
         const char *mountpoint),
        (g, options, mountable, mountpoint))
LAZY_FN(guestfs, char *, guestfs_readlink, (guestfs_h * g, const char *path),
        (g, path))
LAZY_FN(guestfs, char *, guestfs_realpath, (guestfs_h * g, const char *path),
        (g, path))
LAZY_FN(guestfs, int, guestfs_set_autosync, (guestfs_h * g, int autosync),
        (g, autosync))
LAZY_VOID(guestfs, guestfs_set_error_handler,
          (guestfs_h * g, guestfs_error_handler_cb cb, void *opaque),
          (g, cb, opaque))
LAZY_FN(guestfs, int, guestfs_set_memsize, (guestfs_h * g, int memsize),
        (g, memsize))
LAZY_FN(guestfs, int, guestfs_shutdown, (guestfs_h * g), (g))
LAZY_FN(guestfs, int, guestfs_umount, (guestfs_h * g, const char *pathordevice),
        (g, pathordevice))
LAZY_FN(guestfs, int, guestfs_umount_all, (guestfs_h * g), (g))
LAZY_FN(guestfs, char *, guestfs_vfs_label,
        (guestfs_h * g, const char *mountable), (g, mountable))
LAZY_FN(guestfs, char *, guestfs_vfs_type,
        (guestfs_h * g, const char *mountable), (g, mountable))

/* libnbd */
LAZY_FN(nbd, int, nbd_add_meta_context,
        (struct nbd_handle * h, const char *name), (h, name))
LAZY_FN(nbd, int64_t, nbd_aio_block_status,
        (struct nbd_handle * h, uint64_t count, uint64_t offset,
         nbd_extent_callback extent_callback,
         nbd_completion_callback completion_callback, uint32_t flags),
        (h, count, offset, extent_callback, completion_callback, flags))
LAZY_FN(nbd, int, nbd_aio_connect_socket, (struct nbd_handle * h, int sock),
        (h, sock))
LAZY_FN(nbd, unsigned, nbd_aio_get_direction, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_get_fd, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_is_closed, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_is_connecting, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_is_dead, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_is_ready, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_notify_read, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_aio_notify_write, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int64_t, nbd_aio_pread,
        (struct nbd_handle * h, void *buf, size_t count, uint64_t offset,
         nbd_completion_callback completion_callback, uint32_t flags),
        (h, buf, count, offset, completion_callback, flags))
LAZY_FN(nbd, int64_t, nbd_aio_pread_structured,
        (struct nbd_handle * h, void *buf, size_t count, uint64_t offset,
         nbd_chunk_callback chunk_callback,
         nbd_completion_callback completion_callback, uint32_t flags),
        (h, buf, count, offset, chunk_callback, completion_callback, flags))
LAZY_FN(nbd, int, nbd_can_df, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_can_meta_context,
        (struct nbd_handle * h, const char *metacontext), (h, metacontext))
LAZY_VOID(nbd, nbd_close, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int64_t, nbd_get_size, (struct nbd_handle * h), (h))
LAZY_FN(nbd, int, nbd_pread,
        (struct nbd_handle * h, void *buf, size_t count, uint64_t offset,
         uint32_t flags),
        (h, buf, count, offset, flags))
LAZY_FN(nbd, int, nbd_set_export_name,
        (struct nbd_handle * h, const char *export_name), (h, export_name))
LAZY_FN(nbd, int, nbd_set_pread_initialize,
        (struct nbd_handle * h, bool request), (h, request))

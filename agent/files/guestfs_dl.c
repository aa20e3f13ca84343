/* libguestfs, loaded on first use instead of linked.
 *
 * Linking libguestfs made every qbak command load 63 shared libraries
 * (libvirt, gnutls, curl, krb5, ICU, ...) and relocate them before main():
 * some 33 ms of CPU per process (perf stat: 49 ms for an empty program
 * linked like qbak, 15 ms without libguestfs), paid by every backup,
 * although only the file-level commands use libguestfs.  Here each
 * function qbak calls is a small stub that resolves the real one in
 * libguestfs.so.0 the first time.  guestfs_create() comes first in every
 * use: it returns NULL (no handle) when the library cannot be loaded, and
 * its callers already report that; the others are only reached with a
 * handle, so the library is there. */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include <guestfs.h>

#define GUESTFS_SONAME "libguestfs.so.0"

static void *
guestfs_dl_sym(const char *name, bool may_fail)
{
    static void *lib;
    void *sym;

    if (!lib) {
        lib = dlopen(GUESTFS_SONAME, RTLD_NOW | RTLD_LOCAL);
    }
    sym = lib ? dlsym(lib, name) : NULL;
    if (!sym && !may_fail) {
        /* Not reachable without a handle from guestfs_create(). */
        fprintf(stderr, "qbak: %s: %s\n", name, dlerror());
        abort();
    }
    return sym;
}

/* One stub: the real function, found once and kept. */
#define STUB(ret, name, params, args)                                          \
    ret name params                                                            \
    {                                                                          \
        static ret(*fn) params;                                                \
        if (!fn) {                                                             \
            fn = (ret(*) params)guestfs_dl_sym(#name, false);                  \
        }                                                                      \
        return fn args;                                                        \
    }
#define VSTUB(name, params, args)                                              \
    void name params                                                           \
    {                                                                          \
        static void(*fn) params;                                               \
        if (!fn) {                                                             \
            fn = (void(*) params)guestfs_dl_sym(#name, false);                 \
        }                                                                      \
        fn args;                                                               \
    }

guestfs_h *
guestfs_create(void)
{
    static guestfs_h *(*fn)(void);

    if (!fn) {
        fn = (guestfs_h * (*)(void)) guestfs_dl_sym("guestfs_create", true);
    }
    return fn ? fn() : NULL;
}

/* clang-format off */
VSTUB(guestfs_close, (guestfs_h *g), (g))
STUB(const char *, guestfs_last_error, (guestfs_h *g), (g))
VSTUB(guestfs_set_error_handler,
      (guestfs_h *g, guestfs_error_handler_cb cb, void *opaque), (g, cb, opaque))
STUB(int, guestfs_set_autosync, (guestfs_h *g, int a), (g, a))
STUB(int, guestfs_set_memsize, (guestfs_h *g, int m), (g, m))
STUB(int, guestfs_add_drive_opts_argv,
     (guestfs_h *g, const char *f, const struct guestfs_add_drive_opts_argv *o),
     (g, f, o))
STUB(int, guestfs_launch, (guestfs_h *g), (g))
STUB(int, guestfs_shutdown, (guestfs_h *g), (g))
STUB(int64_t, guestfs_blockdev_getsize64, (guestfs_h *g, const char *d), (g, d))
STUB(int, guestfs_download, (guestfs_h *g, const char *r, const char *f),
     (g, r, f))
STUB(int, guestfs_find0, (guestfs_h *g, const char *d, const char *f),
     (g, d, f))
VSTUB(guestfs_free_statns, (struct guestfs_statns *s), (s))
VSTUB(guestfs_free_statns_list, (struct guestfs_statns_list *s), (s))
STUB(char **, guestfs_inspect_get_mountpoints, (guestfs_h *g, const char *r),
     (g, r))
STUB(char **, guestfs_inspect_os, (guestfs_h *g), (g))
STUB(char **, guestfs_list_devices, (guestfs_h *g), (g))
STUB(char **, guestfs_list_partitions, (guestfs_h *g), (g))
STUB(char **, guestfs_ls, (guestfs_h *g, const char *d), (g, d))
STUB(struct guestfs_statns *, guestfs_lstatns, (guestfs_h *g, const char *p),
     (g, p))
STUB(struct guestfs_statns_list *, guestfs_lstatnslist,
     (guestfs_h *g, const char *p, char *const *n), (g, p, n))
STUB(int, guestfs_lvm_set_filter, (guestfs_h *g, char *const *d), (g, d))
STUB(char **, guestfs_lvs, (guestfs_h *g), (g))
STUB(int, guestfs_mount_local_argv,
     (guestfs_h *g, const char *m, const struct guestfs_mount_local_argv *o),
     (g, m, o))
STUB(int, guestfs_mount_local_run, (guestfs_h *g), (g))
STUB(int, guestfs_mount_options,
     (guestfs_h *g, const char *o, const char *m, const char *p), (g, o, m, p))
STUB(char *, guestfs_readlink, (guestfs_h *g, const char *p), (g, p))
STUB(char *, guestfs_realpath, (guestfs_h *g, const char *p), (g, p))
STUB(struct guestfs_statns *, guestfs_statns, (guestfs_h *g, const char *p),
     (g, p))
STUB(int, guestfs_umount_opts_argv,
     (guestfs_h *g, const char *p, const struct guestfs_umount_opts_argv *o),
     (g, p, o))
STUB(char *, guestfs_vfs_label, (guestfs_h *g, const char *m), (g, m))
STUB(char *, guestfs_vfs_type, (guestfs_h *g, const char *m), (g, m))
/* clang-format on */

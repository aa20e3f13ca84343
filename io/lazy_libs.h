/* libguestfs and libnbd are loaded on first use (io/lazy_libs.c).
 *
 * With a cold page cache, loading libnbd (and the GnuTLS, libxml2, ICU and
 * libstdc++ it pulls in) took 90 ms at the first NBD connection of a pull
 * backup (strace -T), about half of a small incremental's whole data
 * phase.  lazy_libs_preload_nbd() loads it on a thread of its own, so the
 * load overlaps the backup's set-up (QMP round trips, fsyncs); the first
 * libnbd call then finds it loaded, or waits for the load in progress.
 * lazy_libs_preload_wait() joins that thread (call it before exit). */
#ifndef QBAK_IO_LAZY_LIBS_H
#define QBAK_IO_LAZY_LIBS_H

void lazy_libs_preload_nbd(void);
void lazy_libs_preload_wait(void);

#endif

/* qbak's error domain: failures a caller (or a scheduler, through the exit
 * status) can act on.  Errors of other domains are plain failures.
 * Convention above io/: GError **errp last, set only on failure, context
 * added with g_prefix_error() on the way up, reported once at the top. */
#ifndef QBAK_AGENT_ERROR_H
#define QBAK_AGENT_ERROR_H

#include <glib.h>
#include <stdbool.h>

#define QBAK_ERROR (qbak_error_quark())
GQuark qbak_error_quark(void);

enum qbak_error {
    QBAK_ERROR_FAILED,    /* anything else */
    QBAK_ERROR_BUSY,      /* a lock is held by another qbak: try again */
    QBAK_ERROR_DAMAGED,   /* stored data does not verify (exit 1) */
    QBAK_ERROR_NOT_FOUND, /* no such VM, point, disk or file */
    QBAK_ERROR_REFUSED,   /* the request is refused as unsafe */
};

/* Sets a G_FILE_ERROR for errno value err: "<what>: <strerror>", what
 * formatted from fmt.  Always returns false ("return qbak_errno(...)"). */
bool qbak_errno(GError **errp, int err, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);

#endif

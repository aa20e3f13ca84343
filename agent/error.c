/* qbak's error domain: see error.h. */
#include "agent/error.h"

#include <stdarg.h>

G_DEFINE_QUARK(qbak - error - quark, qbak_error)

bool
qbak_errno(GError **errp, int err, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *what = NULL;

    va_start(ap, fmt);
    what = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err), "%s: %s",
                what, g_strerror(err));
    return false;
}

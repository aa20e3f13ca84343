/* libFuzzer target: the appliance kernel log scanner
 * (agent/files/kmsg.c).  The log quotes guest file names and guest
 * file-system contents, so every byte of it may be the guest's choice.
 *
 * Oracles: no crash, leak or overlong loop; a line found is valid UTF-8
 * without control characters; the stamp never goes back; read again from
 * where the first read ended, the same log reports nothing new.
 */
#include <glib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/files/kmsg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    double after = -1, before;
    char *found = files_kmsg_first_error((const char *)data, size, &after);

    if (found) {
        if (!g_utf8_validate(found, -1, NULL)) {
            abort();
        }
        for (const char *p = found; *p; p = g_utf8_next_char(p)) {
            if (g_unichar_iscntrl(g_utf8_get_char(p))) {
                abort();
            }
        }
        free(found);
    }
    if (after < -1) {
        abort();
    }
    before = after;
    found = files_kmsg_first_error((const char *)data, size, &after);
    if (found || after != before) {
        abort();
    }
    return 0;
}

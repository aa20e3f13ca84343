/* Kernel log lines that report damage: see kmsg.h. */
#include "agent/files/kmsg.h"

#include <glib.h>
#include <string.h>

#include "agent/files/names.h"

/* What the file systems libguestfs reads, and the block layer, print when
 * they meet damage (both words of a pair in one line).  Warnings are left
 * out: ext4 warns of things e2fsck tidies that lose nothing. */
static const char *const markers[][2] = {
    {"EXT4-fs error", NULL},
    {"EXT3-fs error", NULL},
    {"EXT2-fs error", NULL},
    {"XFS (", "orruption"},
    {"XFS (", "metadata I/O error"},
    {"XFS (", "CRC error"},
    {"BTRFS error", NULL},
    {"BTRFS critical", NULL},
    {"FAT-fs (", "error"},
    {"SQUASHFS error", NULL},
    {"I/O error", NULL},
};

static bool
damage_line(const char *line)
{
    for (size_t i = 0; i < G_N_ELEMENTS(markers); i++) {
        const char *at = strstr(line, markers[i][0]);

        if (at && (!markers[i][1] ||
                   strstr(at + strlen(markers[i][0]), markers[i][1]))) {
            return true;
        }
    }
    return false;
}

/* The stamp of "[   17.080526] ...", or -1 (a line without one). */
static double
stamp(const char *line, const char **msg)
{
    char *end;
    double t;

    *msg = line;
    if (line[0] != '[') {
        return -1;
    }
    t = g_ascii_strtod(line + 1, &end);
    if (end == line + 1 || end[0] != ']') {
        return -1;
    }
    *msg = end[1] == ' ' ? end + 2 : end + 1;
    return t;
}

char *
files_kmsg_first_error(const char *text, size_t len, double *after)
{
    char *found = NULL;
    double last = *after;
    bool fresh = false; /* the current line is later than *after */
    size_t pos = 0;

    while (pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        g_autofree char *line = g_strndup(text + pos, n);
        const char *msg;
        double t = stamp(line, &msg);

        pos += n + 1;
        if (t >= 0) {
            fresh = t > *after;
            last = MAX(last, t);
        }
        if (fresh && !found && damage_line(msg)) {
            found = files_name_printable(msg, strlen(msg));
        }
    }
    *after = last;
    return found;
}

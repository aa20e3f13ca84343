/* libFuzzer target: names and paths that come out of a guest file system
 * (agent/files/names.c), where every byte is the guest's choice.
 *
 * The input is a path.  Oracles:
 * - files_path_split() accepts only components that are 1-255 bytes, not
 *   "." or "..", without '/', NUL or control characters;
 * - creating what it accepts (directories, then a file) relative to a
 *   scratch directory fd with O_NOFOLLOW|O_EXCL, as qbak get does, lands
 *   inside the scratch directory (checked through /proc/self/fd);
 * - files_name_utf8() returns valid UTF-8, and valid UTF-8 input without
 *   backslashes comes back unchanged;
 * - files_name_printable() returns valid UTF-8 with no control character;
 * - files_glob_quote() makes a pattern that fnmatch() matches against the
 *   path itself (up to its first NUL), with every brace-expansion
 *   character ({ } ,) escaped, so a guest directory name can neither
 *   widen nor split the glob that lists its children.
 */
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <glib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/files/names.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *scratch;

static void
check_created_inside(char **parts)
{
    int fd = open(scratch, O_RDONLY | O_DIRECTORY);
    guint n = g_strv_length(parts);
    char link[64], where[8192];
    ssize_t len;

    if (fd < 0) {
        abort();
    }
    for (guint i = 0; i + 1 < n; i++) {
        int next;
        if (mkdirat(fd, parts[i], 0700) < 0 && errno != EEXIST) {
            if (errno == ENAMETOOLONG || errno == ENOSPC) {
                close(fd);
                return;
            }
            abort();
        }
        next = openat(fd, parts[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
        close(fd);
        if (next < 0) {
            return; /* e.g. a file made by an earlier input */
        }
        fd = next;
    }
    {
        int f = openat(fd, parts[n - 1], O_WRONLY | O_CREAT | O_NOFOLLOW, 0600);
        if (f >= 0) {
            snprintf(link, sizeof(link), "/proc/self/fd/%d", f);
            len = readlink(link, where, sizeof(where) - 1);
            if (len > 0) {
                where[len] = 0;
                if (strncmp(where, scratch, strlen(scratch)) != 0 ||
                    where[strlen(scratch)] != '/') {
                    fprintf(stderr, "created outside: %s\n", where);
                    abort();
                }
            }
            close(f);
        }
    }
    close(fd);
}

static void
wipe(const char *dir)
{
    g_autofree char *cmd = g_strdup_printf("rm -rf '%s'/*", dir);
    if (system(cmd) != 0) {
        /* nothing to do: the next run starts from what is left */
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = (const char *)data;
    const char *why = NULL;
    char **parts;
    static unsigned runs;

    if (!scratch) {
        scratch = g_dir_make_tmp("fuzz-guest-names-XXXXXX", NULL);
        if (!scratch) {
            abort();
        }
    }
    parts = files_path_split(path, size, 64, &why);
    if (parts) {
        for (char **p = parts; *p; p++) {
            size_t n = strlen(*p);
            if (n == 0 || n > FILES_NAME_MAX || strcmp(*p, ".") == 0 ||
                strcmp(*p, "..") == 0 || strchr(*p, '/')) {
                abort();
            }
            for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char)(*p)[i];
                if (c < 0x20 || c == 0x7f) {
                    abort();
                }
            }
        }
        check_created_inside(parts);
        g_strfreev(parts);
    } else if (!why) {
        abort();
    }
    {
        g_autofree char *u = files_name_utf8(path, size);
        g_autofree char *pr = files_name_printable(path, size);
        if (!g_utf8_validate(u, -1, NULL) || !g_utf8_validate(pr, -1, NULL)) {
            abort();
        }
        if (g_utf8_validate(path, (gssize)size, NULL) &&
            !memchr(path, '\\', size) &&
            (strlen(u) != size || memcmp(u, path, size) != 0)) {
            abort();
        }
        for (const char *q = pr; *q; q++) {
            if ((unsigned char)*q < 0x20 || *q == 0x7f) {
                abort();
            }
        }
    }
    {
        size_t n = strnlen(path, size);
        g_autoptr(GString) pat = g_string_new(NULL);
        g_autofree char *lit = g_strndup(path, n);
        bool esc = false;

        files_glob_quote(pat, path, n);
        if (fnmatch(pat->str, lit, 0) != 0) {
            abort();
        }
        for (const char *q = pat->str; *q; q++) {
            if (!esc && strchr("{},*?[]", *q)) {
                abort(); /* a special character left unescaped */
            }
            esc = !esc && *q == '\\';
        }
    }
    if (++runs % 1000 == 0) {
        wipe(scratch);
    }
    return 0;
}

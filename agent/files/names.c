/* Guest names: see names.h. */
#include "agent/files/names.h"

#include <glib.h>
#include <string.h>

const char *
files_name_unsafe(const char *name, size_t len)
{
    if (len == 0) {
        return "empty name";
    }
    if (len > FILES_NAME_MAX) {
        return "name too long";
    }
    if ((len == 1 && name[0] == '.') ||
        (len == 2 && name[0] == '.' && name[1] == '.')) {
        return "'.' or '..'";
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c == '/') {
            return "'/' in a name";
        }
        if (c == 0) {
            return "NUL in a name";
        }
        if (c < 0x20 || c == 0x7f) {
            return "control character in a name";
        }
    }
    return NULL;
}

char **
files_path_split(const char *path, size_t len, unsigned max_depth,
                 const char **why)
{
    GPtrArray *parts = g_ptr_array_new_with_free_func(g_free);
    size_t i = 0;

    *why = NULL;
    if (memchr(path, 0, len)) {
        *why = "NUL in a path";
        goto fail;
    }
    while (i < len) {
        size_t start;
        const char *bad;

        if (path[i] == '/') {
            i++;
            continue;
        }
        start = i;
        while (i < len && path[i] != '/') {
            i++;
        }
        bad = files_name_unsafe(path + start, i - start);
        if (bad) {
            *why = bad;
            goto fail;
        }
        if (parts->len >= max_depth) {
            *why = "path too deep";
            goto fail;
        }
        g_ptr_array_add(parts, g_strndup(path + start, i - start));
    }
    if (parts->len == 0) {
        *why = "empty path";
        goto fail;
    }
    g_ptr_array_add(parts, NULL);
    return (char **)g_ptr_array_free(parts, false);
fail:
    g_ptr_array_free(parts, true);
    return NULL;
}

char *
files_name_utf8(const char *name, size_t len)
{
    GString *s;
    const char *p = name, *end = name + len;

    if (g_utf8_validate(name, (gssize)len, NULL)) {
        return g_strndup(name, len);
    }
    s = g_string_sized_new(len + 16);
    while (p < end) {
        const char *valid_end;
        if (g_utf8_validate(p, end - p, &valid_end)) {
            valid_end = end;
        }
        for (const char *q = p; q < valid_end; q++) {
            if (*q == '\\') {
                g_string_append(s, "\\\\");
            } else {
                g_string_append_c(s, *q);
            }
        }
        p = valid_end;
        if (p < end) {
            g_string_append_printf(s, "\\x%02x", (unsigned char)*p);
            p++;
        }
    }
    return g_string_free(s, false);
}

char *
files_name_printable(const char *name, size_t len)
{
    GString *s = g_string_sized_new(len + 8);
    const char *p = name, *end = name + len;

    while (p < end) {
        unsigned char c = (unsigned char)*p;
        gunichar u;

        if (c >= 0x80) {
            u = g_utf8_get_char_validated(p, end - p);
            if (u != (gunichar)-1 && u != (gunichar)-2 &&
                g_unichar_isprint(u)) {
                const char *next = g_utf8_next_char(p);
                g_string_append_len(s, p, next - p);
                p = next;
                continue;
            }
            g_string_append_printf(s, "\\x%02x", c);
        } else if (c == '\\') {
            g_string_append(s, "\\\\");
        } else if (c == '\n') {
            g_string_append(s, "\\n");
        } else if (c == '\t') {
            g_string_append(s, "\\t");
        } else if (c < 0x20 || c == 0x7f) {
            g_string_append_printf(s, "\\x%02x", c);
        } else {
            g_string_append_c(s, (char)c);
        }
        p++;
    }
    return g_string_free(s, false);
}

void
files_glob_quote(GString *pattern, const char *path, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (path[i] && strchr("\\*?[]{},", path[i])) {
            g_string_append_c(pattern, '\\');
        }
        g_string_append_c(pattern, path[i]);
    }
}

char *
files_drive_name(unsigned index)
{
    char letters[8]; /* 26^7 > UINT_MAX */
    size_t n = sizeof(letters);
    long k = index;

    /* bijective base 26: a..z, then aa..zz, aaa ... */
    do {
        letters[--n] = (char)('a' + k % 26);
        k = k / 26 - 1;
    } while (k >= 0);
    return g_strdup_printf("/dev/sd%.*s", (int)(sizeof(letters) - n),
                           letters + n);
}

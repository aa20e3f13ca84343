/* Names that come out of a guest file system are untrusted bytes: these
 * pure functions decide which may become a file on the host and how a
 * name is shown.  No I/O here, so they are fuzzed (tests/fuzz/
 * fuzz-guest-names.c). */
#ifndef QBAK_AGENT_FILES_NAMES_H
#define QBAK_AGENT_FILES_NAMES_H

#include <glib.h>
#include <stdbool.h>
#include <stddef.h>

/* The longest name component qbak creates on the host (NAME_MAX). */
#define FILES_NAME_MAX 255

/* NULL when the len bytes at name are safe as one component created
 * relative to a directory fd: not empty, not "." or "..", no '/' or NUL,
 * no control character (bytes below 0x20 and 0x7f), at most
 * FILES_NAME_MAX bytes.  Otherwise a static phrase saying why not. */
const char *files_name_unsafe(const char *name, size_t len);

/* Splits a guest path ("a/b/c" or "/a/b/c") into components, each checked
 * with files_name_unsafe().  Returns a NULL-terminated vector (g_strfreev)
 * or NULL, with *why set, when any component is unsafe or the path is
 * empty or has more than max_depth components. */
char **files_path_split(const char *path, size_t len, unsigned max_depth,
                        const char **why);

/* The name as valid UTF-8 for JSON: bytes that are not valid UTF-8 are
 * written as \xNN (and a backslash as \\ only then, so valid names
 * stay as they are). */
char *files_name_utf8(const char *name, size_t len);

/* The name for a terminal: printable ASCII and valid UTF-8 as they are,
 * control characters, backslash and invalid bytes escaped (\n, \t, \\,
 * \xNN), so a guest name cannot move the cursor or fake a line. */
char *files_name_printable(const char *name, size_t len);

/* Appends the len bytes of a guest path to a glob(3) pattern (GLOB_BRACE)
 * so that it matches only itself: every character glob or its brace
 * expansion treats specially (\\ * ? [ ] { } ,) gets a backslash. */
void files_glob_quote(GString *pattern, const char *path, size_t len);

/* The appliance's device of the drive added index-th (from 0): /dev/sda
 * ... /dev/sdz, /dev/sdaa ... (guestfs(3), BLOCK DEVICE NAMING: the
 * order the drives were added, the kernel's sd naming). */
char *files_drive_name(unsigned index);

#endif

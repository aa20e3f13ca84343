/* The appliance kernel's word on damage: a file system that skips what it
 * cannot read (ext4 drops a directory block that fails its checksum and
 * lists the rest) leaves no trace in what the calls return, only in the
 * kernel log. */
#ifndef QBAK_AGENT_FILES_KMSG_H
#define QBAK_AGENT_FILES_KMSG_H

#include <stddef.h>

/* The first line of the kernel log text[0, len) stamped later than
 * *after that reports a damaged file system or a read error, without its
 * timestamp, as printable UTF-8; NULL when none does.  *after becomes the
 * log's last stamp (a log read again later starts where this one ended,
 * even once its ring buffer has wrapped). */
char *files_kmsg_first_error(const char *text, size_t len, double *after);

#endif

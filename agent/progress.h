/* Progress on a terminal: one line on stderr, redrawn at most twice a
 * second, with per item (disk) bytes done of total, the rate and the time
 * left.  backup, restore and run use it; nothing is drawn unless the
 * caller asked for it (cli_progress_wanted(): a terminal, no --json). */
#ifndef QBAK_AGENT_PROGRESS_H
#define QBAK_AGENT_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

struct progress;

/* NULL when !enabled; every function below accepts NULL and then does
 * nothing, so callers need no conditions. label starts the line. */
struct progress *progress_new(const char *label, bool enabled);

/* Sets item's bytes done of total (items appear in first-set order). */
void progress_set(struct progress *p, const char *item, uint64_t done,
                  uint64_t total);

/* Redraws the line, unless it was drawn less than 0.5 s ago. */
void progress_show(struct progress *p);

/* Draws the final line (when success) or clears it, and frees p. */
void progress_end(struct progress *p, bool success);

/* "12.0 MiB", "3.4 GiB": into buf of at least 16 bytes. */
const char *progress_bytes(uint64_t n, char *buf);

#endif

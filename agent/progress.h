/* Progress on a terminal: one line on stderr, redrawn at most twice a
 * second, with per item (disk) bytes done of total, the rate and the time
 * left.  backup, restore and run use it; nothing is drawn unless the
 * caller asked for it (cli_progress_wanted(): a terminal, no --json).
 *
 * A backup that `run` starts draws nothing itself: it reports to the run
 * through a pipe (progress_new_fd()), one "ITEM DONE TOTAL" line per item
 * and redraw, which the run parses (progress_parse_line()) into its own
 * line for every VM in flight. */
#ifndef QBAK_AGENT_PROGRESS_H
#define QBAK_AGENT_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

struct progress;

/* NULL when !enabled; every function below accepts NULL and then does
 * nothing, so callers need no conditions. label starts the line. */
struct progress *progress_new(const char *label, bool enabled);

/* Reports to fd (not a terminal) in lines of "ITEM DONE TOTAL"; NULL when
 * fd < 0.  The fd stays the caller's. */
struct progress *progress_new_fd(int fd);

/* Replaces the label. */
void progress_set_label(struct progress *p, const char *label);

/* Sets item's bytes done of total (items appear in first-set order). */
void progress_set(struct progress *p, const char *item, uint64_t done,
                  uint64_t total);

/* Takes item off the line; its bytes still count in the rate. */
void progress_remove(struct progress *p, const char *item);

/* Redraws the line, unless it was drawn less than 0.5 s ago. */
void progress_show(struct progress *p);

/* Draws the final line (when success) or clears it, and frees p. */
void progress_end(struct progress *p, bool success);

/* Parses one "ITEM DONE TOTAL" line (item without spaces, at most 127
 * bytes) into item (128 bytes), *done and *total. */
bool progress_parse_line(const char *line, char *item, uint64_t *done,
                         uint64_t *total);

/* "12.0 MiB", "3.4 GiB": into buf of at least 16 bytes. */
const char *progress_bytes(uint64_t n, char *buf);

#endif

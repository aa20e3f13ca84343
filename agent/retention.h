/* Which restore points a retention policy keeps: Proxmox Backup Server's
 * prune semantics, as a pure function of the points and the policy.
 *
 * The rules run in the order keep-last, -hourly, -daily, -weekly,
 * -monthly, -yearly.  Each walks the points newest first and keeps the
 * newest point of each of the last N periods (a point, an hour, a day, an
 * ISO 8601 week, a month, a year, in the local time zone) that have one;
 * older points of a period it kept are marked for removal.  A period that
 * a point kept by an earlier rule falls in is skipped (it does not count
 * towards N), and a point an earlier rule decided on is not looked at
 * again.  Protected points are kept and count for no rule.  Unlike PBS,
 * the newest point is always kept: it is what the next backup builds on.
 */
#ifndef QBAK_AGENT_RETENTION_H
#define QBAK_AGENT_RETENTION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

enum retention_rule {
    RETENTION_LAST,
    RETENTION_HOURLY,
    RETENTION_DAILY,
    RETENTION_WEEKLY,
    RETENTION_MONTHLY,
    RETENTION_YEARLY,
    RETENTION_N_RULES,
};

/* keep[rule]: N of that rule, 0 when the rule is not given. */
struct retention_policy {
    unsigned keep[RETENTION_N_RULES];
};

struct retention_point {
    const char *id; /* unique: keep-last's period */
    time_t time;    /* when the point was taken */
    bool protected;
};

struct retention_decision {
    bool keep;
    /* Why: "keep-last" ... "keep-yearly", "protected", "newest"; for a
     * removed point "no rule keeps it".  Static strings. */
    const char *reason;
};

/* The option name of a rule ("keep-daily"). */
const char *retention_rule_name(enum retention_rule rule);

/* Whether the policy has any rule. */
bool retention_policy_any(const struct retention_policy *policy);

/* Decides for points[0..n) given oldest first (ids sorting the same way),
 * into out[0..n). */
void retention_select(const struct retention_point *points, size_t n,
                      const struct retention_policy *policy,
                      struct retention_decision *out);

#endif

/* Retention selection: see retention.h. */
#include "agent/retention.h"

#include <glib.h>
#include <string.h>

enum mark {
    MARK_NONE,
    MARK_KEEP,
    MARK_REMOVE,
    MARK_PROTECTED,
};

static const char *const rule_names[RETENTION_N_RULES] = {
    [RETENTION_LAST] = "keep-last",       [RETENTION_HOURLY] = "keep-hourly",
    [RETENTION_DAILY] = "keep-daily",     [RETENTION_WEEKLY] = "keep-weekly",
    [RETENTION_MONTHLY] = "keep-monthly", [RETENTION_YEARLY] = "keep-yearly",
};

const char *
retention_rule_name(enum retention_rule rule)
{
    return rule < RETENTION_N_RULES ? rule_names[rule] : "?";
}

bool
retention_policy_any(const struct retention_policy *policy)
{
    for (int r = 0; r < RETENTION_N_RULES; r++) {
        if (policy->keep[r] > 0) {
            return true;
        }
    }
    return false;
}

/* The period of point p under rule (a string the caller frees). */
static char *
period_of(const struct retention_point *p, enum retention_rule rule)
{
    struct tm tm;
    char buf[64];

    size_t len = 0;

    if (rule == RETENTION_LAST) {
        return g_strdup(p->id);
    }
    /* Local wall-clock periods; %G/%V is the ISO 8601 week-numbering year
     * and week, so a week spanning New Year is one week. */
    if (localtime_r(&p->time, &tm)) {
        switch (rule) {
        case RETENTION_HOURLY:
            len = strftime(buf, sizeof(buf), "%Y/%m/%d/%H", &tm);
            break;
        case RETENTION_DAILY:
            len = strftime(buf, sizeof(buf), "%Y/%m/%d", &tm);
            break;
        case RETENTION_WEEKLY:
            len = strftime(buf, sizeof(buf), "%G/%V", &tm);
            break;
        case RETENTION_MONTHLY:
            len = strftime(buf, sizeof(buf), "%Y/%m", &tm);
            break;
        default:
            len = strftime(buf, sizeof(buf), "%Y", &tm);
            break;
        }
    }
    if (len == 0) {
        /* Unrepresentable time: a period of its own, never merged with
         * another point's. */
        return g_strdup_printf("?%s", p->id);
    }
    return g_strdup(buf);
}

/* One rule over the points, newest first (index n-1 down to 0). */
static void
mark_rule(const struct retention_point *points, size_t n, enum mark *marks,
          enum retention_rule *by, enum retention_rule rule, unsigned keep)
{
    g_autoptr(GHashTable) included =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    g_autoptr(GHashTable) already =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);

    /* Periods an earlier rule already kept a point in do not count. */
    for (size_t i = 0; i < n; i++) {
        if (marks[i] == MARK_KEEP) {
            g_hash_table_add(already, period_of(&points[i], rule));
        }
    }
    for (size_t k = n; k > 0; k--) {
        size_t i = k - 1;
        g_autofree char *period = NULL;

        if (marks[i] != MARK_NONE) {
            continue;
        }
        if (points[i].protected) {
            marks[i] = MARK_PROTECTED;
            continue;
        }
        period = period_of(&points[i], rule);
        if (g_hash_table_contains(already, period)) {
            continue;
        }
        if (g_hash_table_contains(included, period)) {
            marks[i] = MARK_REMOVE; /* an older point of a kept period */
            continue;
        }
        if (g_hash_table_size(included) >= keep) {
            break;
        }
        g_hash_table_add(included, g_steal_pointer(&period));
        marks[i] = MARK_KEEP;
        by[i] = rule;
    }
}

void
retention_select(const struct retention_point *points, size_t n,
                 const struct retention_policy *policy,
                 struct retention_decision *out)
{
    g_autofree enum mark *marks = g_new0(enum mark, n ? n : 1);
    g_autofree enum retention_rule *by = g_new0(enum retention_rule, n ? n : 1);

    for (int r = 0; r < RETENTION_N_RULES; r++) {
        if (policy->keep[r] > 0) {
            mark_rule(points, n, marks, by, (enum retention_rule)r,
                      policy->keep[r]);
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (points[i].protected) {
            out[i] = (struct retention_decision){true, "protected"};
        } else if (marks[i] == MARK_KEEP) {
            out[i] = (struct retention_decision){true, rule_names[by[i]]};
        } else {
            out[i] = (struct retention_decision){false, "no rule keeps it"};
        }
    }
    /* The next backup builds on the newest point. */
    if (n > 0 && !out[n - 1].keep) {
        out[n - 1] = (struct retention_decision){true, "newest"};
    }
}

/* Unit tests for agent/retention.c: which points a policy keeps.
 *
 * Table-driven: each case is a list of point times (UTC, oldest first), the
 * protected ones, a policy, a time zone, and the points expected kept.
 * The first cases are the examples of Proxmox Backup Server's own prune
 * tests (tests/prune.rs there), run in UTC as they are; then what PBS
 * leaves implicit: the local time zone, ISO weeks over New Year, protected
 * points, qbak's always-kept newest point, and the reasons given.
 */
#include <stdlib.h>
#include <string.h>

#include <glib.h>

#include "agent/retention.h"

/* The table leaves trailing fields (reasons) out where they are not
 * checked. */
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

#define MAX_POINTS 40

struct retention_case {
    const char *name;
    const char *tz;
    const char *times[MAX_POINTS]; /* oldest first */
    const char *protected_times[4];
    unsigned keep[RETENTION_N_RULES];
    const char *kept[MAX_POINTS];
    /* Optional: the reason of each kept point, in the order of kept. */
    const char *reasons[MAX_POINTS];
};

#define L RETENTION_LAST
#define H RETENTION_HOURLY
#define D RETENTION_DAILY
#define W RETENTION_WEEKLY
#define M RETENTION_MONTHLY
#define Y RETENTION_YEARLY

/* PBS's test_prune_simple list. */
#define SIMPLE                                                                 \
    {                                                                          \
        "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z",                        \
            "2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z"                     \
    }
/* PBS's test_prune_simple2 list. */
#define SIMPLE2                                                                \
    {                                                                          \
        "2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z",                        \
            "2019-11-21T11:59:15Z", "2019-11-22T11:59:15Z",                    \
            "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z",                    \
            "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z",                    \
            "2019-12-04T11:59:15Z"                                             \
    }
/* PBS's test_prune_hourly list. */
#define HOURLY                                                                 \
    {                                                                          \
        "2019-11-15T09:39:15Z", "2019-11-15T10:49:15Z",                        \
            "2019-11-15T10:59:15Z", "2019-11-15T11:39:15Z",                    \
            "2019-11-15T11:49:15Z", "2019-11-15T11:59:15Z"                     \
    }

static const struct retention_case cases[] = {
    /* PBS test_prune_hourly */
    {"pbs/hourly-3",
     "UTC",
     HOURLY,
     {},
     {[H] = 3},
     {"2019-11-15T09:39:15Z", "2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"}},
    {"pbs/hourly-2",
     "UTC",
     HOURLY,
     {},
     {[H] = 2},
     {"2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"}},
    /* PBS test_prune_simple2 */
    {"pbs/simple2-daily-1",
     "UTC",
     SIMPLE2,
     {},
     {[D] = 1},
     {"2019-12-04T11:59:15Z"}},
    {"pbs/simple2-last-1-daily-1",
     "UTC",
     SIMPLE2,
     {},
     {[L] = 1, [D] = 1},
     {"2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"},
     {"keep-daily", "keep-last"}},
    {"pbs/simple2-daily-1-weekly-1",
     "UTC",
     SIMPLE2,
     {},
     {[D] = 1, [W] = 1},
     {"2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"},
     {"keep-weekly", "keep-daily"}},
    {"pbs/simple2-daily-weekly-monthly-1",
     "UTC",
     SIMPLE2,
     {},
     {[D] = 1, [W] = 1, [M] = 1},
     {"2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"},
     {"keep-monthly", "keep-weekly", "keep-daily"}},
    {"pbs/simple2-monthly-1-yearly-1",
     "UTC",
     SIMPLE2,
     {},
     {[M] = 1, [Y] = 1},
     {"2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"},
     {"keep-yearly", "keep-monthly"}},
    /* PBS test_prune_simple */
    {"pbs/simple-last-4", "UTC", SIMPLE, {}, {[L] = 4}, SIMPLE},
    {"pbs/simple-last-3",
     "UTC",
     SIMPLE,
     {},
     {[L] = 3},
     {"2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z"}},
    {"pbs/simple-last-2",
     "UTC",
     SIMPLE,
     {},
     {[L] = 2},
     {"2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z"}},
    {"pbs/simple-last-1",
     "UTC",
     SIMPLE,
     {},
     {[L] = 1},
     {"2019-12-04T12:59:15Z"}},
    {"pbs/simple-last-2-daily-2",
     "UTC",
     SIMPLE,
     {},
     {[L] = 2, [D] = 2},
     SIMPLE},
    {"pbs/simple-daily-3",
     "UTC",
     SIMPLE,
     {},
     {[D] = 3},
     {"2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T12:59:15Z"}},
    {"pbs/simple-daily-2",
     "UTC",
     SIMPLE,
     {},
     {[D] = 2},
     {"2019-12-03T11:59:15Z", "2019-12-04T12:59:15Z"}},
    {"pbs/simple-weekly-5",
     "UTC",
     SIMPLE,
     {},
     {[W] = 5},
     {"2019-12-04T12:59:15Z"}},
    {"pbs/simple-daily-1-weekly-5",
     "UTC",
     SIMPLE,
     {},
     {[D] = 1, [W] = 5},
     {"2019-12-04T12:59:15Z"}},
    {"pbs/simple-monthly-6",
     "UTC",
     SIMPLE,
     {},
     {[M] = 6},
     {"2019-12-04T12:59:15Z"}},
    {"pbs/simple-yearly-7",
     "UTC",
     SIMPLE,
     {},
     {[Y] = 7},
     {"2019-12-04T12:59:15Z"}},
    {"pbs/simple-weekly-monthly-yearly",
     "UTC",
     SIMPLE,
     {},
     {[W] = 5, [M] = 6, [Y] = 7},
     {"2019-12-04T12:59:15Z"}},

    /* Days are local days: 03:00Z on the 4th is 22:00 on the 3rd in
     * UTC-5, so there it is the 3rd's newest point. */
    {"local/daily-utc",
     "UTC",
     {"2019-12-03T12:00:00Z", "2019-12-04T03:00:00Z", "2019-12-04T11:00:00Z"},
     {},
     {[D] = 2},
     {"2019-12-03T12:00:00Z", "2019-12-04T11:00:00Z"}},
    {"local/daily-utc-minus-5",
     "EST5",
     {"2019-12-03T12:00:00Z", "2019-12-04T03:00:00Z", "2019-12-04T11:00:00Z"},
     {},
     {[D] = 2},
     {"2019-12-04T03:00:00Z", "2019-12-04T11:00:00Z"}},
    /* A daylight saving change: CET/CEST, the night of 2019-10-27, when
     * 03:00 CEST became 02:00 CET at 01:00Z.  23:30Z is 01:30 on the 27th,
     * 00:30Z is 02:30 CEST and 01:30Z 02:30 CET: periods are wall-clock
     * ones (as in PBS), so those two share an hour, and all three a day. */
    {"local/dst-same-day",
     "CET-1CEST,M3.5.0,M10.5.0/3",
     {"2019-10-26T21:30:00Z", "2019-10-26T23:30:00Z", "2019-10-27T00:30:00Z",
      "2019-10-27T01:30:00Z"},
     {},
     {[D] = 2},
     {"2019-10-26T21:30:00Z", "2019-10-27T01:30:00Z"}},
    {"local/dst-wall-clock-hour",
     "CET-1CEST,M3.5.0,M10.5.0/3",
     {"2019-10-26T21:30:00Z", "2019-10-26T23:30:00Z", "2019-10-27T00:30:00Z",
      "2019-10-27T01:30:00Z"},
     {},
     {[H] = 2},
     {"2019-10-26T23:30:00Z", "2019-10-27T01:30:00Z"}},
    /* ISO weeks: Monday 2019-12-30 is in week 2020/01 with 2020-01-02;
     * Sunday 2019-12-29 is in 2019/52. */
    {"week/new-year",
     "UTC",
     {"2019-12-29T10:00:00Z", "2019-12-30T10:00:00Z", "2020-01-02T10:00:00Z"},
     {},
     {[W] = 2},
     {"2019-12-29T10:00:00Z", "2020-01-02T10:00:00Z"}},
    /* Months and years are calendar ones. */
    {"month/calendar",
     "UTC",
     {"2019-10-31T23:00:00Z", "2019-11-01T01:00:00Z", "2019-11-30T23:00:00Z",
      "2019-12-01T00:00:00Z"},
     {},
     {[M] = 3},
     {"2019-10-31T23:00:00Z", "2019-11-30T23:00:00Z", "2019-12-01T00:00:00Z"}},

    /* Protected points are kept and count for no rule: keep-daily 2 still
     * keeps two days besides the protected point. */
    {"protected/not-counted",
     "UTC",
     {"2019-12-01T10:00:00Z", "2019-12-02T10:00:00Z", "2019-12-03T10:00:00Z",
      "2019-12-04T10:00:00Z"},
     {"2019-12-03T10:00:00Z"},
     {[D] = 2},
     {"2019-12-02T10:00:00Z", "2019-12-03T10:00:00Z", "2019-12-04T10:00:00Z"},
     {"keep-daily", "protected", "keep-daily"}},
    /* An old protected point survives any policy. */
    {"protected/old",
     "UTC",
     {"2019-01-01T10:00:00Z", "2019-06-01T10:00:00Z", "2019-12-04T10:00:00Z"},
     {"2019-01-01T10:00:00Z"},
     {[L] = 1},
     {"2019-01-01T10:00:00Z", "2019-12-04T10:00:00Z"},
     {"protected", "keep-last"}},
    /* A protected newest point does not use up keep-last 1. */
    {"protected/newest",
     "UTC",
     {"2019-12-02T10:00:00Z", "2019-12-03T10:00:00Z", "2019-12-04T10:00:00Z"},
     {"2019-12-04T10:00:00Z"},
     {[L] = 1},
     {"2019-12-03T10:00:00Z", "2019-12-04T10:00:00Z"},
     {"keep-last", "protected"}},
    /* Several points in one second: keep-last counts points, not
     * seconds. */
    {"last/same-second",
     "UTC",
     {"2019-12-04T10:00:00Z", "2019-12-04T10:00:00Z", "2019-12-04T10:00:00Z"},
     {},
     {[L] = 2},
     {"2019-12-04T10:00:00Z", "2019-12-04T10:00:00Z"}},
    /* One point, any rule: kept. */
    {"single",
     "UTC",
     {"2019-12-04T10:00:00Z"},
     {},
     {[Y] = 1},
     {"2019-12-04T10:00:00Z"}},
    {"empty", "UTC", {}, {}, {[L] = 1}, {}},
    /* The README's worked example: a point every day at 23:00 in
     * November 2026, and one more at noon on Monday the 30th. */
    {"readme/worked-example",
     "UTC",
     {
         "2026-11-01T23:00:00Z", "2026-11-02T23:00:00Z", "2026-11-03T23:00:00Z",
         "2026-11-04T23:00:00Z", "2026-11-05T23:00:00Z", "2026-11-06T23:00:00Z",
         "2026-11-07T23:00:00Z", "2026-11-08T23:00:00Z", "2026-11-09T23:00:00Z",
         "2026-11-10T23:00:00Z", "2026-11-11T23:00:00Z", "2026-11-12T23:00:00Z",
         "2026-11-13T23:00:00Z", "2026-11-14T23:00:00Z", "2026-11-15T23:00:00Z",
         "2026-11-16T23:00:00Z", "2026-11-17T23:00:00Z", "2026-11-18T23:00:00Z",
         "2026-11-19T23:00:00Z", "2026-11-20T23:00:00Z", "2026-11-21T23:00:00Z",
         "2026-11-22T23:00:00Z", "2026-11-23T23:00:00Z", "2026-11-24T23:00:00Z",
         "2026-11-25T23:00:00Z", "2026-11-26T23:00:00Z", "2026-11-27T23:00:00Z",
         "2026-11-28T23:00:00Z", "2026-11-29T23:00:00Z", "2026-11-30T12:00:00Z",
         "2026-11-30T23:00:00Z",
     },
     {},
     {[L] = 2, [D] = 5, [W] = 2},
     {"2026-11-15T23:00:00Z", "2026-11-22T23:00:00Z", "2026-11-25T23:00:00Z",
      "2026-11-26T23:00:00Z", "2026-11-27T23:00:00Z", "2026-11-28T23:00:00Z",
      "2026-11-29T23:00:00Z", "2026-11-30T12:00:00Z", "2026-11-30T23:00:00Z"},
     {"keep-weekly", "keep-weekly", "keep-daily", "keep-daily", "keep-daily",
      "keep-daily", "keep-daily", "keep-last", "keep-last"}},
};

static time_t
parse_time(const char *iso)
{
    g_autoptr(GDateTime) dt = g_date_time_new_from_iso8601(iso, NULL);

    g_assert_nonnull(dt);
    return (time_t)g_date_time_to_unix(dt);
}

static bool
in_list(const char *const *list, size_t max, const char *s)
{
    for (size_t i = 0; i < max && list[i]; i++) {
        if (strcmp(list[i], s) == 0) {
            return true;
        }
    }
    return false;
}

static void
run_case(gconstpointer data)
{
    const struct retention_case *c = data;
    struct retention_point points[MAX_POINTS];
    struct retention_decision out[MAX_POINTS];
    struct retention_policy policy = {{0}};
    char ids[MAX_POINTS][32];
    size_t n = 0, kept = 0;
    GString *got = g_string_new(NULL), *want = g_string_new(NULL);

    g_setenv("TZ", c->tz, true);
    tzset();
    memcpy(policy.keep, c->keep, sizeof(policy.keep));
    for (; n < MAX_POINTS && c->times[n]; n++) {
        g_snprintf(ids[n], sizeof(ids[n]), "p%02zu", n);
        points[n].id = ids[n];
        points[n].time = parse_time(c->times[n]);
        points[n].protected = in_list(
            c->protected_times, G_N_ELEMENTS(c->protected_times), c->times[n]);
    }
    retention_select(points, n, &policy, out);
    for (size_t i = 0; i < n; i++) {
        if (out[i].keep) {
            g_string_append_printf(got, "%s ", c->times[i]);
            if (c->reasons[0]) {
                g_assert_nonnull(c->reasons[kept]);
                g_assert_cmpstr(out[i].reason, ==, c->reasons[kept]);
            }
            kept++;
        } else {
            g_assert_cmpstr(out[i].reason, ==, "no rule keeps it");
        }
    }
    for (size_t i = 0; i < MAX_POINTS && c->kept[i]; i++) {
        g_string_append_printf(want, "%s ", c->kept[i]);
    }
    g_assert_cmpstr(got->str, ==, want->str);
    g_string_free(got, true);
    g_string_free(want, true);
}

/* Whatever the policy, the newest point stays. */
static void
test_newest_always_kept(void)
{
    struct retention_point p[3] = {
        {"a", 1000, false}, {"b", 2000, false}, {"c", 3000, false}};
    struct retention_decision out[3];
    struct retention_policy policy = {{0}};

    g_setenv("TZ", "UTC", true);
    tzset();
    policy.keep[RETENTION_DAILY] = 1;
    retention_select(p, 3, &policy, out);
    g_assert_true(out[2].keep);
    g_assert_false(out[0].keep || out[1].keep);
    /* A rule whose N is reached before the newest is seen cannot happen
     * (the walk starts at the newest), so "newest" is a guarantee the
     * rules already give; it is still checked for an empty policy. */
    policy.keep[RETENTION_DAILY] = 0;
    g_assert_false(retention_policy_any(&policy));
    retention_select(p, 3, &policy, out);
    g_assert_true(out[2].keep);
    g_assert_cmpstr(out[2].reason, ==, "newest");
    g_assert_false(out[0].keep || out[1].keep);
}

static void
test_rule_names(void)
{
    g_assert_cmpstr(retention_rule_name(RETENTION_LAST), ==, "keep-last");
    g_assert_cmpstr(retention_rule_name(RETENTION_WEEKLY), ==, "keep-weekly");
    g_assert_cmpstr(retention_rule_name(RETENTION_YEARLY), ==, "keep-yearly");
}

int
main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *path = g_strdup_printf("/retention/%s", cases[i].name);
        g_test_add_data_func(path, &cases[i], run_case);
    }
    g_test_add_func("/retention/newest-always-kept", test_newest_always_kept);
    g_test_add_func("/retention/rule-names", test_rule_names);
    return g_test_run();
}

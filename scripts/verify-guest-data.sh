#!/usr/bin/env bash
# verify-guest-data.sh: check, on the host, a data disk of the qbak test guest
# (scripts/build-test-guest.sh), e.g. a disk restored from a backup.
#
# Usage: scripts/verify-guest-data.sh [options] IMAGE
#   IMAGE             qcow2 or raw image of the data disk (never modified:
#                     the checks run on a raw copy in a temporary directory)
#   --clean           require a file system that needs no journal recovery
#                     (taken while frozen, or after a clean unmount); without
#                     it the journal is replayed on the copy first, as a
#                     mount would, so crash-consistent images pass too
#   --min-files N     require at least N entries in DONE-log
#   --force-share     read an image that a running QEMU holds (qemu-img -U)
#   -q                print only errors
#
# Checks:
#   1. e2fsck -fn passes (after journal replay unless --clean);
#   2. /w/DONE-log is a run of consecutive 6-digit numbers, one per line;
#   3. every file /w/NNNNNN present holds exactly the writer's payload for
#      NNNNNN: 2048 lines "qbak-NNNNNN-line-IIII-xxxxxxxxx\n" (65536 bytes);
#   4. the newest 256 files listed in DONE-log are all present (the guest
#      keeps the newest 256 and removes older ones);
#   5. no other files in /w besides DONE-log and .tmp (the writer's temp).
# Nothing is mounted: the file system is read with debugfs (e2fsprogs).
# Exit status 0 when all checks pass, 1 otherwise (with a message), 2 usage.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin

KEEP=256
clean=0 min=0 share=() quiet=0 image=""
usage() { sed -n '4,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
    --clean) clean=1 ;;
    --min-files) [ $# -ge 2 ] || usage; min=$2; shift ;;
    --force-share) share=(-U) ;;
    -q) quiet=1 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [ -z "$image" ] || usage; image=$1 ;;
    esac
    shift
done
[ -n "$image" ] || usage
[ -r "$image" ] || { echo "verify-guest-data: cannot read $image" >&2; exit 2; }

fail() { echo "verify-guest-data: FAIL: $*" >&2; exit 1; }
say() { [ $quiet = 1 ] || echo "verify-guest-data: $*"; }
for t in qemu-img e2fsck debugfs dumpe2fs awk; do
    command -v $t >/dev/null || { echo "verify-guest-data: $t missing (e2fsprogs, qemu-utils)" >&2; exit 2; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qbak-verify.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
raw=$tmp/disk.raw

qemu-img convert "${share[@]}" -O raw "$image" "$raw" ||
    fail "qemu-img convert of $image failed"

features=$(dumpe2fs -h "$raw" 2>/dev/null | sed -n 's/^Filesystem features: *//p')
[ -n "$features" ] || fail "no ext2/3/4 file system on $image"
case " $features " in
*" needs_recovery "*)
    [ $clean = 0 ] || fail "file system needs journal recovery (not frozen or cleanly unmounted)"
    say "replaying the journal"
    # Replay only (as a mount would); exit 1 means "fixed", that is, replayed.
    rc=0; e2fsck -E journal_only -y "$raw" >"$tmp/replay.log" 2>&1 || rc=$?
    [ $rc -le 1 ] || { cat "$tmp/replay.log" >&2; fail "journal replay failed (e2fsck exit $rc)"; }
    ;;
esac

rc=0; e2fsck -fn "$raw" >"$tmp/fsck.log" 2>&1 || rc=$?
if [ $rc -ne 0 ]; then
    cat "$tmp/fsck.log" >&2
    fail "e2fsck -fn found problems (exit $rc)"
fi

mkdir "$tmp/out"
debugfs -R "rdump /w $tmp/out" "$raw" >"$tmp/debugfs.log" 2>&1 || true
[ -d "$tmp/out/w" ] || { cat "$tmp/debugfs.log" >&2; fail "no /w directory on the file system"; }
w=$tmp/out/w
[ -f "$w/DONE-log" ] || fail "no /w/DONE-log"

# 2. DONE-log: consecutive 6-digit numbers. The writer fsyncs DONE-log after
# each append, but an image taken between an append and its fsync (crash
# consistent, not frozen) may end in NUL bytes (i_size committed, data not
# yet written) or in a line without its newline: such a tail is ignored.
log=$w/DONE-log
size=$(stat -c %s "$log")
nonnul=$(tr -d '\000' < "$log" | wc -c)
if [ "$nonnul" -ne "$size" ]; then
    [ "$(head -c "$nonnul" "$log" | tr -d '\000' | wc -c)" -eq "$nonnul" ] ||
        fail "DONE-log has NUL bytes before its end"
    say "ignoring $((size - nonnul)) NUL bytes at the end of DONE-log (append not yet synced)"
    head -c "$nonnul" "$log" > "$tmp/DONE-log"
    log=$tmp/DONE-log
fi
if [ "$nonnul" -gt 0 ] && [ -n "$(tail -c 1 "$log")" ]; then
    say "ignoring an incomplete last line in DONE-log: $(tail -n 1 "$log")"
    head -n -1 "$log" > "$tmp/DONE-log.lines"
    log=$tmp/DONE-log.lines
fi
seq=$(awk '
    /^[0-9][0-9][0-9][0-9][0-9][0-9]$/ {
        v = $0 + 0
        if (NR > 1 && v != prev + 1) { printf "bad sequence at line %d: %s after %06d\n", NR, $0, prev > "/dev/stderr"; bad = 1; exit 1 }
        if (NR == 1) first = v
        prev = v; n++; next
    }
    { printf "bad DONE-log line %d: \"%s\"\n", NR, $0 > "/dev/stderr"; bad = 1; exit 1 }
    END { if (bad) exit 1; if (n) printf "%d %d %d\n", first, prev, n; else print "-1 -1 0" }
' "$log") || fail "DONE-log is malformed"
read -r first last count <<<"$seq"
[ "$count" -ge "$min" ] || fail "DONE-log has $count entries, expected at least $min"

# 5. Unexpected files.
bad=$(cd "$w" && ls -A | grep -Ev '^([0-9]{6}|DONE-log|\.tmp)$' || true)
[ -z "$bad" ] || fail "unexpected files in /w: $(echo "$bad" | tr "\n" " ")"

# 3. Content of every present file.
files=$(cd "$w" && ls -A | grep -E '^[0-9]{6}$' || true)
nfiles=0
if [ -n "$files" ]; then
    for f in $files; do
        s=$(stat -c %s "$w/$f")
        [ "$s" = 65536 ] || fail "/w/$f has $s bytes, expected 65536"
    done
    nfiles=$(echo "$files" | wc -l)
    # shellcheck disable=SC2086
    (cd "$w" && awk '
        FNR == 1 { n = FILENAME + 0 }
        {
            want = sprintf("qbak-%06d-line-%04d-xxxxxxxxx", n, FNR - 1)
            if ($0 != want) { printf "/w/%s line %d is \"%s\", expected \"%s\"\n", FILENAME, FNR, substr($0, 1, 64), want > "/dev/stderr"; bad = 1; exit 1 }
            lines[FILENAME] = FNR
        }
        END {
            if (bad) exit 1
            for (f in lines) if (lines[f] != 2048) { printf "/w/%s has %d lines\n", f, lines[f] > "/dev/stderr"; exit 1 }
        }' $files) || fail "file content mismatch"
fi

# 4. The newest KEEP logged files must all be there.
if [ "$count" -gt 0 ]; then
    lo=$((last - KEEP + 1)); [ $lo -ge "$first" ] || lo=$first
    for ((i = lo; i <= last; i++)); do
        f=$(printf %06d $i)
        [ -f "$w/$f" ] || fail "/w/$f is listed in DONE-log but missing"
    done
fi

if [ "$count" -gt 0 ]; then
    say "ok: e2fsck clean, DONE-log $(printf %06d "$first")..$(printf %06d "$last") ($count entries), $nfiles files verified"
else
    say "ok: e2fsck clean, DONE-log empty, $nfiles files verified"
fi

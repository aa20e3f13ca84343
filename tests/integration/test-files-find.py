#!/usr/bin/env python3
"""File-level access: qbak index and find on real qbak points.

The points of tests/lib/qbaktest.py files_points() (a GPT disk with ext4,
xfs and LVM, three points from a running QEMU: a file changed, one
deleted, one added).  index writes one point's catalog; find across all
three indexes the other two in one appliance launch and reports new,
changed, same and deleted against the truth; find again starts no
appliance at all; xfs and LVM answer from the catalogs; hostile names are
escaped; repository files stay byte-identical (catalogs are the only new
files)."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("files")
t0 = time.monotonic()
repo, points, truths, parts = files_points(w)
log("fixture and 3 points: %.1f s" % (time.monotonic() - t0))
P1, P2, P3 = points
before = tree_hashes(repo)
common = ["--repo", repo, "--vm", "vm1"]


def timed(*args, **kw):
    t = time.monotonic()
    r = qbak_json(*args, **kw)
    log("qbak %s: %.1f s" % (args[0], time.monotonic() - t))
    return r


# Index one point; then find indexes the other two in one launch.
r = timed("index", *common, "--points", P1)
check([(x["point"], x["indexed"]) for x in r["points"]] == [(P1, True)], "index: %s" % r)
check(r["launches"] == 1, "index launches %s" % r["launches"])
check(os.path.isfile(os.path.join(repo, "vm1", P1, "vd0.catalog")), "catalog of P1 missing")
check(not os.path.exists(os.path.join(repo, "vm1", P2, "vd0.catalog")), "P2 indexed too early")
log("PASS index --points P1 wrote one catalog (%d bytes, %d entries)"
    % (r["points"][0]["bytes"], r["points"][0]["entries"]))


def expected_find(sel, name_suffix):
    out, prev = [], None
    for i in sel:
        cur = {p: v for p, v in truths[i].items()
               if os.path.basename(p).endswith(name_suffix)}
        lines = []
        for p, (kind, mode, data, mtime) in cur.items():
            size = len(data) if kind == "file" else None
            if prev is None or p not in prev:
                ch = "new"
            else:
                pk, pm, pd, pt = prev[p]
                ch = "same" if (len(pd) if pk == "file" else None) == size and pt == mtime else "changed"
            lines.append((points[i], p, ch))
        for p in (prev or {}):
            if p not in cur:
                lines.append((points[i], p, "deleted"))
        out += sorted(lines, key=lambda x: x[1])
        prev = cur
    return out


t = time.monotonic()
r = timed("find", *common, "--fs", "1", "--name", "*.txt")
check(r["points"] == points, "find points %s" % r["points"])
check(r["indexed"] == [P2, P3] and r["launches"] == 1,
      "find indexed %s in %d launches" % (r["indexed"], r["launches"]))
got = [(m["point"], m["path"], m["change"]) for m in r["matches"]]
want = expected_find([0, 1, 2], ".txt")
check(got == want, "find matches\n got %s\nwant %s" % (got, want))
for m in r["matches"]:
    if m["change"] != "deleted":
        i = points.index(m["point"])
        kind, mode, data, mtime = truths[i][m["path"]]
        check(m["size"] == len(data) and m["type"] == "file", "find %s" % m)
        check(m["mtime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)), "find %s" % m)
check(("%s" % P2, "/docs/gone.txt", "deleted") in got and (P2, "/docs/a.txt", "changed") in got
      and (P2, "/docs/new.txt", "new") in got and (P3, "/docs/a.txt", "same") in got,
      "find changes: %s" % got)
log("PASS find across 3 points (2 indexed now in one launch): new, changed, same, deleted")

# Every point indexed: no appliance at all.
t = time.monotonic()
r2 = qbak_json("find", *common, "--fs", "1", "--name", "*.txt")
el = time.monotonic() - t
check(r2["launches"] == 0 and r2["indexed"] == [], "indexed find launched %s" % r2["launches"])
check(r2["matches"] == r["matches"], "indexed find differs")
log("PASS find over 3 indexed points without an appliance (%.2f s)" % el)

r = qbak_json("find", *common, "--points", "%s..%s" % (P2, P3), "--fs", "1", "--name", "a.txt")
got = [(m["point"], m["path"], m["change"]) for m in r["matches"]]
check(got == [(P2, "/docs/a.txt", "new"), (P3, "/docs/a.txt", "same")], "find range %s" % got)
r = qbak_json("find", *common, "--fs", "1", "--path", "/evil/*")
names = sorted(set(m["path"] for m in r["matches"]))
check("/evil/new\nline" in names and "/evil/" + FILES_LONG in names, "hostile names %r" % names)
p = qbak("find", *common, "--fs", "1", "--path", "/evil/*", check_rc=True)
check("new\\nline" in p.stdout and "\x1b" not in p.stdout, "human find prints names escaped")
log("PASS find --points FROM..TO, --path, hostile names escaped in human output")

# xfs and LVM from the catalogs.
r = qbak_json("find", *common, "--fs", "2", "--path", "/x/*")
got = sorted((m["point"], m["path"], m["change"]) for m in r["matches"])
want = sorted((pt, p, "new" if pt == P1 else "same") for pt in points
              for p in FILES_XFS if p.startswith("/x/"))
check(got == want and r["launches"] == 0, "find xfs %s" % got)
r = qbak_json("find", *common, "--fs", "vg0/lv0", "--name", "lvfile")
got = [(m["point"], m["change"], m["size"]) for m in r["matches"]]
check(got == [(P1, "new", 7), (P2, "same", 7), (P3, "same", 7)], "find lvm %s" % got)
log("PASS find in xfs and in an LVM volume from the catalogs")

p = qbak("find", *common, "--name", "x", check_rc=False)
check(p.returncode == 1 and "1 (ext4)" in p.stderr and "vg0/lv0" in p.stderr,
      "find without --fs: %d %s" % (p.returncode, p.stderr))
p = qbak("ls", *common, "--disk", "nope", check_rc=False)
check(p.returncode == 1 and "vd0" in p.stderr, "--disk nope: %s" % p.stderr)
log("PASS errors name the --fs values and the disks")

# Catalogs are new files; everything that was there is byte-identical.
after = tree_hashes(repo)
check_repo_unchanged(before, after)
new = sorted(f for f in set(after) - set(before) if f.endswith(".catalog"))
check(new == sorted("vm1/%s/vd0.catalog" % p for p in points), "catalogs %s" % new)
for pt in points:
    img_check(os.path.join(repo, "vm1", pt, "vd0.qcow2"))
log("PASS repository byte-identical (3 catalogs added)")
shutil.rmtree(w, ignore_errors=True)

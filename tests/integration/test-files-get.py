#!/usr/bin/env python3
"""File-level access: qbak get on real qbak points, with hostile names.

The points of tests/lib/qbaktest.py files_points() (a GPT disk with ext4,
xfs and LVM; three points from a running QEMU).  The ext4 file system
holds names with a newline and an escape sequence, a 255-byte name,
symlinks out of the guest file system and a set-uid file.  get copies
directories with modes, times and symlinks (never followed; set-id bits
dropped), skips the unsafe names and says so (exit 1), recovers a file
deleted in later points, resolves a guest symlink inside the guest file
system (/escape -> /etc finds no passwd there), never writes through a
symlink planted in the destination, and never writes outside it; the
repository stays byte-identical."""
import json
import os
import stat
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("files-get")
repo, points, truths, parts = files_points(w)
P1, P2, P3 = points
before = tree_hashes(repo)
common = ["--repo", repo, "--vm", "vm1"]
ESCAPED = "/tmp/qbak-files-escaped"
if os.path.lexists(ESCAPED):
    os.unlink(ESCAPED)
outside = os.path.join(w, "outside")
os.mkdir(outside)
victim = os.path.join(outside, "victim")
with open(victim, "w") as f:
    f.write("precious\n")


def snapshot(d):
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime)
    return out


outside_before = snapshot(outside)

# 1. Directories of the first point, into an existing directory.
dest = os.path.join(w, "dest")
os.mkdir(dest)
t = time.monotonic()
p = qbak("get", *common, "--point", P1, "--fs", "1", "/docs", "/modes", "/escape", "/evil",
         "--output", dest, "--json", check_rc=False)
log("qbak get (4 paths): %.1f s" % (time.monotonic() - t))
check(p.returncode == 1, "get with unsafe names must exit 1, got %d: %s" % (p.returncode, p.stderr))
r = json.loads(p.stdout)
skipped = sorted(s["path"] for s in r["skipped"])
check(skipped == sorted(["/evil/esc\x1b[31mred", "/evil/new\nline"]), "skipped %r" % skipped)
check("not copied" in p.stderr and "\x1b" not in p.stderr and "new\\nline" in p.stderr,
      "stderr names the skipped entries, escaped: %r" % p.stderr)
truth = truths[0]
copied = 0
for path, (kind, mode, data, mtime) in truth.items():
    top = path.split("/")[1]
    if top not in ("docs", "modes", "escape", "evil"):
        continue
    local = os.path.join(dest, path.lstrip("/"))
    name = os.path.basename(path)
    if any(ord(c) < 0x20 for c in name):
        check(not os.path.lexists(local), "unsafe name copied: %r" % local)
        continue
    st = os.lstat(local)
    if kind == "symlink":
        check(stat.S_ISLNK(st.st_mode) and os.readlink(local) == data,
              "%s: symlink %r" % (path, os.readlink(local) if stat.S_ISLNK(st.st_mode) else st))
    elif kind == "dir":
        check(stat.S_ISDIR(st.st_mode), "%s: not a dir" % path)
        check(stat.S_IMODE(st.st_mode) == mode, "%s: mode %o, want %o" % (path, st.st_mode, mode))
        check(int(st.st_mtime) == mtime, "%s: mtime %d, want %d" % (path, st.st_mtime, mtime))
    else:
        check(stat.S_ISREG(st.st_mode), "%s: not a file" % path)
        with open(local, "rb") as f:
            check(f.read() == data, "%s: content differs" % path)
        check(stat.S_IMODE(st.st_mode) == mode & 0o777,
              "%s: mode %o, want %o (set-id dropped)" % (path, stat.S_IMODE(st.st_mode), mode & 0o777))
        check(int(st.st_mtime) == mtime, "%s: mtime %d, want %d" % (path, st.st_mtime, mtime))
    copied += 1
check(os.path.isfile(os.path.join(dest, "evil", FILES_LONG)), "255-byte name not copied")
check(r["files"] + r["dirs"] + r["symlinks"] == copied, "counts %s, checked %d" % (r, copied))
check(not os.path.lexists(ESCAPED), "something was written at %s" % ESCAPED)
check(sorted(os.listdir(dest)) == ["docs", "escape", "evil", "modes"], "dest holds %s" % os.listdir(dest))
log("PASS get of 4 directories/symlinks: contents, modes (set-uid dropped), mtimes, symlinks "
    "as symlinks, unsafe names skipped and reported")

# 2. Recover a file deleted after the first point; a guest symlink to /etc
#    resolves in the guest (which has no /etc/passwd), not in the
#    appliance (which has one).
dest2 = os.path.join(w, "dest2")
os.mkdir(dest2)
p = qbak("get", *common, "--point", P1, "--fs", "1", "/docs/gone.txt", "/escape/passwd",
         "--output", dest2, check_rc=False)
check(p.returncode == 1 and "passwd" in p.stderr, "get /escape/passwd: %d %s" % (p.returncode, p.stderr))
with open(os.path.join(dest2, "gone.txt"), "rb") as f:
    check(f.read() == truth["/docs/gone.txt"][2], "recovered gone.txt differs")
check(stat.S_IMODE(os.stat(os.path.join(dest2, "gone.txt")).st_mode) == 0o600, "gone.txt mode")
check(sorted(os.listdir(dest2)) == ["gone.txt"], "dest2 holds %s" % os.listdir(dest2))
log("PASS get recovers a deleted file from an older point; /escape/passwd not found in the guest")

# 3. A symlink planted in the destination is never written through.
dest3 = os.path.join(w, "dest3")
os.mkdir(dest3)
os.symlink(victim, os.path.join(dest3, "b.txt"))
p = qbak("get", *common, "--point", P3, "--fs", "1", "/docs/sub/b.txt", "--output", dest3,
         check_rc=False)
check(p.returncode == 1 and "exists" in p.stderr.lower(), "planted symlink: %d %s" % (p.returncode, p.stderr))
check(snapshot(outside) == outside_before, "files outside DEST changed")
with open(victim) as f:
    check(f.read() == "precious\n", "victim overwritten")
log("PASS a symlink planted in DEST is not followed; nothing outside DEST changed")

check_repo_unchanged(before, tree_hashes(repo), new_ok=())
log("PASS repository byte-identical")
shutil.rmtree(w, ignore_errors=True)

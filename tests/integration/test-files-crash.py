#!/usr/bin/env python3
"""File-level access to crash-consistent points: what qbak shows is what
the guest would see after journal recovery.

The real Linux test guest (scripts/build-test-guest.sh) writes files into
its mounted ext4 data disk, fsyncing each and logging it in /w/DONE-log.
Two qbak points are taken without the guest agent (crash-consistent: the
journal holds transactions not yet written home), the second an
incremental on top of the first.  The oracle is a restored copy whose
journal e2fsck replays on the host: qbak ls of /w and qbak get of
/w/DONE-log must match it exactly, and every file listed there verifies.
debugfs on the unreplayed copy shows the stale view a mount with the
journal ignored (noload) would give; it is logged for comparison.  The
repository stays byte-identical."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

image = need_guest_image()
w = workdir("files-crash")
repo = os.path.join(w, "repo")
g = Guest(w, make_guest_disk(os.path.join(w, "data.qcow2")), image)


def files_done():
    a = g.agent()
    try:
        pid = a.cmd("guest-exec", path="/bin/sh", arg=["-c", "wc -l < /data/w/DONE-log"],
                    **{"capture-output": True})["pid"]
        for _ in range(200):
            st = a.cmd("guest-exec-status", pid=pid)
            if st.get("exited"):
                import base64
                return int(base64.b64decode(st.get("out-data", "MA==")).decode().strip() or 0)
            time.sleep(0.05)
        fail("guest-exec did not finish")
    finally:
        a.close()


def wait_files(n, limit=600):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if files_done() >= n:
            return
        time.sleep(0.5)
    fail("the guest's writer did not reach %d files" % n)


points = []
try:
    wait_files(5)
    for target in (5, 25):
        wait_files(target)
        res = qbak_json("backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "g1")
        check(res["consistency"] == "crash", "crash-consistent point expected: %s" % res)
        points.append(res["point"])
finally:
    g.kill()
P1, P2 = points
man = json.load(open(os.path.join(repo, "g1", P2, "manifest.json")))
check(man["disks"][0]["type"] == "incremental", "second point incremental: %s" % man["disks"][0])
before = tree_hashes(repo)

# The oracle: P2 restored, its journal replayed by e2fsck on the host.
raw = os.path.join(w, "p2.raw")
qbak("restore", "--repo", repo, "--vm", "g1", "--disk", "vd0", "--point", P2, "--output", raw)
hdr = run(["dumpe2fs", "-h", raw]).stdout
check("needs_recovery" in hdr, "P2 should need journal recovery (crash-consistent): %s" % hdr)
stale = run(["debugfs", "-R", "cat /w/DONE-log", raw]).stdout
fixed = os.path.join(w, "p2-fixed.raw")
run(["cp", "--sparse=always", raw, fixed])
p = run(["e2fsck", "-fy", fixed], check_rc=False)
check(p.returncode in (0, 1), "e2fsck -fy: %d %s" % (p.returncode, p.stdout))
truth_log = run(["debugfs", "-R", "cat /w/DONE-log", fixed]).stdout
listing = run(["debugfs", "-R", "ls -p /w", fixed]).stdout
truth = {}
for line in listing.splitlines():
    f = line.strip("/").split("/")
    # ls -p: /inode/mode/uid/gid/name/size/
    if len(f) >= 6 and f[4] not in (".", ".."):
        truth[f[4]] = int(f[5]) if f[5] else 0
log("journal: %d DONE-log lines without replay, %d after" %
    (len(stale.splitlines()), len(truth_log.splitlines())))

t = time.monotonic()
r = qbak_json("ls", "--repo", repo, "--vm", "g1", "/w")
log("qbak ls: %.1f s" % (time.monotonic() - t))
check(r["point"] == P2 and r["fs"] == "disk", "ls defaults to P2's whole-disk ext4: %s" % r)
got = {e["name"]: e["size"] for e in r["entries"]}
check(got == truth, "ls /w differs from the replayed journal's view:\n got %s\nwant %s"
      % (sorted(got.items())[-5:], sorted(truth.items())[-5:]))
log("PASS ls of a crash-consistent point = the file system after journal recovery (%d files)"
    % len(got))

p = subprocess.run([QBAK, "get", "--repo", repo, "--vm", "g1", "--output", "-", "/w/DONE-log"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
check(p.returncode == 0, "get DONE-log: %s" % p.stderr)
check(p.stdout.decode() == truth_log, "DONE-log differs from the recovered one")
done = p.stdout.decode().split()
check(len(done) >= 25, "DONE-log holds %d entries" % len(done))
for n in done[-256:]:
    check(got.get(n) == 65536, "listed file %s: %s" % (n, got.get(n)))
log("PASS get of a crash-consistent point = the file after recovery; every logged file present")

check_repo_unchanged(before, tree_hashes(repo), new_ok=())
log("PASS repository byte-identical")
shutil.rmtree(w, ignore_errors=True)

#!/usr/bin/env python3
"""File-level access: qbak mount and umount on real qbak points.

The points of tests/lib/qbaktest.py files_points().  mount returns once the
mount point shows the point read-only (the kernel's mount says ro, writes
fail); the tree under it is the truth of that point; while it is mounted
a backup of the VM still runs (the reader takes the browse lock, not the
chain's); umount ends the serving process.  get --output - writes one
file to standard output.  The repository stays byte-identical."""
import os
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
if not os.path.exists("/dev/fuse"):
    log("SKIP: no /dev/fuse")
    sys.exit(SKIP)
w = workdir("files-mount")
repo, points, truths, parts = files_points(w)
P1, P2, P3 = points
before = tree_hashes(repo)
common = ["--repo", repo, "--vm", "vm1"]
mnt = os.path.join(w, "mnt")
os.mkdir(mnt)
mounted = False
try:
    t = time.monotonic()
    r = qbak_json("mount", *common, "--point", P2, "--fs", "1", mnt)
    mounted = True
    log("qbak mount: %.1f s" % (time.monotonic() - t))
    check(r["point"] == P2 and r["fs"] == "1", "mount %s" % r)
    line = [l.split() for l in open("/proc/mounts") if l.split()[1] == mnt]
    check(line and "ro" in line[0][3].split(","), "kernel mount of %s: %s" % (mnt, line))
    check(os.stat(mnt).st_dev != os.stat(w).st_dev, "nothing mounted")
    truth = truths[1]
    seen = set()
    for root, dirs, files in os.walk(mnt):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = "/" + os.path.relpath(p, mnt)
            if rel.startswith("/lost+found"):
                continue
            seen.add(rel)
            check(rel in truth, "%r not in the truth of P2" % rel)
            kind, mode, data, mtime = truth[rel]
            st = os.lstat(p)
            if kind == "symlink":
                check(os.readlink(p) == data, "%s: target" % rel)
            elif kind == "file":
                with open(p, "rb") as f:
                    check(f.read() == data, "%s: content" % rel)
                check(stat.S_IMODE(st.st_mode) == mode, "%s: mode %o" % (rel, st.st_mode))
                check(int(st.st_mtime) == mtime, "%s: mtime" % rel)
    check(seen == set(truth), "missing under the mount: %s" % (set(truth) - seen))
    try:
        open(os.path.join(mnt, "docs", "x"), "w").close()
        fail("a write into the mount succeeded")
    except OSError:
        pass
    log("PASS mount shows P2 read-only, the whole tree as the truth")

    # The reader does not hold off backups.
    vmw = os.path.join(w, "vm2")
    os.mkdir(vmw)
    disk = os.path.join(vmw, "disk.qcow2")
    run([QEMU_IMG, "convert", "-q", "-O", "qcow2", os.path.join(repo, "vm1", P3, "vd0.qcow2"), disk])
    vm = VM(vmw, [("vd0", disk, "qcow2")])
    try:
        res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")
        check(res["point"] > P3, "backup during mount: %s" % res)
    finally:
        vm.stop()
    log("PASS a backup runs while a point is mounted")
finally:
    if mounted:
        p = qbak("umount", mnt, check_rc=False)
        if p.returncode != 0:
            subprocess.run(["fusermount3", "-u", mnt])
            fail("umount: %s" % p.stderr)
check(os.stat(mnt).st_dev == os.stat(w).st_dev, "still mounted")
check(r.get("pid") and not os.path.exists("/proc/%d/cmdline" % r["pid"])
      or open("/proc/%d/stat" % r["pid"]).read().split(") ")[1][0] == "Z",
      "the serving process %s still runs" % r.get("pid"))
log("PASS umount ended the serving process")

p = subprocess.run([QBAK, "get", *common, "--point", P2, "--fs", "1", "--output", "-", "/docs/a.txt"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
check(p.returncode == 0 and p.stdout == truths[1]["/docs/a.txt"][2],
      "get --output -: %d %r %s" % (p.returncode, p.stdout, p.stderr))
log("PASS get --output - writes the file to standard output")

after = tree_hashes(repo)
for f, h in before.items():
    check(after.get(f) == h, "repository file changed: %s" % f)
# (new files: the backup's point and the lock files)
log("PASS repository byte-identical (a new point was added by the backup)")
shutil.rmtree(w, ignore_errors=True)

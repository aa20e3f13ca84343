#!/usr/bin/env python3
"""File-level access: qbak ls on real qbak points.

A GPT disk (ext4, xfs, LVM with ext4; made with guestfish, whose appliance
has device-mapper) is attached to a real QEMU; three qbak points are taken
while its first file system goes from state A to B (a file changed, one
deleted, one added) to C (one more added), written through the device
(tests/lib/qbaktest.py files_points()).  ls lists the disk's file systems,
and a directory of the middle point matches the truth (names, types,
sizes, modes, mtimes, symlink targets); a disk holding an operating
system is shown as the guest sees it (fstab mounts joined under /);
repository files stay byte-identical."""
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


# ls without PATH on a disk of several file systems lists them (newest
# point, the only disk by default).
r = timed("ls", *common)
check(r["point"] == P3 and r["disk"] == "vd0", "ls defaults: %s" % r)
fss = {f["fs"]: f for f in r["filesystems"]}
check(sorted(fss) == ["1", "2", "vg0/lv0"],
      "file systems %s (LVM vg0/lv0 must show: the appliance has device-mapper)" % sorted(fss))
check(fss["1"]["type"] == "ext4" and fss["1"]["label"] == "data", "fs 1: %s" % fss["1"])
check(fss["2"]["type"] == "xfs" and fss["2"]["label"] == "xdata", "fs 2: %s" % fss["2"])
check(fss["vg0/lv0"]["type"] == "ext4", "vg0/lv0: %s" % fss["vg0/lv0"])
check(fss["1"]["size"] == parts[0]["size"] * 512, "fs 1 size %s" % fss["1"]["size"])
log("PASS ls lists ext4, xfs and LVM (vg0/lv0) file systems")


def children(truth, d):
    pre = d.rstrip("/") + "/"
    return {p[len(pre):]: v for p, v in truth.items()
            if p.startswith(pre) and "/" not in p[len(pre):]}


def check_entries(entries, truth, d):
    want = children(truth, d)
    got = {e["name"]: e for e in entries}
    check(sorted(got) == sorted(want), "%s: names %s, want %s" % (d, sorted(got), sorted(want)))
    for name, (kind, mode, data, mtime) in want.items():
        e = got[name]
        check(e["type"] == kind, "%s/%s: type %s, want %s" % (d, name, e["type"], kind))
        if kind == "file":
            check(e["size"] == len(data), "%s/%s: size %d, want %d" % (d, name, e["size"], len(data)))
            check(e["mode"] == "%04o" % mode, "%s/%s: mode %s, want %04o" % (d, name, e["mode"], mode))
        if kind == "symlink":
            check(e.get("target") == data, "%s/%s: target %r" % (d, name, e.get("target")))
        if kind != "symlink":
            want_t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
            check(e["mtime"] == want_t, "%s/%s: mtime %s, want %s" % (d, name, e["mtime"], want_t))


# ls of a directory of the middle point, JSON against the truth.
r = timed("ls", *common, "--point", P2, "--fs", "1", "/docs")
check(r["point"] == P2 and r["fs"] == "1" and r["path"] == "/docs", "ls header %s" % r)
check_entries(r["entries"], truths[1], "/docs")
log("PASS ls --point P2 /docs matches state B (a.txt changed, gone.txt gone, new.txt added)")


# A disk holding an operating system is shown as the guest sees it: its
# root with the file systems of its /etc/fstab mounted (here /srv).
osw = os.path.join(w, "os")
os.mkdir(osw)
osdisk = os.path.join(osw, "os.qcow2")
run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", files_os_fixture(), osdisk])
vm = VM(osw, [("vd0", osdisk, "qcow2")])
try:
    qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "osvm")
finally:
    vm.stop()
before.update({k: v for k, v in tree_hashes(repo).items() if k.startswith("osvm/")})
r = timed("ls", "--repo", repo, "--vm", "osvm", "/srv")
check(r["fs"] == "os" and r["path"] == "/srv", "OS view: %s" % r)
got = {e["name"]: e for e in r["entries"] if e["name"] != "lost+found"}
check(sorted(got) == ["hello.txt"] and got["hello.txt"]["size"] == len(FILES_OS_SRV["/hello.txt"][2]),
      "/srv of the OS view: %s" % sorted(got))
log("PASS ls of an operating-system disk joins its fstab mounts under / (/srv from partition 2)")

check_repo_unchanged(before, tree_hashes(repo), new_ok=())
log("PASS repository byte-identical")
shutil.rmtree(w, ignore_errors=True)

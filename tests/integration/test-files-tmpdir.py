#!/usr/bin/env python3
"""File-level access: the overlay directory a killed qbak leaves behind.

qbak writes a launch's throwaway overlays into $TMPDIR/qbak-files-XXXXXX
and removes them once the appliance holds them open, so a qbak killed in
between (the launch takes seconds) leaves the directory.  Each holds an
owner file locked while its process lives; the next qbak removes every
such directory whose lock it can take.  Here, with TMPDIR a directory of
the test:
  - a real `qbak ls` is killed (SIGKILL) as soon as its directory exists:
    the directory stays;
  - made by hand: a stale directory (owner file unlocked, overlays), a
    live one (owner file locked by this test), one holding a file qbak
    never writes, an old one without an owner file and a fresh one
    without;
  - the next `qbak ls` works and removes the killed one and the stale
    ones, keeps the live one, the foreign file (with its directory) and
    the fresh unowned one, and leaves no directory of its own."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("files-tmpdir")
top = os.path.join(w, "tree")
os.makedirs(os.path.join(top, "d"))
with open(os.path.join(top, "d", "f.txt"), "w") as f:
    f.write("hello\n")
raw = os.path.join(w, "d.raw")
run(["mkfs.ext4", "-q", "-F", "-d", top, raw, "16M"])
disk = os.path.join(w, "d.qcow2")
run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, disk])
os.unlink(raw)
repo = os.path.join(w, "repo")
vm = VM(w, [("vd0", disk, "qcow2")])
try:
    qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "t")
finally:
    vm.stop()

tmp = os.path.join(w, "tmp")
os.mkdir(tmp)
env = dict(os.environ)
# libguestfs caches its appliance under LIBGUESTFS_CACHEDIR, else TMPDIR:
# keep the cache where it is
env.setdefault("LIBGUESTFS_CACHEDIR", os.environ.get("TMPDIR", "/var/tmp"))
env["TMPDIR"] = tmp
ls_cmd = [QBAK, "ls", "--repo", repo, "--vm", "t", "/d", "--json"]


def ours():
    return sorted(n for n in os.listdir(tmp) if n.startswith("qbak-files-"))


# A qbak killed between writing its overlays and the end of the launch.
p = subprocess.Popen(ls_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
killed = None
deadline = time.monotonic() + 600  # a hang guard only
while p.poll() is None and time.monotonic() < deadline:
    got = [n for n in ours() if os.path.exists(os.path.join(tmp, n, ".owner"))]
    if got:
        p.send_signal(signal.SIGKILL)
        killed = got[0]
        break
    time.sleep(0.005)
p.wait()
check(killed is not None, "never saw qbak's overlay directory (rc %s)" % p.returncode)
time.sleep(0.5)
check(os.path.isdir(os.path.join(tmp, killed)), "the killed qbak's directory should be left")
log("PASS a qbak killed before its launch ended leaves %s (%s)"
    % (killed, sorted(os.listdir(os.path.join(tmp, killed)))))


def mkdir(name, files, owner=True):
    d = os.path.join(tmp, name)
    os.mkdir(d)
    for f in files + ([".owner"] if owner else []):
        with open(os.path.join(d, f), "wb") as fh:
            fh.write(b"x")
    return d


stale = mkdir("qbak-files-dead00", ["overlay0.qcow2", "overlay12.qcow2"])
live = mkdir("qbak-files-live00", ["overlay0.qcow2"])
foreign = mkdir("qbak-files-othr00", ["overlay0.qcow2", "keep.txt"])
old = mkdir("qbak-files-old000", ["overlay0.qcow2"], owner=False)
two_hours_ago = time.time() - 7200
os.utime(old, (two_hours_ago, two_hours_ago))
fresh = mkdir("qbak-files-new000", [], owner=False)
lock = open(os.path.join(live, ".owner"), "rb")
fcntl.flock(lock, fcntl.LOCK_EX)

r = run(ls_cmd, env=env)
names = [e["name"] for e in json.loads(r.stdout)["entries"]]
check(names == ["f.txt"], "ls after the kill: %s" % names)
left = ours()
check(killed not in left, "the killed qbak's directory is still there: %s" % left)
check(not os.path.exists(stale), "stale directory kept: %s" % left)
check(not os.path.exists(old), "old unowned directory kept: %s" % left)
check(sorted(os.listdir(live)) == [".owner", "overlay0.qcow2"], "live directory touched")
check(sorted(os.listdir(foreign)) == ["keep.txt"], "foreign directory: %s" % os.listdir(foreign))
check(os.path.isdir(fresh), "fresh unowned directory removed")
check(left == ["qbak-files-live00", "qbak-files-new000", "qbak-files-othr00"],
      "qbak left a directory of its own: %s" % left)
log("PASS the next qbak removes the killed and stale directories, keeps a live one, "
    "a foreign file and a fresh unowned one, and leaves none of its own")
fcntl.flock(lock, fcntl.LOCK_UN)
lock.close()
shutil.rmtree(w, ignore_errors=True)

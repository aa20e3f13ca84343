#!/usr/bin/env python3
"""Repository and runtime safety: one backup per VM chain at a time (a
second backup, or a restore, fails fast and leaves the first untouched);
planted symlinks, world-writable directories and a monitor socket owned by
another user are refused with a clear error; files are created 0640 and
directories 0750, less the umask."""
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("safety")
SIZE = 16 << 20
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2")])
repo = os.path.join(w, "repo")


def must_fail(args, words, env=None, rc=1):
    p = qbak(*args, check_rc=False, env=env)
    check(p.returncode == rc, "%s should fail with %d: rc %d %s"
          % (args[0], rc, p.returncode, p.stderr))
    for word in words:
        check(word in p.stderr, "error mentions %r: %s" % (word, p.stderr))
    check(len(p.stderr.strip().splitlines()) == 1, "one-line error: %r" % p.stderr)
    return p.stderr


def backup_args(r=None, vmname="vm1", qmp=None):
    return ["backup", "--qmp", qmp or vm.qbak_sock, "--repo", r or repo, "--vm", vmname]


try:
    vm.io("vd0", "write -P 0x61 0 %d" % SIZE)
    old_umask = os.umask(0o022)
    first = qbak_json(*backup_args())
    os.umask(old_umask)

    # Modes: 0750 directories, 0640 files (umask 022 takes nothing off).
    vmdir = os.path.join(repo, "vm1")
    pdir = os.path.join(vmdir, first["point"])
    check(stat.S_IMODE(os.stat(vmdir).st_mode) == 0o750, "vm dir mode")
    check(stat.S_IMODE(os.stat(pdir).st_mode) == 0o750, "point dir mode")
    for f in ("manifest.json", "vd0.qcow2"):
        check(stat.S_IMODE(os.stat(os.path.join(pdir, f)).st_mode) == 0o640, "%s mode" % f)
    # ... and the umask is respected.
    p = subprocess.run(["sh", "-c", "umask 077 && exec \"$@\"", "sh", QBAK]
                       + backup_args(vmname="vm2") + ["--json"],
                       capture_output=True, text=True)
    check(p.returncode == 0, "backup with umask 077: %s" % p.stderr)
    pdir2 = os.path.join(repo, "vm2", json.loads(p.stdout)["point"])
    check(stat.S_IMODE(os.stat(pdir2).st_mode) == 0o700, "umask 077 dir")
    check(stat.S_IMODE(os.stat(os.path.join(pdir2, "vd0.qcow2")).st_mode) == 0o600, "umask 077 file")

    # One backup per chain: a second backup and a restore fail fast while
    # the first runs (slowed), and the first is untouched.
    vm.io("vd0", "write -P 0x62 0 %d" % SIZE)
    ref = vm.reference("vd0", os.path.join(w, "ref.raw"))
    slow = subprocess.Popen([QBAK] + backup_args() + ["--full", "--speed", str(4 << 20), "--json",
                                                      "--mode", "push"],  # a job to watch
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not vm.jobs():
        check(time.time() < deadline and slow.poll() is None, "first backup never started")
        time.sleep(0.02)
    # Busy is exit status 75 (try again), and "at once" means while the
    # first is still running, whatever the machine's load.
    must_fail(backup_args(), ["busy", "another qbak"], rc=75)
    must_fail(["restore", "--repo", repo, "--vm", "vm1", "--disk", "vd0",
               "--output", os.path.join(w, "r.raw")], ["busy", "another qbak"], rc=75)
    check(slow.poll() is None, "the second ones fail without waiting for the first")
    check(qbak_json("list", "--repo", repo, "--vm", "vm1")["points"], "list works meanwhile")
    # --wait: a restore that waits for the lock runs once the backup ends.
    waiting = subprocess.Popen([QBAK, "restore", "--repo", repo, "--vm", "vm1", "--disk", "vd0",
                                "--wait", "600", "--output", os.path.join(w, "w.raw")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = slow.communicate(timeout=600)
    wout, werr = waiting.communicate(timeout=600)
    check(waiting.returncode == 0, "restore --wait ran after the backup: %s" % werr)
    check(slow.returncode == 0, "the first backup is untouched: %s" % err)
    img_compare(os.path.join(vmdir, json.loads(out)["point"], "vd0.qcow2"), ref, fmt_a="qcow2")

    # A planted symlink where the VM directory should be.
    elsewhere = os.path.join(w, "elsewhere")
    os.mkdir(elsewhere)
    os.symlink(elsewhere, os.path.join(repo, "vm3"))
    must_fail(backup_args(vmname="vm3"), ["symlink"])
    check(os.listdir(elsewhere) == [], "nothing written through the symlink")
    # The repository root may be a symlink the user chose.
    link = os.path.join(w, "repo-link")
    os.symlink(repo, link)
    check(qbak_json("list", "--repo", link, "--vm", "vm1")["points"], "root symlink allowed")

    # World-writable repository or VM directory.
    os.chmod(repo, 0o777)
    must_fail(backup_args(), ["world-writable"])
    os.chmod(repo, 0o750)
    os.chmod(vmdir, 0o777)
    must_fail(backup_args(), ["world-writable"])
    os.chmod(vmdir, 0o750)

    # A monitor socket owned by another (unprivileged) user.
    if os.geteuid() == 0:
        fake = os.path.join(w, "fake.qmp")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(fake)
        srv.listen(1)
        os.chown(fake, 65534, 65534)
        must_fail(backup_args(qmp=fake), ["owned by uid 65534"])
        srv.close()
    # After all that, the chain is intact and the next backup is right.
    oracle(vm, repo, "vm1", run_state=vm.qmp.cmd("query-status")["status"])
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: locks, symlinks, permissions, foreign sockets")

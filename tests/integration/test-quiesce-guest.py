#!/usr/bin/env python3
"""Consistent guests, with a real Linux guest running qemu-ga and a writer
on an ext4 data disk (scripts/build-test-guest.sh): backups while it
writes are filesystem-consistent (the freeze really happened, its window is
measured, the restored disk needs no journal replay, passes e2fsck -fn and
every completed file verifies); the guest is thawed afterwards and keeps
writing; qbak killed between freeze and thaw is cleaned up by the next run;
a guest frozen by someone else is left to them and the point is labelled
crash-consistent."""
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

image = need_guest_image()
w = workdir("quiesce-guest")
repo = os.path.join(w, "repo")
VERIFY = os.path.join(ROOT, "scripts", "verify-guest-data.sh")
g = Guest(w, make_guest_disk(os.path.join(w, "data.qcow2")), image)


def status():
    return g.agent_do(lambda a: a.cmd("guest-fsfreeze-status"))


def files_done():
    def count(a):
        pid = a.cmd("guest-exec", path="/bin/sh", arg=["-c", "wc -l < /data/w/DONE-log"],
                    **{"capture-output": True})["pid"]
        for _ in range(100):
            st = a.cmd("guest-exec-status", pid=pid)
            if st.get("exited"):
                import base64
                return int(base64.b64decode(st.get("out-data", "MA==")).decode().strip() or 0)
            time.sleep(0.05)
        fail("guest-exec did not finish")
    return g.agent_do(count)


def backup(*extra, env=None):
    return qbak_json("backup", "--qmp", g.qbak_sock, "--qga", g.qga_sock,
                     "--repo", repo, "--vm", "g1", *extra, env=env)


def verify(point, clean=True):
    out = os.path.join(w, "restored.raw")
    qbak("restore", "--repo", repo, "--vm", "g1", "--disk", "vd0", "--point", point,
         "--output", out, "--force")
    p = run([VERIFY] + (["--clean"] if clean else []) + [out], check_rc=False)
    check(p.returncode == 0, "restored data of %s: %s%s" % (point, p.stdout, p.stderr))
    os.unlink(out)


try:
    check(status() == "thawed", "guest starts thawed")
    n0 = files_done()
    time.sleep(1)
    check(files_done() > n0, "the guest's writer runs")

    for i in range(3):
        res = backup()
        fr = res["freeze"]
        check(res["consistency"] == "filesystem", "frozen point: %s" % res)
        check(fr["filesystems"] >= 1 and fr["warning"] is None, "freeze: %s" % fr)
        check(isinstance(fr["window_ms"], float) and fr["window_ms"] > 0, "window: %s" % fr)
        check(status() == "thawed", "thawed after backup %d" % i)
        m = json.load(open(os.path.join(repo, "g1", res["point"], "manifest.json")))
        check(m["consistency"] == "filesystem" and m["freeze"]["filesystems"] >= 1,
              "manifest records it: %s" % m)
        n = files_done()
        time.sleep(1)
        check(files_done() > n, "the guest keeps writing after backup %d" % i)
        verify(res["point"])
        log("backup %d: %d file systems frozen for %.1f ms" % (i, fr["filesystems"], fr["window_ms"]))

    # Killed between freeze and thaw: the guest stays frozen until the next
    # run, which thaws it first -- with --qga, and without (the marker
    # names the agent socket).
    for again_with_qga in (True, False):
        env = dict(os.environ, QBAK_CRASH_AT="frozen")
        p = subprocess.run([QBAK, "backup", "--qmp", g.qbak_sock, "--qga", g.qga_sock,
                            "--repo", repo, "--vm", "g1"], env=env,
                           capture_output=True, text=True, timeout=120)
        check(p.returncode == -9, "killed at the freeze: %d %s" % (p.returncode, p.stderr))
        check(status() == "frozen", "a killed run leaves the guest frozen")
        check(os.path.exists(os.path.join(repo, "g1", ".freeze-pending")), "marker")
        if again_with_qga:
            res = backup()
        else:
            res = qbak_json("backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "g1")
            check(res["consistency"] == "crash" and res["freeze"] is None, "no --qga: %s" % res)
        check([r for r in res["recovered"] if "thawed" in r], "recovery thawed it: %s" % res)
        check(status() == "thawed", "thawed by the next run")
        check(not os.path.exists(os.path.join(repo, "g1", ".freeze-pending")), "marker gone")
        verify(res["point"], clean=again_with_qga)

    # Frozen by someone else: not ours to thaw; crash-consistent, warned.
    before = list_points(repo, "g1")
    g.agent_do(lambda a: a.cmd("guest-fsfreeze-freeze"))
    p = qbak("backup", "--qmp", g.qbak_sock, "--qga", g.qga_sock, "--quiesce", "require",
             "--repo", repo, "--vm", "g1", check_rc=False)
    check(p.returncode == 1 and "someone else" in p.stderr, "require fails: %s" % p.stderr)
    check(list_points(repo, "g1") == before and g.jobs() == [], "nothing started")
    res = backup()
    check(res["consistency"] == "crash" and "someone else" in res["freeze"]["warning"],
          "auto goes on crash-consistent: %s" % res)
    check(status() == "frozen", "qbak did not thaw someone else's freeze")
    g.agent_do(lambda a: a.cmd("guest-fsfreeze-thaw"))
    check(status() == "thawed", "thawed by its owner")
finally:
    g.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: frozen points verify, the guest is always thawed")

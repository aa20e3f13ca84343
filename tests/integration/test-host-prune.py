#!/usr/bin/env python3
"""qbak run prunes each VM after its point by the VM's keep-* rules
([defaults] inherited, a VM's own overriding), and a VM whose repository
is locked by a running prune is reported busy (FAILING in status) while
the others succeed, then backed up by the next run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
if run([QBAK, "prune", "--help"], check_rc=False).returncode != 0:
    log("SKIP: this qbak has no prune command")
    sys.exit(SKIP)
w = workdir("host-prune")
repo = os.path.join(w, "repo")
SIZE = 16 << 20
vms = {}


def run_json(*args, expect):
    p = qbak(*(list(args) + ["--json"]), check_rc=False)
    check(p.returncode == expect, "qbak %s exited %d, expected %d: %s %s"
          % (" ".join(args), p.returncode, expect, p.stdout, p.stderr))
    return {v["vm"]: v for v in json.loads(p.stdout)["vms"]}


def stopped(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


try:
    for n in ("a", "b"):
        d = os.path.join(w, n)
        os.mkdir(d)
        vms[n] = VM(d, [("vd0", make_disk(os.path.join(d, "vd0.qcow2"), SIZE), "qcow2")])
    conf = os.path.join(w, "qbak.conf")
    with open(conf, "w") as f:
        f.write("[defaults]\nrepo = %s\nrpo = 1h\nkeep-last = 2\n\n" % repo)
        f.write("[vm a]\nqmp = %s\n\n[vm b]\nqmp = %s\nkeep-last = 1\n"
                % (vms["a"].qbak_sock, vms["b"].qbak_sock))
    rng = random.Random(7)
    for i in range(3):
        refs = {}
        for n, vm in vms.items():
            random_writes(vm, "vd0", SIZE, rng, 8)
            refs[n] = vm.reference("vd0", os.path.join(w, "ref-%s.raw" % n))
        v = run_json("run", "--config", conf, "--all", expect=0)
        for n in vms:
            check(v[n]["outcome"] == "ok" and v[n]["prune"], "%s: %s" % (n, v[n]))
            out = os.path.join(w, "restore.raw")
            qbak("restore", "--repo", repo, "--vm", n, "--disk", "vd0", "--output", out,
                 "--force")
            img_compare(out, refs[n], fmt_a="raw")
        check(len(list_points(repo, "a")) == min(i + 1, 2), "a keeps 2: %s" % list_points(repo, "a"))
        check(len(list_points(repo, "b")) == 1, "b keeps 1: %s" % list_points(repo, "b"))

    # A prune of a, stopped while it merges, holds a's lock.
    p = subprocess.Popen([QBAK, "prune", "--repo", repo, "--vm", "a", "--keep-last", "1"],
                         env=dict(os.environ, QBAK_CRASH_AT="prune-merging:stop"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not stopped(p.pid):
        if p.poll() is not None:
            fail("the prune ended: %s" % (p.communicate(),))
        check(time.time() < deadline, "the prune never reached prune-merging")
        time.sleep(0.05)
    v = run_json("run", "--config", conf, "--all", expect=1)
    check(v["a"]["outcome"] == "busy" and v["a"]["exit_status"] == 75, "a: %s" % v["a"])
    check(v["b"]["outcome"] == "ok", "b: %s" % v["b"])
    p2 = qbak("status", "--config", conf, "--json", check_rc=False)
    st = {x["vm"]: x for x in json.loads(p2.stdout)["vms"]}
    check(p2.returncode == 1 and st["a"]["state"] == "FAILING" and st["b"]["state"] == "OK",
          "status: %s" % st)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    check(p.returncode == 0, "the prune, resumed: %d %s" % (p.returncode, err))
    v = run_json("run", "--config", conf, expect=0)
    check(v["a"]["outcome"] == "ok" and v["b"]["outcome"] == "not-due", "next run: %s" % v)
finally:
    for vm in vms.values():
        vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: run prunes by each VM's rules; a VM locked by a running prune is busy, then retried")

#!/usr/bin/env python3
"""Guest agent faults with scripted fake agents (a real QEMU on the QMP
side): no socket, a socket nobody answers, an agent that never answers the
freeze, one that answers after the timeout, an error reply, garbage and a
huge line before the sync reply, an agent that disconnects mid-call.  In
each, --quiesce auto goes on crash-consistent and says so, --quiesce
require fails before any job starts, and the guest is never left frozen."""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403
from fake.fake_qga import FakeQGA  # noqa: E402

require_qemu()
w = workdir("quiesce-faults")
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), 8 << 20), "qcow2")])
vm.io("vd0", "write -P 0x31 0 1M")
repo = os.path.join(w, "repo")
sock = os.path.join(w, "fake-qga.sock")
TIMEOUT = 2


def backup(mode):
    return qbak("backup", "--qmp", vm.qbak_sock, "--qga", sock, "--quiesce", mode,
                "--timeout", TIMEOUT, "--repo", repo, "--vm", "vm1", "--json",
                check_rc=False)


CASES = [
    # behaviour, words in the warning/error, consistency under auto
    ("absent", ["connect"], "crash"),
    ("silent", ["guest-sync-delimited"], "crash"),
    ("freeze-hangs", ["guest-fsfreeze-freeze", "no reply"], "crash"),
    ("freeze-late", ["guest-fsfreeze-freeze", "no reply"], "crash"),
    ("error", ["fsfreeze is disabled"], "crash"),
    ("garbage", [], "filesystem"),
    ("disconnect", ["guest-fsfreeze-freeze"], "crash"),
]
try:
    for behaviour, words, consistency in CASES:
        for mode in ("auto", "require"):
            fake = None if behaviour == "absent" else FakeQGA(sock, behaviour, delay=TIMEOUT + 1)
            before = list_points(repo, "vm1")
            t0 = time.time()
            p = backup(mode)
            took = time.time() - t0
            name = "%s/%s" % (behaviour, mode)
            check(took < 4 * TIMEOUT + 10, "%s: bounded by the timeouts (%.1fs)" % (name, took))
            if mode == "auto" or behaviour == "garbage":
                check(p.returncode == 0, "%s: backup goes on: %s" % (name, p.stderr))
                res = json.loads(p.stdout)
                check(res["consistency"] == consistency, "%s: %s" % (name, res))
                warn = res["freeze"]["warning"] or ""
                for word in words:
                    check(word in warn, "%s: warning names %r: %r" % (name, word, warn))
                if words:
                    check(any("crash-consistent" in x for x in res["warnings"]),
                          "%s: the warnings list says so: %s" % (name, res["warnings"]))
            else:
                check(p.returncode == 1, "%s: require fails: %s" % (name, p.stderr))
                check(len(p.stderr.strip().splitlines()) == 1, "%s: one line: %r" % (name, p.stderr))
                for word in words:
                    check(word in p.stderr, "%s: error names %r: %s" % (name, word, p.stderr))
                check(list_points(repo, "vm1") == before, "%s: nothing listed" % name)
            check(vm.jobs() == [], "%s: no job left" % name)
            if fake:
                fake.close()
                if behaviour == "disconnect":
                    # The agent went away frozen: the marker makes the next
                    # run thaw it once the agent is back.
                    check(fake.state == "frozen", "%s: fake froze" % name)
                    check(os.path.exists(os.path.join(repo, "vm1", ".freeze-pending")), "marker")
                    fake = FakeQGA(sock, "normal", state="frozen")
                    p = backup("auto")
                    check(p.returncode == 0, "%s: next run: %s" % (name, p.stderr))
                    res = json.loads(p.stdout)
                    check([r for r in res["recovered"] if "thawed" in r], "%s: %s" % (name, res))
                    check(res["consistency"] == "filesystem", "%s: next run freezes" % name)
                    fake.close()
                check(fake.state == "thawed", "%s: the guest is left thawed (%s)" % (name, fake.calls))
                if "guest-fsfreeze-freeze" in fake.calls:
                    last_freeze = len(fake.calls) - 1 - fake.calls[::-1].index("guest-fsfreeze-freeze")
                    check("guest-fsfreeze-thaw" in fake.calls[last_freeze:] or behaviour == "disconnect",
                          "%s: thaw after freeze: %s" % (name, fake.calls))
            log("ok %s" % name)
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: every agent fault handled by policy, never left frozen")

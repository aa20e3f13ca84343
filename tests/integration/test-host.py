#!/usr/bin/env python3
"""A host of 12 paused VMs in one configuration, backed up by `qbak run
--jobs 4`: every point restores to the disk as it was; a VM whose socket
is missing and a VM whose repository is locked are FAILING (busy) while
the others succeed, and are retried by the next run; `status` goes LATE
when a VM's RPO has passed and writes Prometheus metrics; a run killed
with SIGTERM mid-way leaves no job or node in any QEMU and no partial
point, and the next run completes everything."""
import fcntl
import json
import os
import pty
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("host")
repo = os.path.join(w, "repo")
N = 12
SIZE = 16 << 20
NAMES = ["vm%02d" % i for i in range(N)]
LOCKED = "vm05"


def start(name):
    d = os.path.join(w, name)
    os.mkdir(d)
    return VM(d, [("vd0", make_disk(os.path.join(d, "vd0.qcow2"), SIZE), "qcow2")])


def write_config(path, names, rpo="1h", extra="", per_vm=None):
    with open(path, "w") as f:
        f.write("# written by test-host.py\n[defaults]\nrepo = %s\nrpo = %s\n%s\n"
                % (repo, rpo, extra))
        for n in names:
            qmp = vms[n].qbak_sock if n in vms else os.path.join(w, n + ".missing.qmp")
            f.write("[vm %s]\nqmp = %s\n%s\n" % (n, qmp, (per_vm or {}).get(n, "")))
    return path


def run_json(*args, expect):
    p = qbak(*(list(args) + ["--json"]), check_rc=False)
    check(p.returncode == expect, "qbak %s exited %d, expected %d: %s %s"
          % (" ".join(args), p.returncode, expect, p.stdout, p.stderr))
    return json.loads(p.stdout)


def by_vm(res):
    return {v["vm"]: v for v in res["vms"]}


def verify_restores(names, refs):
    for n in names:
        out = os.path.join(w, "restore-%s.raw" % n)
        qbak("restore", "--repo", repo, "--vm", n, "--disk", "vd0", "--output", out)
        img_compare(out, refs[n], fmt_a="raw")
        os.unlink(out)


def no_leftovers():
    for n, vm in vms.items():
        check(vm.jobs() == [], "%s: jobs left in QEMU: %s" % (n, vm.jobs()))
        check(not [x for x in vm.block_nodes() if x.startswith("qbak")],
              "%s: qbak nodes left in QEMU: %s" % (n, vm.block_nodes()))
        d = os.path.join(repo, n)
        if os.path.isdir(d):
            check(not [e for e in os.listdir(d) if e.startswith(".partial-")],
                  "%s: a partial point was left" % n)


def dirty(rng, n_writes=6):
    for vm in vms.values():
        random_writes(vm, "vd0", SIZE, rng, n_writes, zero_ratio=0.1, discard_ratio=0.05)


def references(tag):
    return {n: vm.reference("vd0", os.path.join(vm.dir, "ref-%s.raw" % tag))
            for n, vm in vms.items()}


def on_terminal(cmd):
    """Runs cmd with stderr on a pseudo-terminal; returns what it drew."""
    master, slave = pty.openpty()
    # A wide terminal, whatever the machine's: progress lines are cut to
    # the terminal's width, and the checks read whole lines.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    text = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        text += chunk
    os.close(master)
    check(p.wait(timeout=300) == 0, "%s exited %d: %r" % (cmd, p.returncode, text))
    return text.decode(errors="replace")


vms = {}
try:
    with ThreadPoolExecutor(max_workers=N) as ex:
        for n, vm in zip(NAMES, ex.map(start, NAMES)):
            vms[n] = vm
    rng = random.Random(12)
    dirty(rng, 10)
    refs = references("1")
    conf = write_config(os.path.join(w, "qbak.conf"), NAMES + ["ghost"])
    qbak("config", "check", "--config", conf)

    # A VM whose repository is locked, as a running prune or backup holds
    # it (flock on its .lock, exclusive).
    os.makedirs(os.path.join(repo, LOCKED))
    lock = open(os.path.join(repo, LOCKED, ".lock"), "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    res = run_json("run", "--config", conf, "--jobs", "4", expect=1)
    v = by_vm(res)
    ok = [n for n in NAMES if n != LOCKED]
    for n in ok:
        check(v[n]["outcome"] == "ok" and v[n]["point"], "%s: %s" % (n, v[n]))
        check(v[n]["bytes_written"] > 0, "%s: bytes written" % n)
    check(v["ghost"]["outcome"] == "failed" and "ghost.missing.qmp" in v["ghost"]["error"],
          "ghost: %s" % v["ghost"])
    check(v[LOCKED]["outcome"] == "busy" and v[LOCKED]["exit_status"] == 75,
          "locked: %s" % v[LOCKED])
    check(res["due"] == N + 1 and res["ok"] == N - 1 and res["failed"] == 2,
          "counts: %s" % res)
    verify_restores(ok, refs)
    no_leftovers()

    # status: FAILING for the two, OK for the others; exit 1; metrics.
    prom = os.path.join(w, "qbak.prom")
    st = run_json("status", "--config", conf, "--prometheus", prom, expect=1)
    s = by_vm(st)
    for n in ok:
        check(s[n]["state"] == "OK" and s[n]["newest_point"] == v[n]["point"]
              and s[n]["repo_bytes"] > 0, "%s: %s" % (n, s[n]))
    check(s["ghost"]["state"] == "FAILING" and s["ghost"]["error"], "ghost: %s" % s["ghost"])
    check(s[LOCKED]["state"] == "FAILING" and s[LOCKED]["last_attempt"]["outcome"] == "busy",
          "locked: %s" % s[LOCKED])
    text = open(prom).read()
    check(not [f for f in os.listdir(w) if f.startswith("qbak.prom.")], "temporary metrics file left")
    for line in ['qbak_state{vm="ghost",state="FAILING"} 1',
                 'qbak_state{vm="vm00",state="OK"} 1',
                 'qbak_last_attempt_success{vm="%s"} 0' % LOCKED,
                 'qbak_last_attempt_success{vm="vm00"} 1',
                 'qbak_rpo_seconds{vm="vm00"} 3600']:
        check(line in text, "metrics lack %r:\n%s" % (line, text))
    newest = [l for l in text.splitlines()
              if l.startswith('qbak_newest_point_timestamp_seconds{vm="vm01"}')]
    check(newest and abs(float(newest[0].split()[-1]) - time.time()) < 3600,
          "newest point timestamp: %s" % newest)
    for l in text.splitlines():
        check(l.startswith("#") or len(l.split()) == 2, "metrics line %r" % l)

    # The lock goes: the next run backs up only what is due (the locked VM
    # has no point; the others are within their RPO); the ghost still fails.
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    res = run_json("run", "--config", conf, expect=1)
    v = by_vm(res)
    check(v[LOCKED]["outcome"] == "ok", "locked VM retried: %s" % v[LOCKED])
    check(all(v[n]["outcome"] == "not-due" and not v[n]["due"] for n in ok),
          "others not due: %s" % res)
    check(v["ghost"]["outcome"] == "failed", "ghost: %s" % v["ghost"])
    verify_restores([LOCKED], refs)
    main = write_config(os.path.join(w, "main.conf"), NAMES)
    st = run_json("status", "--config", main, expect=0)
    check(all(x["state"] == "OK" for x in st["vms"]), "all OK: %s" % st)
    p = qbak("status", "--config", main)
    check("vm11" in p.stdout and "OK" in p.stdout, "human status: %s" % p.stdout)

    # LATE once the RPO has passed.
    late = write_config(os.path.join(w, "late.conf"), NAMES, per_vm={"vm03": "rpo = 1s"})
    time.sleep(2.5)
    st = run_json("status", "--config", late, expect=1)
    s = by_vm(st)
    check(s["vm03"]["state"] == "LATE" and s["vm03"]["age_s"] > 1, "vm03: %s" % s["vm03"])
    check(all(s[n]["state"] == "OK" for n in NAMES if n != "vm03"), "others OK: %s" % st)

    # While a backup of the run's first VMs lasts, VMs that fall due start
    # too: vm02 (RPO 4 s) is backed up again while vm00's backup runs.
    vms["vm00"].io("vd0", "write -P 0x79 0 %d" % (6 << 20))
    longrun = write_config(os.path.join(w, "long.conf"), NAMES,
                           per_vm={"vm00": "speed = 1M\nmode = push",  # its job is paused
                                   "vm02": "rpo = 4s"})
    # vm00's job is paused in QEMU (as a long backup would be) until vm02
    # has been backed up twice more, so no timing decides the outcome.
    before = len(list_points(repo, "vm02"))
    p = subprocess.Popen([QBAK, "run", "--config", longrun, "--all", "--vm", "vm00",
                          "--vm", "vm02", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not vms["vm00"].jobs():
        if p.poll() is not None:
            fail("run ended before vm00's job was seen: %s" % (p.communicate(),))
        check(time.time() < deadline, "vm00's job never started")
        time.sleep(0.05)
    job = vms["vm00"].jobs()[0]["id"]
    vms["vm00"].qmp.cmd("job-pause", id=job)
    while len(list_points(repo, "vm02")) < before + 3:
        check(p.poll() is None and time.time() < deadline,
              "vm02 was not backed up again while vm00's backup ran")
        time.sleep(0.2)
    vms["vm00"].qmp.cmd("job-resume", id=job)
    out, err = p.communicate(timeout=300)
    check(p.returncode == 0, "run exited %d: %s %s" % (p.returncode, out, err))
    res = json.loads(out)
    v = by_vm(res)
    check(v["vm00"]["attempts"] == 1 and v["vm00"]["outcome"] == "ok", "vm00: %s" % v["vm00"])
    check(v["vm02"]["attempts"] >= 3 and v["vm02"]["outcome"] == "ok", "vm02: %s" % v["vm02"])
    check(len(list_points(repo, "vm02")) == before + v["vm02"]["attempts"],
          "vm02: one point per attempt")
    check(res["ok"] == 2 and res["failed"] == 0, "counts: %s" % res)

    # SIGTERM mid-way: slow jobs (--speed), four at once; signal once some
    # job runs in QEMU.
    # 12 MiB each: at 1 MiB/s a job runs for seconds.
    for vm in vms.values():
        vm.io("vd0", "write -P 0x%02x 0 %d" % (rng.randrange(1, 256), 12 << 20))
    # Push mode: the test counts the backups by QEMU's jobs.
    slow = write_config(os.path.join(w, "slow.conf"), NAMES, extra="speed = 1M\nmode = push")
    before = {n: list_points(repo, n) for n in NAMES}
    p = subprocess.Popen([QBAK, "run", "--config", slow, "--all", "--jobs", "4", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(x.jobs() for x in vms.values()):
        if p.poll() is not None:
            fail("run ended before any job was seen: %s" % (p.communicate(),))
        check(time.time() < deadline, "no job started")
        time.sleep(0.05)
    # --jobs 4: four backups at once, never more.
    most = 0
    while most < 4:
        now = sum(1 for x in vms.values() if x.jobs())
        check(now <= 4, "%d backups at once with --jobs 4" % now)
        most = max(most, now)
        if p.poll() is not None:
            fail("run ended before four backups ran at once: %s" % (p.communicate(),))
        check(time.time() < deadline, "never four backups at once (at most %d)" % most)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    check(p.returncode == 1, "interrupted run exits 1, not %d: %s" % (p.returncode, err))
    res = json.loads(out)
    check(res["interrupted"], "result says interrupted: %s" % res)
    # The run waited for its children: no qbak of this repository is left.
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(repo.encode() in a for a in cmd) and b"backup" in cmd:
            left.append(cmd)
    check(not left, "qbak processes outlived the run: %s" % left)
    outcomes = [x["outcome"] for x in res["vms"]]
    check(outcomes.count("interrupted") >= N - 4 - 1, "most VMs not started: %s" % outcomes)
    no_leftovers()
    for n in NAMES:
        after = list_points(repo, n)
        check(after[:len(before[n])] == before[n] and len(after) <= len(before[n]) + 1,
              "%s: points %s then %s" % (n, before[n], after))
    # The next run completes everything, and each point is the disk as now.
    refs = references("2")
    res = run_json("run", "--config", main, "--all", "--jobs", "4", expect=0)
    check(res["ok"] == N, "all ok: %s" % res)
    verify_restores(NAMES, refs)
    no_leftovers()

    # Progress on a terminal (per disk: done of total, rate, time left), in
    # both modes; none with --json.  An incremental counts of its bitmap,
    # a full of the disk.
    vm = vms["vm00"]
    full_totals = []
    for mode in ("push", "pull"):
        vm.io("vd0", "write -P 0x77 0 %d" % (4 << 20))
        text = on_terminal([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                            "--vm", "vm00", "--speed", str(2 << 20), "--mode", mode])
        check(re.search(r"qbak: vm00: vd0 [0-9.]+ MiB of 4.0 MiB.*MiB/s.*left", text)
              and "qbak: vm00: vd0 4.0 MiB of 4.0 MiB" in text,
              "%s backup progress: %r" % (mode, text))
        text = on_terminal([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                            "--vm", "vm00", "--speed", str(8 << 20), "--mode", mode,
                            "--full"])
        # A full counts the data it copies, the same in either mode: the
        # disk's data, not its size; the total is known from the start.
        totals = set(re.findall(r"qbak: vm00: vd0 [0-9.]+ MiB of ([0-9.]+) MiB", text))
        m = re.search(r"qbak: vm00: vd0 [0-9.]+ MiB of ([0-9.]+) MiB[^\r]*MiB/s[^\r]*left",
                      text)
        check(m and totals == {m.group(1)} and 8 <= float(m.group(1)) < 16 and
              "qbak: vm00: vd0 %s MiB of %s MiB" % (m.group(1), m.group(1)) in text,
              "%s full backup progress: %r" % (mode, text))
        full_totals.append(m.group(1))
    check(full_totals[0] == full_totals[1], "full totals differ: %s" % full_totals)
    out = os.path.join(w, "restore-tty.raw")
    text = on_terminal([QBAK, "restore", "--repo", repo, "--vm", "vm00", "--disk", "vd0",
                        "--output", out])
    check("qbak: restore vm00: vd0 16.0 MiB of 16.0 MiB" in text, "restore progress: %r" % text)
    slow_pull = write_config(os.path.join(w, "slow-pull.conf"), NAMES,
                             extra="speed = 1M\nmode = pull")
    for conf_ in (slow, slow_pull):
        vms["vm01"].io("vd0", "write -P 0x78 0 %d" % (3 << 20))
        text = on_terminal([QBAK, "run", "--config", conf_, "--all", "--vm", "vm01"])
        check(re.search(r"qbak run: 0 of 1 VMs done, 1 running, 0 failed: vm01/vd0 "
                        r"[0-9.]+ MiB of 3.0 MiB.*MiB/s", text) and "vm01: ok" in text,
              "run progress (%s): %r" % (conf_, text))
    text = on_terminal([QBAK, "run", "--config", main, "--all", "--vm", "vm01", "--json"])
    check("VMs done" not in text, "no progress with --json: %r" % text)
finally:
    with ThreadPoolExecutor(max_workers=N) as ex:
        list(ex.map(lambda vm: vm.stop(), vms.values()))
shutil.rmtree(w, ignore_errors=True)
log("ok: 12 VMs run 4 at once, failing/busy VMs isolated, LATE, metrics, SIGTERM")

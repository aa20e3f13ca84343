#!/usr/bin/env python3
"""The whole VM at one point in time, with the real Linux test guest
running qbak-ring (scripts/build-test-guest.sh): a counter and random data
in RAM, random tokens written to a ring of O_DIRECT disk slots and logged
in RAM.

- every point records the VM's settings (vm.json, 0600);
- backup --memory: a 0600 state whatever the umask, its size, capture time
  and guest pause in the result; the guest runs on;
- qbak killed at every step of the capture: the guest is running again,
  no migration is left, nothing partial is listed;
- restore --start of a memory point: same boot id, RAM data intact, the
  counter goes on, the disk ring equals the RAM log; its first backup is
  a full that says why;
- --live: the same, the overlays stand alone once streamed;
- --cold and a point without memory boot cold; the cold disk's ring is the
  one the memory restore logged (disk and memory are one instant);
- a state that does not load fails with QEMU's reason, nothing left
  running, and --cold still boots."""
import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

image = need_guest_image()
w = workdir("vmstate")
repo = os.path.join(w, "repo")
VERIFY = os.path.join(ROOT, "scripts", "verify-guest-data.sh")
g = Guest(w, make_guest_disk(os.path.join(w, "data.qcow2")), image)
started = []  # restored QEMUs, killed at the end whatever happens


def gexec(qga_path, argv, timeout=120):
    a = QGA(qga_path, timeout)
    try:
        pid = a.cmd("guest-exec", path=argv[0], arg=argv[1:],
                    **{"capture-output": True})["pid"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = a.cmd("guest-exec-status", pid=pid)
            if st.get("exited"):
                return (st.get("exitcode"),
                        base64.b64decode(st.get("out-data", "")).decode())
            time.sleep(0.1)
        fail("guest-exec %s did not finish" % argv)
    finally:
        a.close()


def ring(qga_path):
    """Ask qbak-ring to check its disk against its RAM log."""
    rc, out = gexec(qga_path, ["/bin/sh", "-c",
                               "rm -f /run/qbak-ring.result; touch /run/qbak-ring.check; "
                               "i=0; while [ ! -s /run/qbak-ring.result ]; do "
                               "i=$((i+1)); [ $i -gt 600 ] && exit 1; usleep 100000; done; "
                               "cat /run/qbak-ring.result"])
    check(rc == 0, "qbak-ring answered: %r" % out)
    return dict(kv.split("=", 1) for kv in out.split())


def boot_id(qga_path):
    return gexec(qga_path, ["/bin/cat", "/proc/sys/kernel/random/boot_id"])[1].strip()


def backup(*extra, env=None, sock=None, qga=None):
    return qbak_json("backup", "--qmp", sock or g.qbak_sock, "--qga", qga or g.qga_sock,
                     "--repo", repo, "--vm", "g1", *extra, env=env)


def restore_start(point, d, *extra, check_rc=True):
    p = run([QBAK, "restore", "--repo", repo, "--vm", "g1", "--point", point,
             "--start", "--to", os.path.join(w, d), "--json"] + list(extra),
            check_rc=check_rc)
    if p.returncode != 0:
        return p
    r = json.loads(p.stdout)
    started.append(r["pid"])
    return r


def quit_vm(r):
    try:
        q = QMP(r["qmp"])
        q.cmd("quit")
        q.close()
    except (OSError, RuntimeError, EOFError):
        pass
    deadline = time.time() + 60
    while time.time() < deadline and os.path.exists("/proc/%d" % r["pid"]):
        time.sleep(0.1)
        try:
            os.waitpid(r["pid"], os.WNOHANG)
        except ChildProcessError:
            pass


def vm_running_again(vm, what):
    """The guardian resumes the VM and cancels the snapshot of a killed
    qbak."""
    deadline = time.time() + 120
    while time.time() < deadline:
        st = vm.qmp.cmd("query-status")["status"]
        mig = vm.qmp.cmd("query-migrate").get("status")
        if st == "running" and mig not in ("active", "setup", "cancelling"):
            return
        time.sleep(0.2)
    fail("%s: VM %s, migration %s after qbak was killed" % (what, st, mig))


try:
    rc, out = gexec(g.qga_sock, ["/usr/bin/qbak-ring", "/data/ring"])
    check(rc == 0, "qbak-ring started: %s" % out)
    boot0 = boot_id(g.qga_sock)
    r0 = ring(g.qga_sock)
    check(r0["ram_ok"] == "1" and r0["mismatches"] == "0", "ring before: %s" % r0)

    # Settings in every point.
    p0 = backup()
    check(p0["memory"] is None, "no memory without --memory: %s" % p0["memory"])
    vmj = os.path.join(repo, "g1", p0["point"], "vm.json")
    check(stat.S_IMODE(os.stat(vmj).st_mode) == 0o600, "vm.json is 0600")
    s = json.load(open(vmj))
    check(s["argv"][0].endswith("qemu-system-x86_64") and s["rebuildable"],
          "argv recorded: %s" % s["argv"][:3])
    check(s["machine_type"].startswith("pc-q35-"), "machine type pinned: %s" % s["machine_type"])
    check(s["pid"] == g.proc.pid and s["cwd"] == os.getcwd(), "pid and cwd: %s %s" % (s["pid"], s["cwd"]))
    check("query-block" in s["qmp"] and "query-pci" in s["qmp"], "QMP queries kept")

    # A device hot-plugged after start: not on the command line, recorded
    # from QMP, added back (a state with its section loads only then).
    g.qmp.cmd("device_add", driver="virtio-rng-pci", id="rng0", bus="rp1")

    # Memory, with a umask that would make files world-readable.
    c_before = int(ring(g.qga_sock)["counter"])
    old = os.umask(0)
    try:
        p1 = backup("--memory")
    finally:
        os.umask(old)
    m = p1["memory"]
    state = os.path.join(repo, "g1", p1["point"], "memory.state")
    check(m and m["bytes"] == os.path.getsize(state) and m["bytes"] > 1 << 20,
          "memory in the result: %s" % m)
    check(stat.S_IMODE(os.stat(state).st_mode) == 0o600, "memory.state is 0600")
    check(0 < m["downtime_ms"] < 5000 and m["capture_s"] > 0, "pause measured: %s" % m)
    log("256 MiB guest: paused %.1f ms, state %.1f MiB, captured in %.2f s"
        % (m["downtime_ms"], m["bytes"] / 1048576, m["capture_s"]))
    man = json.load(open(os.path.join(repo, "g1", p1["point"], "manifest.json")))
    check(man["memory"]["downtime_ms"] == m["downtime_ms"], "memory in the manifest")
    s1 = json.load(open(os.path.join(repo, "g1", p1["point"], "vm.json")))
    check([(d["id"], d["type"], d["bus"]) for d in s1["hotplugged"]]
          == [("rng0", "virtio-rng-pci", "rp1")] and p1["settings"]["hotplugged"] == 1,
          "hot-plugged device recorded: %s" % s1["hotplugged"])
    check(g.qmp.cmd("query-status")["status"] == "running", "guest runs on")
    caps = {c["capability"]: c["state"] for c in g.qmp.cmd("query-migrate-capabilities")}
    check(not caps["background-snapshot"], "background-snapshot turned off again")
    c_after = int(ring(g.qga_sock)["counter"])
    check(c_after > c_before, "the guest's writer ran on: %d -> %d" % (c_before, c_after))

    # qbak killed at each step of a capture.
    npoints = len(list_points(repo, "g1"))
    for at in ("vm-stopped", "vm-transaction", "vm-armed", "vm-writing", "running"):
        log("killed at " + at)
        env = dict(os.environ, QBAK_CRASH_AT=at)
        p = run([QBAK, "backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "g1",
                 "--memory", "--json"] + (["--full", "--speed", "65536"] if at == "running" else []),
                check_rc=False, env=env)
        check(p.returncode == -9, "%s: killed (%d: %s)" % (at, p.returncode, p.stderr))
        vm_running_again(g, at)
        check(len(list_points(repo, "g1")) == npoints, "%s: nothing partial listed" % at)
        check(ring(g.qga_sock)["mismatches"] == "0", "%s: guest goes on" % at)
    # The guardian killed too: the VM stays paused until the next run,
    # which resumes it from the marker before anything else.
    p = subprocess.Popen([QBAK, "backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "g1",
                          "--memory", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, QBAK_CRASH_AT="vm-stopped:stop"))
    deadline = time.time() + 300
    while time.time() < deadline:
        st = open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1].split()[0]
        if st == "T":
            break
        time.sleep(0.1)
    children = open("/proc/%d/task/%d/children" % (p.pid, p.pid)).read().split()
    check(len(children) == 1, "one guardian: %s" % children)
    os.kill(int(children[0]), 9)
    os.kill(p.pid, 9)
    p.communicate()
    time.sleep(1)
    check(g.qmp.cmd("query-status")["status"] == "paused", "left paused with no guardian")
    after = backup("--memory")
    check(any("resumed the VM" in x for x in after["recovered"]),
          "the next run resumed the VM from the marker: %s" % after["recovered"])
    check(g.qmp.cmd("query-status")["status"] == "running", "running again")
    check(after["memory"] and not any(".partial" in f for f in os.listdir(os.path.join(repo, "g1"))),
          "the next capture works and nothing partial is left: %s" % after["recovered"])

    # The state's file system too small: the capture fails before the vCPUs
    # stop (the file is preallocated), with the reason; --memory=try commits
    # the disks alone and says so; the guest runs on either way.
    small = os.path.join(w, "small")
    os.mkdir(small)
    if run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", small], check_rc=False).returncode == 0:
        try:
            srepo = os.path.join(small, "repo")
            p = run([QBAK, "backup", "--qmp", g.qbak_sock, "--repo", srepo, "--vm", "g1",
                     "--memory", "--json"], check_rc=False)
            check(p.returncode == 1 and "no room" in p.stderr,
                  "full file system: fails with the reason: %r" % p.stderr)
            check(g.qmp.cmd("query-status")["status"] == "running", "guest runs on (full fs)")
            check(not list_points(srepo, "g1"), "nothing listed after a full file system")
            r = qbak_json("backup", "--qmp", g.qbak_sock, "--repo", srepo, "--vm", "g1",
                          "--memory=try")
            check(r["memory"] is None and any("memory not captured" in x for x in r["warnings"])
                  and len(list_points(srepo, "g1")) == 1,
                  "--memory=try commits the disks alone and says so: %s" % r["warnings"])
            check(g.qmp.cmd("query-status")["status"] == "running", "guest runs on (try)")
        finally:
            run(["umount", small], check_rc=False)
    else:
        log("note: cannot mount a small tmpfs here: full file system case not run")

    # The fallback where the host cannot write-protect guest memory (forced
    # here): stop, migrate into the file, then the disks, the jobs paused
    # around cont; the chain's bitmap survives the migration.
    c_fb = int(ring(g.qga_sock)["counter"])
    p2 = backup("--memory", env=dict(os.environ, QBAK_VMSTATE_METHOD="stop-migrate"))
    m2 = p2["memory"]
    check(m2 and m2["method"] == "stop-migrate" and m2["capabilities"] == ["dirty-bitmaps"]
          and m2["bytes"] > 1 << 20, "fallback capture: %s" % m2)
    log("fallback: paused %.1f ms, state %.1f MiB" % (m2["downtime_ms"], m2["bytes"] / 1048576))
    check(g.qmp.cmd("query-status")["status"] == "running", "guest runs on after the fallback")
    p3 = backup()
    check(p3["disks"][0]["type"] == "incremental",
          "the bitmap survives the fallback's migration: %s" % p3["disks"][0])
    npoints = len(list_points(repo, "g1"))
    for at in ("vm-stopped", "vm-saved", "vm-transaction"):
        log("fallback killed at " + at)
        env = dict(os.environ, QBAK_CRASH_AT=at, QBAK_VMSTATE_METHOD="stop-migrate")
        p = run([QBAK, "backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "g1",
                 "--memory", "--json"], check_rc=False, env=env)
        check(p.returncode == -9, "fallback %s: killed (%d: %s)" % (at, p.returncode, p.stderr))
        vm_running_again(g, "fallback " + at)
        check(len(list_points(repo, "g1")) == npoints, "fallback %s: nothing partial listed" % at)
        check(ring(g.qga_sock)["mismatches"] == "0", "fallback %s: guest goes on" % at)
    res = restore_start(p2["point"], "rfallback")
    rr = ring(res["qga"])
    check(rr["boot"] == boot0 and rr["ram_ok"] == "1" and rr["mismatches"] == "0"
          and int(rr["counter"]) >= c_fb, "fallback restore continues the guest: %s" % rr)
    q = QMP(res["qmp"])
    ours = [bm["name"] for b in q.cmd("query-block")
            for bm in b.get("inserted", {}).get("dirty-bitmaps", []) if bm["name"].startswith("qbak-")]
    q.close()
    check(not ours, "no bitmap of ours on the restored VM: %s" % ours)
    quit_vm(res)

    # Restore with memory: the guest goes on where it was.
    res = restore_start(p1["point"], "rmem")
    check(res["memory"] and res["qga"] and res["disks"][0]["disk"] == "vd0", "restored: %s" % res)
    check("virtio-rng-pci,id=rng0,bus=rp1,addr=0x0.0" in res["command"],
          "the hot-plugged device is back: %s" % res["command"])
    rr = ring(res["qga"])
    check(rr["boot"] == boot0, "same boot id after a memory restore")
    check(rr["ram_ok"] == "1", "RAM data intact")
    check(c_before <= int(rr["counter"]), "counter goes on: %s >= %d" % (rr["counter"], c_before))
    check(rr["mismatches"] == "0", "disk ring equals the RAM log: %s" % rr)
    mem_counter, mem_log = int(rr["counter"]), rr["slots"].split(",")
    first = backup(sock=res["qmp"], qga=res["qga"])
    reason = first["disks"][0]["reason"] or ""
    check(first["disks"][0]["type"] == "full" and "restored from" in reason,
          "the restored VM's first backup is a full that says why: %s" % reason)
    quit_vm(res)

    # --live: runs at once on overlays; streaming makes them stand alone.
    res = restore_start(p1["point"], "rlive", "--live")
    check(res["live"] and res["memory"] and res["pinned_by"], "live restore: %s" % res)
    rr = ring(res["qga"])
    check(rr["boot"] == boot0 and rr["ram_ok"] == "1" and rr["mismatches"] == "0",
          "live restore continues the guest: %s" % rr)
    q = QMP(res["qmp"])
    deadline = time.time() + 600
    while q.cmd("query-block-jobs") and time.time() < deadline:
        time.sleep(0.5)
    q.close()
    deadline = time.time() + 60
    while os.path.exists("/proc/%d" % res["pinned_by"]) and time.time() < deadline:
        time.sleep(0.2)
    check(not os.path.exists("/proc/%d" % res["pinned_by"]), "the pin holder exits after streaming")
    quit_vm(res)
    info = json.loads(run([QEMU_IMG, "info", "--output=json", "-U",
                           res["disks"][0]["file"]]).stdout)
    check("backing-filename" not in info, "the overlay stands alone: %s" % info)

    # While streaming runs the point is pinned: prune is busy (exit 75).
    # QEMU killed mid-stream leaves overlays over the repository's chain
    # that still boot.
    # (Output to files: the pin holder keeps inherited pipes open.)
    env = dict(os.environ, QBAK_TEST_STREAM_SPEED="4096")
    out_path, err_path = os.path.join(w, "rslow.out"), os.path.join(w, "rslow.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        rc = subprocess.call([QBAK, "restore", "--repo", repo, "--vm", "g1", "--point",
                              p1["point"], "--start", "--live", "--to",
                              os.path.join(w, "rslow"), "--json"],
                             stdout=out, stderr=err, env=env)
    check(rc == 0, "slow live restore: %s" % open(err_path).read())
    res = json.load(open(out_path))
    started.append(res["pid"])
    q = QMP(res["qmp"])
    streaming = q.cmd("query-block-jobs")
    q.close()
    check(streaming, "streaming still runs at 4 KiB/s")
    pr = qbak("prune", "--repo", repo, "--vm", "g1", "--keep-last", "1", check_rc=False)
    check(pr.returncode == 75 and "busy" in pr.stderr,
          "prune waits while the point is pinned: %d %s" % (pr.returncode, pr.stderr))
    # The pin holder killed: QEMU's own image locks on the chain it reads
    # still keep prune from changing or removing those files.
    os.kill(res["pinned_by"], signal.SIGKILL)
    deadline = time.time() + 60
    while os.path.exists("/proc/%d" % res["pinned_by"]) and time.time() < deadline:
        time.sleep(0.1)
    chain = [i["filename"] for i in json.loads(run(
        [QEMU_IMG, "info", "-U", "--backing-chain", "--output=json",
         res["disks"][0]["file"]]).stdout)[1:]]
    check(chain and all(f.startswith(repo) for f in chain), "read through the repository: %s"
          % chain)
    def sha(f):
        return hashlib.sha256(open(f, "rb").read()).hexdigest() if os.path.exists(f) else None

    held = {f: sha(f) for f in chain}
    pr = qbak("prune", "--repo", repo, "--vm", "g1", "--keep-last", "1", check_rc=False)
    check(pr.returncode == 75 and "open in another program" in pr.stderr,
          "prune refuses the files a QEMU reads: %d %s" % (pr.returncode, pr.stderr))
    check({f: sha(f) for f in chain} == held,
          "the files QEMU reads are unchanged")
    listed = [p["point"] for p in qbak_json("list", "--repo", repo, "--vm", "g1")["points"]]
    check(p1["point"] in listed, "the point stays listed: %s" % listed)
    os.kill(res["pid"], signal.SIGKILL)
    deadline = time.time() + 60
    while os.path.exists("/proc/%d" % res["pid"]) and time.time() < deadline:
        time.sleep(0.1)
    overlay = res["disks"][0]["file"]
    # QEMU killed mid-write may leak clusters it had allocated (exit 3,
    # "no harm to data"); anything else is damage.
    ck = run([QEMU_IMG, "check", "-f", "qcow2", overlay], check_rc=False)
    check(ck.returncode in (0, 3) and "ERROR" not in ck.stdout + ck.stderr,
          "the cut overlay has no corruption: %d %s %s" % (ck.returncode, ck.stdout,
                                                           ck.stderr))
    info = json.loads(run([QEMU_IMG, "info", "--output=json", overlay]).stdout)
    check("backing-filename" in info, "the overlay still reads through the chain: %s" % info)
    os.makedirs(os.path.join(w, "reboot"))
    again = Guest(os.path.join(w, "reboot"), overlay, image)
    try:
        check(boot_id(again.qga_sock) not in ("", boot0),
              "a VM whose streaming was cut boots from its overlays")
        rc, mounts = gexec(again.qga_sock, ["/bin/cat", "/proc/mounts"])
        check(" /data " in mounts, "its data disk mounts: %s" % mounts)
    finally:
        again.kill()

    # --cold: boots from the disks; its ring is the point's.
    dry = run([QBAK, "restore", "--repo", repo, "--vm", "g1", "--point", p1["point"],
               "--start", "--cold", "--dry-run", "--json", "--to", os.path.join(w, "x")])
    cmd = json.loads(dry.stdout)["command"]
    check("-incoming" not in cmd and not os.path.exists(os.path.join(w, "x")),
          "--dry-run --cold: no -incoming, nothing made")
    dry = json.loads(run([QBAK, "restore", "--repo", repo, "--vm", "g1", "--point",
                          p1["point"], "--start", "--dry-run", "--json", "--to",
                          os.path.join(w, "x")]).stdout)["command"]
    check(dry[-2:] == ["-incoming", "defer"], "--dry-run with memory: -incoming defer")
    res = restore_start(p1["point"], "rcold", "--cold")
    check(not res["memory"], "cold restore loads no memory")
    check(boot_id(res["qga"]) != boot0, "a cold restore boots")
    rc, cold_slots = gexec(res["qga"], ["/usr/bin/qbak-ring", "-d", "/data/ring"])
    quit_vm(res)
    # The cold disk is the point's: its ring equals the memory restore's
    # RAM log except the slots that guest rewrote after resuming (the
    # newest ones before its check, counted from the counter).
    cold = cold_slots.strip().split(",")
    window = mem_counter - c_before
    check(0 <= window < 64, "ring window %d" % window)
    diff = [i for i in range(64) if cold[i] != mem_log[i]]
    late = [i for i in diff if (mem_counter - 1 - i) % 64 >= window]
    check(len(cold) == 64 and not late,
          "cold disk ring equals the point's RAM log (slots %s differ)" % late)

    # A point without memory boots cold, file systems clean.
    res = restore_start(p0["point"], "rnomem")
    check(not res["memory"] and boot_id(res["qga"]) != boot0, "no memory: cold boot")
    quit_vm(res)
    out = os.path.join(w, "p0.raw")
    qbak("restore", "--repo", repo, "--vm", "g1", "--disk", "vd0", "--point", p0["point"],
         "--output", out)
    p = run([VERIFY, "--clean", out], check_rc=False)
    check(p.returncode == 0, "point without memory: clean file system: %s%s" % (p.stdout, p.stderr))

    # A state that does not load.
    with open(state, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(1 << 20))
    p = restore_start(p1["point"], "rbad", check_rc=False)
    err = p.stderr.strip()
    check(p.returncode == 1 and "did not load" in err and "\n" not in err,
          "a state that does not load: %r" % err)
    check(run(["pgrep", "-f", os.path.join(w, "rbad")], check_rc=False).returncode == 1,
          "nothing left running after a state that did not load")
    res = restore_start(p1["point"], "rbadcold", "--cold")
    check(boot_id(res["qga"]), "--cold still boots")
    quit_vm(res)
    log("PASS")
finally:
    for pid in started:
        try:
            os.kill(pid, 9)
        except (OSError, TypeError):
            pass
    g.kill()

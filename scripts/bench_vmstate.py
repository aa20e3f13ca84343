"""The whole VM at one point in time, for scripts/bench.py: `qbak backup
--memory` of the real Linux test guest (scripts/build-test-guest.sh) with
its writers running (the shell file writer and qbak-ring's O_DIRECT ring),
for 256 MiB and 1 GiB of guest RAM (256 MiB only with --quick): the guest's
pause (memory.downtime_ms, targets < 0.25 s and < 1 s), the capture time
and the state's bytes per GiB of RAM; then, for the 256 MiB guest, `restore
--start --live` of the memory point until the guest answers its agent,
against `restore --start --cold` (whole disks restored, then a cold boot)
until it answers, and how long QEMU's streaming of the live overlays took.

`b` is the bench module (CHILDREN, note, ...), passed in to avoid a
circular import of the script that runs as __main__.
"""
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lib"))
import qbaktest  # noqa: E402

RAM_MIB = (256, 1024)
TARGET_MS = {256: 250, 1024: 1000}


class RamGuest(qbaktest.Guest):
    """qbaktest.Guest with RAM of our choosing."""

    def __init__(self, b, workdir, data_disk, image, ram):
        kernel, initrd, append = image
        self.qga_sock = os.path.join(workdir, "qga.sock")
        extra = ["-m", str(ram), "-kernel", kernel, "-initrd", initrd,
                 "-append", append, "-no-reboot",
                 "-serial", "file:" + os.path.join(workdir, "console.log"),
                 "-device", "virtio-serial-pci",
                 "-chardev", "socket,path=%s,server=on,wait=off,id=qga0" % self.qga_sock,
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        try:
            qbaktest.VM.__init__(self, workdir, [("vd0", data_disk, "qcow2")], extra=extra,
                                 run=True)
        finally:
            if getattr(self, "proc", None) is not None:
                b.CHILDREN.append(self.proc)


def qbak(*args):
    p = subprocess.run([qbaktest.QBAK] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError("qbak %s: %s" % (args[0], p.stderr.strip()))
    return json.loads(p.stdout)


def agent_answers(path, timeout=600):
    a = qbaktest.QGA(path, timeout)
    a.cmd("guest-ping")
    a.close()


def start_writers(g):
    a = g.agent(timeout=300)
    try:
        a.cmd("guest-exec", path="/usr/bin/qbak-ring", arg=["/data/ring"])
    finally:
        a.close()


def stop_restored(res):
    try:
        q = qbaktest.QMP(res["qmp"])
        q.cmd("quit")
        q.close()
    except (OSError, RuntimeError, EOFError):
        pass
    try:
        os.kill(res["pid"], signal.SIGKILL)
    except (OSError, TypeError):
        pass


def capture(b, args, work, image, ram, out):
    d = os.path.join(work, "vmstate-%d" % ram)
    os.makedirs(d)
    g = RamGuest(b, d, qbaktest.make_guest_disk(os.path.join(d, "data.qcow2")), image, ram)
    repo = os.path.join(d, "repo")
    try:
        start_writers(g)
        rows = []
        for _ in range(args.runs):
            r = qbak("backup", "--qmp", g.qbak_sock, "--qga", g.qga_sock, "--repo", repo,
                     "--vm", "g", "--memory", "--json")
            rows.append(r["memory"])
            b.note("%d MiB guest: paused %.1f ms, %.1f MiB state, captured in %.2f s"
                   % (ram, r["memory"]["downtime_ms"], r["memory"]["bytes"] / 1048576,
                      r["memory"]["capture_s"]))
        out[ram] = {"downtime_ms": [m["downtime_ms"] for m in rows],
                    "capture_s": [m["capture_s"] for m in rows],
                    "bytes_per_gib": [m["bytes"] * 1024 / ram for m in rows]}
        if ram == RAM_MIB[0]:
            out["restore"] = restores(b, d, repo, r["point"], args.runs)
    finally:
        g.kill()


def restores(b, d, repo, point, runs):
    res = {"live_s": [], "cold_s": [], "stream_s": []}
    for i in range(runs):
        for mode in ("live", "cold"):
            t0 = time.monotonic()
            r = qbak("restore", "--repo", repo, "--vm", "g", "--point", point, "--start",
                     "--%s" % mode, "--to", os.path.join(d, "%s-%d" % (mode, i)), "--json")
            try:
                agent_answers(r["qga"])
                res["%s_s" % mode].append(time.monotonic() - t0)
                if mode == "live":
                    q = qbaktest.QMP(r["qmp"])
                    while q.cmd("query-block-jobs"):
                        time.sleep(0.2)
                    q.close()
                    res["stream_s"].append(time.monotonic() - t0)
            finally:
                stop_restored(r)
        b.note("restore --start --live: agent answers after %.2f s (streamed after %.2f s); "
               "--cold: %.2f s" % (res["live_s"][-1], res["stream_s"][-1], res["cold_s"][-1]))
    return res


def vmstate_step(args, work, res, b):
    image = qbaktest.guest_image()
    if not image:
        res.vmstate = {"error": "the test guest could not be built"}
        return
    out = {}
    for ram in RAM_MIB[:1] if args.size == "256M" else RAM_MIB:
        capture(b, args, work, image, ram, out)
    res.vmstate = out


def report_lines(vm):
    if not vm:
        return []
    if "error" in vm:
        return ["whole VM (--memory): " + vm["error"]]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    lines = ["", "Whole VM, test guest with its writers (median of runs):",
             "  %-10s %12s %8s %12s %16s" % ("guest RAM", "guest pause", "target",
                                             "capture", "state per GiB")]
    for ram in RAM_MIB:
        m = vm.get(ram) or vm.get(str(ram))
        if not m:
            continue
        pause = med(m["downtime_ms"])
        lines.append("  %-10s %9.0f ms %5d ms%s %10.2f s %12.0f MiB"
                     % ("%d MiB" % ram, pause, TARGET_MS[ram],
                        " " if pause < TARGET_MS[ram] else "!", med(m["capture_s"]),
                        med(m["bytes_per_gib"]) / 1048576))
    r = vm.get("restore")
    if r and r["live_s"]:
        lines.append("  restore --start --live (memory): agent answers after %.2f s, "
                     "streaming done after %.2f s" % (med(r["live_s"]), med(r["stream_s"])))
        lines.append("  restore --start --cold (disks restored, cold boot): agent answers "
                     "after %.2f s" % med(r["cold_s"]))
    return lines

"""The host row of scripts/bench.py: `qbak run --all` over 1, 10
and 50 VMs (--quick: 1, 5 and 10), each a paused TCG VM with a DISK_SIZE
qcow2 disk.  Per VM count, untimed first: a full of every VM through
`qbak run --all` (so every disk has its bitmap).  Then, timed, with the page
cache dropped first:
  dirty:  the same DIRTY bytes written in each VM (HMP qemu-io), then
          `qbak run --all` with its default --jobs;
  0-dirty: `qbak run --all` again with nothing written: what each VM costs
          beyond its data (QMP, transaction, NBD, commit, fsyncs, the
          child processes).
Total time should grow with the data (DIRTY per VM), not with the number of
VMs: the per-VM overhead is the 0-dirty wall time per VM, and the slope of
the dirty time over the VM count compared with DIRTY's write time.
qbak's total memory: the sum of the resident set of every qbak process of
the run (the run and its backup children, found through /proc by parent
pid), sampled every 10 ms; its peak is the figure for the row.

bench.py calls host_step(args, work, res, b) and report_lines(res.host).
"""
import json
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import qbaktest

MiB = 1 << 20
DISK_SIZE = 16 * MiB
DIRTY = 2 * MiB               # per VM: 32 clusters of 64 KiB, spread over the disk
COUNTS = (1, 10, 50)
QUICK_COUNTS = (1, 5, 10)


def _children(pid):
    """pid's children (/proc/PID/task/*/children)."""
    out = []
    try:
        for t in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeRss:
    """Samples the summed RSS of a process and its descendants."""

    def __init__(self, pid):
        self.pid, self.peak_kib, self.peak_procs = pid, 0, 0
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _children(p)
            total = sum(_rss_kib(p) for p in pids)
            if total > self.peak_kib:
                self.peak_kib, self.peak_procs = total, len(pids)
            time.sleep(0.01)

    def done(self):
        self.stop = True
        self.t.join()


def _config(path, repo, vms):
    with open(path, "w") as f:
        f.write("[defaults]\nrepo = %s\nrpo = 1h\n\n" % repo)
        for name, vm in vms:
            f.write("[vm %s]\nqmp = %s\n\n" % (name, vm.qbak_sock))


def _run(b, conf, what):
    cmd = [qbaktest.QBAK, "run", "--config", conf, "--all", "--json"]
    b.drop_caches()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b.CHILDREN.append(p)
    rss = TreeRss(p.pid)
    out, err = p.communicate()
    wall = time.monotonic() - t0
    rss.done()
    b.CHILDREN.remove(p)
    if p.returncode != 0:
        raise b.BenchError("%s: qbak run exited %d: %s %s" % (what, p.returncode, out[-2000:],
                                                            err[-2000:]))
    res = json.loads(out)
    written = sum(v.get("bytes_written", 0) for v in res["vms"])
    own = [v["duration_s"] for v in res["vms"]]
    return {"wall": wall, "peak_rss_kib": rss.peak_kib, "peak_procs": rss.peak_procs,
            "bytes": written, "vm_duration_s_median": statistics.median(own)}


def _dirty(vm, seed):
    step = DISK_SIZE // 32
    for i in range(32):
        vm.hmp_io("write -q -P %d %d 64k" % ((seed + i) % 255 + 1, i * step))
    vm.check_log("dirty writes")


def host_step(args, work, res, b):
    counts = QUICK_COUNTS if args.quick else COUNTS
    out = {"disk_size": DISK_SIZE, "dirty_per_vm": DIRTY, "rows": [],
           "jobs": os.cpu_count() and max(2, min(16, os.cpu_count()))}
    res.host = out
    for n in counts:
        d = os.path.join(work, "host-%d" % n)
        os.mkdir(d)
        vms = []

        def start(i):
            vd = os.path.join(d, "vm%03d" % i)
            os.mkdir(vd)
            img = qbaktest.make_disk(os.path.join(vd, "vd0.qcow2"), DISK_SIZE)
            return ("vm%03d" % i, b.BenchVM(vd, [(b.DEV, img, "qcow2")]))
        try:
            with ThreadPoolExecutor(max_workers=8) as ex:
                for r in ex.map(start, range(n)):
                    vms.append(r)
            conf = os.path.join(d, "qbak.conf")
            _config(conf, os.path.join(d, "repo"), vms)
            for i, (_, vm) in enumerate(vms):
                _dirty(vm, 0)
            _run(b, conf, "%d VMs, first full" % n)
            rows = {}
            for r in range(args.runs):
                for i, (_, vm) in enumerate(vms):
                    _dirty(vm, r + 1)
                s = _run(b, conf, "%d VMs dirty" % n)
                rows.setdefault("dirty", []).append(s)
                s0 = _run(b, conf, "%d VMs 0-dirty" % n)
                rows.setdefault("zero", []).append(s0)
                b.note("host %d VMs run %d: %.2f s dirty (%d MiB written), %.2f s 0-dirty, "
                       "peak RSS of qbak %0.1f MiB over %d processes"
                       % (n, r + 1, s["wall"], s["bytes"] // MiB, s0["wall"],
                          s["peak_rss_kib"] / 1024, s["peak_procs"]))
            med = lambda k, f: statistics.median(x[f] for x in rows[k])  # noqa: E731
            out["rows"].append({
                "vms": n, "dirty_s": med("dirty", "wall"), "zero_s": med("zero", "wall"),
                "bytes": med("dirty", "bytes"),
                "peak_rss_kib": max(x["peak_rss_kib"] for x in rows["dirty"] + rows["zero"]),
                "peak_procs": max(x["peak_procs"] for x in rows["dirty"] + rows["zero"]),
                "samples": rows})
        finally:
            with ThreadPoolExecutor(max_workers=8) as ex:
                list(ex.map(lambda v: v[1].stop(), vms))
            for _, vm in vms:
                if vm.proc in b.CHILDREN:
                    b.CHILDREN.remove(vm.proc)


def report_lines(h):
    if not h:
        return ["host: not measured (--skip host)"]
    if "error" in h:
        return ["host: not measured (%s)" % h["error"]]
    L = ["host: qbak run --all (default --jobs %s), paused VMs with a %d MiB disk, "
         "%d MiB dirty per VM" % (h["jobs"], h["disk_size"] // MiB, h["dirty_per_vm"] // MiB),
         "  %6s %12s %12s %14s %16s %18s" % ("VMs", "dirty", "0-dirty", "per VM dirty",
                                             "per VM overhead", "qbak peak RSS")]
    for r in h["rows"]:
        L.append("  %6d %10.2f s %10.2f s %11.0f ms %13.0f ms %11.1f MiB (%d procs)"
                 % (r["vms"], r["dirty_s"], r["zero_s"], 1000 * r["dirty_s"] / r["vms"],
                    1000 * r["zero_s"] / r["vms"], r["peak_rss_kib"] / 1024, r["peak_procs"]))
    rows = h["rows"]
    if len(rows) >= 2 and rows[-1]["vms"] > rows[0]["vms"]:
        a, z = rows[0], rows[-1]
        slope = (z["dirty_s"] - a["dirty_s"]) / (z["vms"] - a["vms"])
        slope0 = (z["zero_s"] - a["zero_s"]) / (z["vms"] - a["vms"])
        L.append("  each added VM: %.0f ms with its %d MiB of data, %.0f ms without data "
                 "(the per-VM overhead, wall clock at --jobs %s)"
                 % (1000 * slope, h["dirty_per_vm"] // MiB, 1000 * slope0, h["jobs"]))
    return L

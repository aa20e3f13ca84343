#!/usr/bin/env python3
"""Guest write latency during a full, several ways of taking it, in one
run: one test guest (as scripts/bench_guest.py boots it, its qbak-lat
streams running all along), then rounds of [idle IDLE_S, one full by each
variant], so that every variant and the idle baseline share the machine's
load.  Per variant: the median and p99 of each stream's writes started
while the full ran, the full's wall time, and the CPU seconds of qbak and
of each QEMU thread (main loop, vCPU, iothread, workers).

  scripts/bench_lat_matrix.py [--rounds N] [--iothread] [VARIANT ...]

Variants: pull, push, pull-nice (nice 19), pull-idle (SCHED_IDLE),
pull-batch (SCHED_BATCH), pull-speed64 (--speed 64M), native (QEMU's own
blockdev-backup of the disk into a local qcow2, no qbak).  Extra qbak
arguments: VARIANT=pull:--foo,bar (comma separated after the colon).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as b  # noqa: E402
import bench_guest as bg  # noqa: E402
import qbaktest  # noqa: E402

IDLE_S = 4.0


def threads(pid):
    """{tid: (name, cpu s)} of a process's threads."""
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        f = s.rsplit(")", 1)[1].split()
        out[tid] = (name, (int(f[11]) + int(f[12])) / tck)
    return out


def thread_delta(a, c):
    by = {}
    for tid, (name, cpu) in c.items():
        key = "main" if name.startswith("qemu-system") else \
            "vcpu" if "TCG" in name or "KVM" in name else \
            "worker" if name.startswith("worker") else name
        by[key] = by.get(key, 0.0) + cpu - a.get(tid, (name, 0.0))[1]
    return {k: round(v, 2) for k, v in by.items() if v >= 0.01}


def native_full(g, d, n):
    qmp = g.qmp
    target = os.path.join(d, "native-%d.qcow2" % n)
    node, job = "lat-native-%d" % n, "lat-native-job-%d" % n
    b.sh([b.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", target,
          str(bg.GUEST_DISK)])
    qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": node},
            file={"driver": "file", "filename": target})
    qmp.cmd("blockdev-backup", **{"job-id": job, "device": "drive0", "target": node,
                                  "sync": "full"})
    ev = b.wait_event(qmp, lambda e: e["event"] in ("BLOCK_JOB_COMPLETED",
                                                    "BLOCK_JOB_CANCELLED")
                      and e["data"].get("device") == job)
    qmp.cmd("blockdev-del", **{"node-name": node})
    os.unlink(target)
    if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
        raise b.BenchError("native backup failed: %s" % ev)


def qbak_full(g, repo, variant, extra):
    mode = "push" if variant.startswith("push") else "pull"
    env = [x for x in extra if "=" in x and not x.startswith("-")]  # NAME=VALUE
    cmd = [b.QBAK, "backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "lat",
           "--json", "--full", "--mode", mode] + [x for x in extra if x not in env]
    if env:
        cmd = ["env"] + env + cmd
    if variant.endswith("-nice"):
        cmd = ["nice", "-n", "19"] + cmd
    elif variant.endswith("-idle"):
        cmd = ["chrt", "--idle", "0"] + cmd
    elif variant.endswith("-batch"):
        cmd = ["chrt", "--batch", "0"] + cmd
    elif variant.endswith("-slow"):
        cmd = ["nice", "-n", "19", "chrt", "--idle", "0"] + cmd
    elif variant.endswith("-speed64"):
        cmd += ["--speed", str(64 << 20)]
    wall, ru, rc, out, err, _ = b.timed(cmd)
    if rc != 0:
        raise b.BenchError("%s: exited %d: %s %s" % (variant, rc, out[-800:], err[-800:]))
    j = json.loads(out)
    shutil.rmtree(repo, ignore_errors=True)
    return ru.ru_utime + ru.ru_stime, j


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iothread", action="store_true",
                    help="the data disk's device gets an iothread")
    ap.add_argument("--dir", help="work directory (default under build/bench/tmp)")
    ap.add_argument("--no-lat", action="store_true",
                    help="no qbak-lat in the guest: times alone, the guest idle")
    ap.add_argument("variants", nargs="*", default=["pull", "push", "native"])
    args = ap.parse_args()
    os.makedirs(b.TMP, exist_ok=True)
    image = qbaktest.guest_image()
    disk = bg.data_disk(b)
    d = args.dir or os.path.join(b.TMP, "%d-lat" % os.getpid())
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "data.qcow2")
    b.copy_disk(disk, src)
    orig = qbaktest.VM.disk_args

    def disk_args(i, dev, path, fmt, blkdebug=None):
        # Named threads (main loop, vCPU, iothread) for the CPU split.
        a = orig(i, dev, path, fmt, blkdebug)
        if args.iothread:
            a[-1] = a[-1].replace("virtio-blk-pci,", "virtio-blk-pci,iothread=io%d," % i)
            a = ["-object", "iothread,id=io%d" % i] + a
        return (["-name", "lat,debug-threads=on"] if i == 0 else []) + a
    qbaktest.VM.disk_args = staticmethod(disk_args)
    g = bg.BenchGuest(b, d, src, image, "qbak.writer=0")
    marks = []  # (variant or "idle", t0, t1, info)
    try:
        a = g.agent(timeout=120)
        try:
            files = ["/data/lat/%02d" % i for i in range(bg.GUEST_FILES)]
            c0 = bg.clock_sample(a)
            pids = {}
            for k, (name, _, flags) in enumerate([] if args.no_lat else bg.STREAMS):
                pids[name] = bg.guest_exec(a, [bg.LAT, "-b", str(bg.GUEST_BS), "-i",
                                               str(bg.GUEST_INTERVAL_US), "-s", str(k + 1),
                                               "-x", bg.STOP_FILE, "-t", "3000"] + flags + files,
                                           wait=0)
        finally:
            a.close()
        time.sleep(1)
        n = 0
        for r in range(args.rounds):
            for v in args.variants:
                t0 = time.time()
                time.sleep(IDLE_S)
                marks.append(("idle", t0 + 0.3, time.time(), {}))
                b.drop_caches()
                name, _, extra = v.partition(":")
                extra = [x for x in extra.split(",") if x]
                th0 = threads(g.proc.pid)
                t0 = time.time()
                if name == "native":
                    native_full(g, d, n)
                    qcpu, j = None, {}
                else:
                    qcpu, j = qbak_full(g, os.path.join(d, "repo"), name, extra)
                t1 = time.time()
                th1 = threads(g.proc.pid)
                n += 1
                info = {"wall": round(t1 - t0, 2), "qbak_cpu": qcpu and round(qcpu, 2),
                        "qemu": thread_delta(th0, th1), "mode": j.get("mode"), "scratch_mib": (j.get("scratch_peak_bytes") or 0) >> 20,
                        "bytes": sum(x.get("bytes_written", 0) for x in j.get("disks", []))}
                marks.append((v, t0, t1, info))
                print("%-24s %s load %s" % (v, info, open("/proc/loadavg").read().split()[:3]),
                      flush=True)
        a = g.agent(timeout=60)
        try:
            bg.guest_exec(a, ["/bin/touch", bg.STOP_FILE])
            samples = {}
            for name, pid in pids.items():
                rc, out, err = bg.exec_wait(a, pid, 60)
                samples[name] = [tuple(int(x) for x in line.split())
                                 for line in out.splitlines() if line.strip()]
            c1 = bg.clock_sample(a)
        finally:
            a.close()
    finally:
        g.stop()
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    (h0, g0, _), (h1, g1, _) = c0, c1
    rate = (g1 - g0) / (h1 - h0)
    rows = {}
    for name in samples:
        writes = [(h0 + (s / 1e9 - g0) / rate, lat / 1e6 / rate) for s, lat in samples[name]]
        for v, t0, t1, info in marks:
            sel = [lat for t, lat in writes if t0 <= t <= t1]
            rows.setdefault(v, {}).setdefault(name, []).extend(sel)
    print("\nload now: %s" % open("/proc/loadavg").read().strip())
    idle = rows.get("idle", {})
    for v in ["idle"] + args.variants:
        line = "%-24s" % v
        for name in samples:
            x = rows.get(v, {}).get(name, [])
            if not x:
                continue
            med, p99 = statistics.median(x), bg.pctl(x, 0.99)
            rel = ""
            if v != "idle" and idle.get(name):
                rel = " (%.1fx, %.1fx)" % (med / statistics.median(idle[name]),
                                           p99 / bg.pctl(idle[name], 0.99))
            line += "  %s med %.2f p99 %.2f n %d%s" % (name, med, p99, len(x), rel)
        walls = [m[3]["wall"] for m in marks if m[0] == v and m[3]]
        if walls:
            line += "  wall %.2f s" % statistics.median(walls)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

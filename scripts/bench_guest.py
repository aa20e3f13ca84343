"""Guest impact for scripts/bench.py: the freeze window and the
latency of guest writes, measured with the real Linux test guest of
scripts/build-test-guest.sh (Debian kernel, busybox, qemu-ga) under TCG.

One guest boots on an ext4 data disk (vd0, mounted at /data) holding
GUEST_DATA of random files; its writer (the test suite's) keeps making
files.  Inside the guest, /usr/bin/qbak-lat (a static helper the guest build
adds) times GUEST_BS writes at random offsets over those files, in two
streams side by side (STREAMS: O_DIRECT, and O_DIRECT+O_DSYNC), each one
write every GUEST_INTERVAL_US, for the whole step: first IDLE_S with no
backup, then --runs times a qbak full and INCREMENTALS incrementals, each
`qbak backup --qga ... --quiesce require`.  Each write's start (guest
CLOCK_REALTIME) is put on the host's clock through qemu-ga's guest-get-time
(read before and after, fitted linearly) and classified by the host times
of qbak's start and exit and of its job's JOB_STATUS_CHANGE events (QMP
timestamps are host wall-clock):
  idle:   started before the first qbak started;
  during: started while a full's job ran (running .. concluded);
  stall:  the longest O_DIRECT write in flight between a qbak start and its
          job running, i.e. across the freeze (and the transaction).
The freeze window itself is qbak's own JSON window_ms (from the freeze
reply to the thaw request); the guest's writes stop for longer, from the
start of the freeze (which syncs first) to the thaw.
This replaces the HMP qemu-io round trips the benchmark timed before: those
went through the monitor, not the guest's kernel and virtio queue, and had
no freeze at all.

bench.py calls guest_step() and report_lines(); `b` is the bench module
(its CHILDREN, timed, drop_caches, ...), passed in to avoid a circular
import of the script that runs as __main__.
"""
import base64
import json
import math
import os
import random
import shlex
import shutil
import statistics
import tempfile
import time

import qbaktest

GiB = 1 << 30
MiB = 1 << 20
DISK_VERSION = 1
GUEST_DISK = 2 * GiB          # the data disk's virtual size
GUEST_FILES = 16              # random files of GUEST_FILE bytes in /data/lat
GUEST_FILE = 64 * MiB
GUEST_DATA = GUEST_FILES * GUEST_FILE
GUEST_BS = 4096
GUEST_INTERVAL_US = 5000
# Two streams of writes, side by side: plain O_DIRECT ones, whose cost is
# the copy-before-write path; and O_DSYNC ones, each also a flush, which
# during a backup QEMU passes on to the backup target (qbak fsyncs it).
STREAMS = (("direct", "O_DIRECT", []), ("dsync", "O_DIRECT+O_DSYNC", ["-d"]))
IDLE_S = 8.0                  # no backup, before the first qbak
GAP_S = 2.0                   # between backups (the writer dirties clusters)
INCREMENTALS = 3
VMNAME = "bench-guest"
GUEST_APPEND = ""             # extra kernel command line (qbak.writer=0: no writer)
STOP_FILE = "/run/qbak-lat.stop"
LAT = "/usr/bin/qbak-lat"


def pctl(v, q):
    v = sorted(v)
    return v[max(0, math.ceil(q * len(v)) - 1)] if v else None


def stats_ms(v):
    """{n, median, p99, max} of a list of ms values (None when empty)."""
    if not v:
        return {"n": 0, "median": None, "p99": None, "max": None}
    return {"n": len(v), "median": statistics.median(v), "p99": pctl(v, 0.99), "max": max(v)}


def data_disk(b):
    """The guest's data disk, built once and cached beside the reference
    disks: GUEST_DISK of ext4 (made on the host with mkfs.ext4 -d, nothing
    mounted) with GUEST_FILES random files in /lat."""
    path = os.path.join(b.OUT, "guest-data-v%d-%d.qcow2" % (DISK_VERSION, GUEST_DISK))
    if os.path.exists(path):
        return path
    mkfs = shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not mkfs:
        raise b.BenchError("guest impact: mkfs.ext4 missing (apt-get install e2fsprogs)")
    b.say("building the guest data disk %s (once; cached) ..." % path)
    tmp = tempfile.mkdtemp(prefix="%d-guestdisk-" % os.getpid(), dir=b.TMP)
    try:
        lat = os.path.join(tmp, "root", "lat")
        os.makedirs(lat)
        rng = random.Random("qbak-bench-guest-data-%d" % DISK_VERSION)
        for i in range(GUEST_FILES):
            with open(os.path.join(lat, "%02d" % i), "wb") as f:
                f.write(rng.randbytes(GUEST_FILE))
        raw = os.path.join(tmp, "disk.raw")
        with open(raw, "wb") as f:
            f.truncate(GUEST_DISK)
        # No lazy init: the guest must not write in the background by itself
        # (as scripts/build-test-guest.sh mkdisk).
        b.sh([mkfs, "-F", "-q", "-L", "qbakdata", "-E", "lazy_itable_init=0,lazy_journal_init=0",
              "-d", os.path.join(tmp, "root"), raw])
        shutil.rmtree(os.path.join(tmp, "root"))
        b.sh([b.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, path + ".tmp"])
        os.rename(path + ".tmp", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(path + ".tmp"):
            os.unlink(path + ".tmp")
    return path


class BenchGuest(qbaktest.Guest):
    """qbaktest.Guest whose QEMU is known to bench's cleanup() and killed if
    it fails to come up."""

    def __init__(self, b, *a, **kw):
        try:
            super().__init__(*a, **kw)
        except BaseException:
            if getattr(self, "proc", None) is not None:
                self.proc.kill()
                self.proc.wait()
            raise
        finally:
            if getattr(self, "proc", None) is not None:
                b.CHILDREN.append(self.proc)
        self.qmp.sock.settimeout(300)


def guest_exec(a, argv, wait=30.0):
    """Runs argv in the guest; with wait, waits for it and returns (exit
    code, stdout, stderr), else returns the pid."""
    pid = a.cmd("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})["pid"]
    if not wait:
        return pid
    return exec_wait(a, pid, wait)


def exec_wait(a, pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        st = a.cmd("guest-exec-status", pid=pid)
        if st.get("exited"):
            dec = lambda k: base64.b64decode(st.get(k, "")).decode(errors="replace")  # noqa: E731
            return st.get("exitcode"), dec("out-data"), dec("err-data")
        if time.monotonic() > deadline:
            raise TimeoutError("guest command %d did not finish" % pid)
        time.sleep(0.1)


def clock_sample(a, tries=15):
    """(host s, guest s) at the same instant, from guest-get-time: the try
    with the shortest round trip, the host time at its middle."""
    best = None
    for _ in range(tries):
        t0 = time.time()
        g = a.cmd("guest-get-time") / 1e9
        t1 = time.time()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, (t0 + t1) / 2, g)
    return best[1], best[2], best[0]


def job_times(events):
    """Host times of the first job running and the last job concluded."""
    run = [e for e in events if e["event"] == "JOB_STATUS_CHANGE"
           and e["data"].get("status") == "running"]
    end = [e for e in events if e["event"] == "JOB_STATUS_CHANGE"
           and e["data"].get("status") == "concluded"]
    ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6  # noqa: E731
    return (min(map(ts, run)) if run else None, max(map(ts, end)) if end else None)


def guest_step(args, work, res, b):
    """Boots the test guest, times its writes idle and during qbak backups
    with the freeze, and sets res.guest (see report_lines)."""
    image = qbaktest.guest_image()
    if not image:
        res.guest = {"error": "the test guest could not be built (scripts/build-test-guest.sh)"}
        b.note("guest impact: " + res.guest["error"])
        return
    disk = data_disk(b)
    gdir = getattr(args, "guest_dir", None) if args else None
    d = tempfile.mkdtemp(prefix="qbak-bench-guest-", dir=gdir) if gdir else \
        os.path.join(work, "guest")
    if not gdir:
        os.mkdir(d)
    src = os.path.join(d, "data.qcow2")
    b.copy_disk(disk, src)
    repo = os.path.join(d, "repo")
    g = BenchGuest(b, d, src, image, GUEST_APPEND)
    try:
        a = g.agent(timeout=120)
        try:
            rc, _, _ = guest_exec(a, ["/bin/sh", "-c", "test -x %s" % LAT])
            have_lat = rc == 0
            files = ["/data/lat/%02d" % i for i in range(GUEST_FILES)]
            c0 = clock_sample(a)
            pids = {}
            if have_lat:
                for k, (name, _, flags) in enumerate(STREAMS):
                    pids[name] = guest_exec(a, [LAT, "-b", str(GUEST_BS), "-i",
                                                str(GUEST_INTERVAL_US), "-s", str(k + 1), "-x",
                                                STOP_FILE, "-t", "900"] + flags + files, wait=0)
        finally:
            a.close()  # qbak needs the agent's socket
        if not have_lat:
            b.note("guest impact: the test guest has no %s (no static C compiler when it was "
                   "built?): only the freeze window is measured" % LAT)
        t_lat = time.time()
        b.drop_caches()
        q0 = b.proc_cpu(g.proc.pid)
        time.sleep(IDLE_S)
        b.note("guest idle phase: QEMU used %.0f %% of a core"
               % ((b.proc_cpu(g.proc.pid) - q0) / IDLE_S * 100))
        backups = []
        runs = max(1, args.runs if args else 1)
        for i in range(runs * (1 + INCREMENTALS)):
            full = i % (1 + INCREMENTALS) == 0
            g.qmp.cmd("query-status")
            g.qmp.events = []
            b.drop_caches()
            cmd = [b.QBAK, "backup", "--qmp", g.qbak_sock, "--qga", g.qga_sock,
                   "--quiesce", "require", "--repo", repo, "--vm", VMNAME, "--json"]
            if full:
                cmd.append("--full")
            if args and getattr(args, "guest_mode", None):
                cmd += ["--mode", args.guest_mode]
            if args and getattr(args, "guest_args", None):
                cmd += shlex.split(args.guest_args)
            t0 = time.time()
            qc0 = b.proc_cpu(g.proc.pid)
            wall, ru, rc, out, err, _ = b.timed(cmd)
            qemu_cpu = b.proc_cpu(g.proc.pid) - qc0
            t1 = time.time()
            if rc != 0:
                raise b.BenchError("guest impact: qbak backup exited %d: %s%s"
                                   % (rc, out[-1000:], err[-1000:]))
            j = json.loads(out)
            g.qmp.cmd("query-status")  # collects the job events
            run, end = job_times(g.qmp.events)
            if run is None and j.get("mode") == "pull":
                # No job in pull mode: the filter is in place for nearly
                # the whole command.
                run, end = t0, t1
            fr = j.get("freeze") or {}
            bk = {"type": j["disks"][0].get("type"), "wall_s": wall,
                  "duration_s": j.get("duration_s"), "consistency": j.get("consistency"),
                  "window_ms": fr.get("window_ms"), "filesystems": fr.get("filesystems"),
                  "freeze_warning": fr.get("warning"),
                  "bytes": sum(x.get("bytes_written", 0) for x in j["disks"]),
                  "t_start": t0, "t_end": t1, "t_job_running": run, "t_job_concluded": end,
                  "qbak_cpu_s": ru.ru_utime + ru.ru_stime, "qemu_cpu_s": qemu_cpu}
            if bk["consistency"] != "filesystem" or not isinstance(bk["window_ms"], (int, float)):
                raise b.BenchError("guest impact: backup %d not frozen: %s" % (i, j))
            if bk["type"] != ("full" if full else "incremental"):
                raise b.BenchError("guest impact: backup %d is a %s" % (i, bk["type"]))
            backups.append(bk)
            b.note("guest %-11s %.3f s, freeze window %.1f ms, %s; CPU qbak %.2f s, QEMU %.2f s"
                   % (bk["type"], wall, bk["window_ms"], b.human(bk["bytes"]),
                      bk["qbak_cpu_s"], qemu_cpu))
            time.sleep(GAP_S)
        samples = {}
        a = g.agent(timeout=60)
        try:
            if have_lat:
                guest_exec(a, ["/bin/touch", STOP_FILE])
                for name, pid in pids.items():
                    rc, out, err = exec_wait(a, pid, 60)
                    if rc != 0:
                        raise b.BenchError("guest impact: qbak-lat exited %s: %s"
                                           % (rc, err[-500:]))
                    samples[name] = [tuple(int(x) for x in line.split())
                                     for line in out.splitlines() if line.strip()]
            c1 = clock_sample(a)
        finally:
            a.close()
    finally:
        g.stop()
        if g.proc in b.CHILDREN:
            b.CHILDREN.remove(g.proc)
        if gdir:
            shutil.rmtree(d, ignore_errors=True)
    res.guest = summarise(samples, backups, c0, c1, t_lat, have_lat)
    for name, st in res.guest["streams"].items():
        b.note("guest %s writes: %d idle, %d during the full" % (name, st["idle"]["n"],
                                                                 st["during_full"]["n"]))
    b.note("guest clock rate %.5f of the host's, mapping error <= %.1f ms"
           % (res.guest["clock"]["rate"], res.guest["clock"]["error_ms"]))


def summarise(samples, backups, c0, c1, t_lat, have_lat):
    # Guest wall-clock -> host wall-clock, linear through the two samples;
    # latencies (guest CLOCK_MONOTONIC) scaled by the same rate.
    (h0, g0, r0), (h1, g1, r1) = c0, c1
    rate = (g1 - g0) / (h1 - h0)
    to_host = lambda gs: h0 + (gs - g0) / rate  # noqa: E731
    first = backups[0]["t_start"]
    fulls = [(bk["t_job_running"], bk["t_job_concluded"]) for bk in backups
             if bk["type"] == "full" and bk["t_job_running"] and bk["t_job_concluded"]]
    streams = {}
    for name, label, _ in STREAMS:
        if name not in samples:
            continue
        writes = [(to_host(s / 1e9), lat / 1e6 / rate) for s, lat in samples[name]]
        idle = [lat for t, lat in writes if t_lat + 0.5 <= t < first]
        during = [lat for t, lat in writes if any(r <= t <= e for r, e in fulls)]
        streams[name] = {
            "label": label, "idle": stats_ms(idle), "during_full": stats_ms(during),
            # Every write: [its start, s after t0; its latency, ms].
            "writes": [[round(t - t_lat, 4), round(lat, 3)] for t, lat in writes]}
        if name == STREAMS[0][0]:
            # The guest's view of each freeze: its longest write in flight
            # between qbak's start and its job running (no flushes in this
            # stream, so no wait for the target's fsync).
            for bk in backups:
                run = bk["t_job_running"] or bk["t_end"]
                across = [lat for t, lat in writes if t < run and t + lat / 1e3 > bk["t_start"]]
                bk["stall_ms"] = max(across) if across else None
    for bk in backups:
        bk.setdefault("stall_ms", None)
        bk["job_s"] = (bk["t_job_concluded"] - bk["t_job_running"]
                       if bk["t_job_running"] and bk["t_job_concluded"] else None)
    return {
        "timing": ("timed in the guest by qbak-lat: %d KiB writes at random offsets over %d MiB "
                   "of files on ext4, each stream one write every %d ms"
                   % (GUEST_BS // 1024, GUEST_DATA // MiB, GUEST_INTERVAL_US // 1000))
        if have_lat else None,
        "disk_size": GUEST_DISK, "data_bytes": GUEST_DATA, "t0": t_lat,
        "streams": streams, "backups": backups,
        "clock": {"rate": rate, "error_ms": max(r0, r1) / 2 * 1e3},
    }


def report_lines(gr):
    """The guest-impact lines of bench.py's report, from res.guest."""
    if not gr:
        return ["guest impact: not measured (--skip guest)"]
    if "error" in gr:
        return ["guest impact: not measured (%s)" % gr["error"]]
    L = []
    bks = gr["backups"]
    win = [bk["window_ms"] for bk in bks]
    fulls = [bk for bk in bks if bk["type"] == "full"]
    incs = [bk["wall_s"] for bk in bks if bk["type"] != "full"]
    jobs = [bk["job_s"] for bk in fulls if bk["job_s"]]

    def spread(v, f="%.3f"):
        if len(v) == 1:
            return (f + " s") % v[0]
        return (f + " s [" + f + "-" + f + "]") % (statistics.median(v), min(v), max(v))
    L.append("guest impact: Linux test guest (TCG, qemu-ga, its writer running), %s ext4 data "
             "disk with %s of files; backups with --qga --quiesce require"
             % (human_b(gr["disk_size"]), human_b(gr["data_bytes"])))
    L.append("  freeze window (qbak's window_ms, freeze reply -> thaw request): median %.1f ms, "
             "max %.1f ms over %d backups (%d full, %d incremental)"
             % (statistics.median(win), max(win), len(win), len(fulls), len(incs)))
    L.append("  whole command with the freeze: full %s (its job %s)%s"
             % (spread([bk["wall_s"] for bk in fulls]), spread(jobs, "%.2f") if jobs else "?",
                ", incremental %s" % spread(incs) if incs else ""))
    if not gr.get("timing"):
        L.append("  guest write latency: not measured (the guest image has no qbak-lat)")
        return L
    f = lambda v: "%.1f" % v if v is not None else "-"  # noqa: E731
    L.append("  guest write latency (ms), %s:" % gr["timing"])
    for st in gr["streams"].values():
        i, d = st["idle"], st["during_full"]
        L.append("    %-17s no backup median %s p99 %s (%d writes); during a full median %s "
                 "p99 %s max %s (%d)" % (st["label"], f(i["median"]), f(i["p99"]), i["n"],
                                         f(d["median"]), f(d["p99"]), f(d["max"]), d["n"]))
    st = [bk["stall_ms"] for bk in bks if bk["stall_ms"] is not None]
    if st:
        L.append("    longest O_DIRECT write across each freeze (the guest's view of the freeze): "
                 "median %s, max %s" % (f(statistics.median(st)), f(max(st))))
    return L


def human_b(n):
    return "%d GiB" % (n // GiB) if n % GiB == 0 else "%d MiB" % (n // MiB)

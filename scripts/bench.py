#!/usr/bin/env python3
"""qbak's benchmark: qbak against the ways stock QEMU backs up a
disk, on one reference source disk, with the page cache dropped before every
timed step.  Run through scripts/bench.sh (`make bench`), which installs
what is missing and builds qbak first.

    scripts/bench.sh                 the reference: 4 GiB disk, 3 runs
    scripts/bench.sh --quick         256 MiB, 1 run: checks the script in < 1 min
    scripts/bench.sh --size 1G --runs 5 --skip guest,bigdisk

Prints a table (medians, [min-max], CPU seconds per process, the
speed targets as PASS/MISS) and writes build/bench/results.json and
build/bench/results.png.  Not part of the test suite.
"""
import argparse
import datetime
import json
import math
import mmap
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "lib"))
import qbaktest  # noqa: E402
from qbaktest import QBAK, QEMU, QEMU_IMG, VM  # noqa: E402
import bench_virtnbd  # noqa: E402  (scripts/, on sys.path as the script's dir)
import bench_guest  # noqa: E402  (scripts/, on sys.path as the script's dir)
import bench_integrity  # noqa: E402  (scripts/, on sys.path as the script's dir)
import bench_prune  # noqa: E402  (scripts/, on sys.path as the script's dir)
import bench_host  # noqa: E402  (scripts/, on sys.path as the script's dir)
import bench_files  # noqa: E402  (scripts/, on sys.path as the script's dir)
import bench_vmstate  # noqa: E402

QEMU_IO = shutil.which("qemu-io")

CLUSTER = 64 * 1024
LAYOUT_VERSION = 1
OUT = os.path.join(ROOT, "build", "bench")
TMP = os.path.join(OUT, "tmp")
DEV = "vd0"
NODE = "drive0"
QEMU_IO_DEV = "/machine/peripheral/%s/virtio-backend" % DEV
VMNAME = "bench"
GiB = 1 << 30
MiB = 1 << 20

# Every child process the benchmark starts that could outlive it; killed on
# every exit path (cleanup()).
CHILDREN = []


class BenchError(Exception):
    pass


def say(*a):
    print(*a, flush=True)


def note(*a):
    print("  ..", *a, file=sys.stderr, flush=True)


def parse_size(s):
    s = s.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human(n):
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= div:
            return "%.2f %s" % (n / div, unit)
    return "%d B" % n


def sh(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        raise BenchError("%s exited %d: %s%s" % (" ".join(cmd), p.returncode,
                                                  p.stdout[-2000:], p.stderr[-2000:]))
    return p


# ---------------------------------------------------------------- processes

def cleanup():
    for p in CHILDREN:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=10)
            except Exception:
                pass
    del CHILDREN[:]


class BenchVM(VM):
    """qbaktest.VM whose QEMU is killed if it fails to come up, and which is
    known to cleanup()."""

    def __init__(self, *a, **kw):
        try:
            super().__init__(*a, **kw)
        except BaseException:
            if getattr(self, "proc", None) is not None:
                self.proc.kill()
                self.proc.wait()
            raise
        finally:
            if getattr(self, "proc", None) is not None:
                CHILDREN.append(self.proc)
        self.qmp.sock.settimeout(300)

    def hmp_io(self, cmd):
        return self.qmp.hmp('qemu-io -d %s "%s"' % (QEMU_IO_DEV, cmd))

    def check_log(self, what):
        out = self.new_log()
        if "failed" in out or "error" in out.lower():
            raise BenchError("%s: QEMU said: %s" % (what, out[-1000:]))


def proc_cpu(pid):
    """user+sys CPU seconds of a running process (/proc/PID/stat)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


_drop_warned = []


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        if not _drop_warned:
            _drop_warned.append(1)
            say("WARNING: cannot drop the page cache (%s): run as root; "
                "times below are with a warm cache" % e)


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def timed(cmd, env=None):
    """Runs cmd from process start to exit; returns (wall s, rusage, rc,
    stdout, stderr, peak RSS KiB).  CPU comes from wait4.  The peak RSS
    comes from GNU time's own wait4 of cmd: a child that Python starts
    (vfork+exec) inherits Python's peak RSS in its ru_maxrss, one that the
    small GNU time starts does not (None without GNU time)."""
    rssfile = None
    if GNU_TIME:
        fd, rssfile = tempfile.mkstemp(prefix="rss-", dir=TMP)
        os.close(fd)
        cmd = [GNU_TIME, "-q", "-f", "%M", "-o", rssfile] + cmd
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        CHILDREN.append(p)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        CHILDREN.remove(p)
        out.seek(0)
        err.seek(0)
        rss = None
        if rssfile:
            try:
                with open(rssfile) as f:
                    rss = int(f.read().split()[-1])
            except (OSError, ValueError, IndexError):
                pass
            os.unlink(rssfile)
        return wall, ru, p.returncode, out.read().decode(errors="replace"), \
            err.read().decode(errors="replace"), rss


def wait_event(qmp, pred, timeout=3600):
    """The next QMP event matching pred (events that arrived during earlier
    commands are in qmp.events)."""
    deadline = time.monotonic() + timeout
    while True:
        for i, e in enumerate(qmp.events):
            if pred(e):
                del qmp.events[i]
                return e
        if time.monotonic() > deadline:
            raise BenchError("timed out waiting for a QMP event")
        try:
            r = qmp._recv()
        except socket.timeout:
            continue
        if "event" in r:
            qmp.events.append(r)


# ---------------------------------------------------------- reference disk

# Disk shapes: fractions of random data and written zeroes (the rest is never
# allocated).  "reference": the reference disk; "second": the second
# disk (2 GiB at full size), 30 % data, 10 % zeroes, 60 % never written.
SHAPES = {"reference": (0.4, 0.2), "second": (0.3, 0.1)}
SHAPE = "reference"


def layout_for(size, seed):
    """Cluster layout: runs of 1..32 clusters, each random data, written
    zeroes or never allocated (40/20/40 % of the clusters for the reference
    shape); plus the clusters each incremental rewrites."""
    n = size // CLUSTER
    rng = random.Random("qbak-bench-layout-%d%s" % (seed, "" if SHAPE == "reference"
                                                        else "-" + SHAPE))
    runs = []
    pos = 0
    while pos < n:
        k = min(rng.randint(1, 32), n - pos)
        runs.append([pos, k, None])
        pos += k
    order = list(range(len(runs)))
    rng.shuffle(order)
    quota = {"random": round(n * SHAPES[SHAPE][0]), "zero": round(n * SHAPES[SHAPE][1])}
    got = {"random": 0, "zero": 0, "none": 0}
    for i in order:
        kind = "none"
        for q in ("random", "zero"):
            if got[q] < quota[q]:
                kind = q
                break
        runs[i][2] = kind
        got[kind] += runs[i][1]
    irng = random.Random("qbak-bench-incrementals-%d" % seed)
    inc = {}
    for name, frac in (("1%", 0.01), ("10%", 0.10), ("0.1%a", 0.001),
                       ("0.1%b", 0.001), ("0.1%c", 0.001)):
        clusters = sorted(irng.sample(range(n), max(1, round(n * frac))))
        inc[name] = [[c, irng.randint(1, 255)] for c in clusters]
    return {"version": LAYOUT_VERSION, "seed": seed, "size": size, "cluster": CLUSTER,
            "clusters": n, "counts": got, "runs": runs, "incrementals": inc}


def coalesce(runs):
    """[start, count] runs merged where adjacent."""
    out = []
    for s, k in sorted(runs):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += k
        else:
            out.append([s, k])
    return out


def reference_disk(size, seed):
    base = os.path.join(OUT, "ref-%s-seed%d%s" % (size, seed, "" if SHAPE == "reference"
                                                   else "-" + SHAPE))
    img, meta = base + ".qcow2", base + ".json"
    if os.path.exists(img) and os.path.exists(meta):
        try:
            with open(meta) as f:
                lay = json.load(f)
            if lay.get("version") == LAYOUT_VERSION and lay.get("size") == size:
                return img, lay
        except ValueError:
            pass
    say("building the reference disk %s (seed %d, once; cached) ..." % (img, seed))
    t0 = time.monotonic()
    lay = layout_for(size, seed)
    raw, tmpimg = base + ".raw.tmp", base + ".qcow2.tmp"
    drng = random.Random("qbak-bench-data-%d" % seed)
    try:
        with open(raw, "wb") as f:
            f.truncate(size)
            for start, k, kind in lay["runs"]:
                if kind == "random":
                    f.seek(start * CLUSTER)
                    f.write(drng.randbytes(k * CLUSTER))
        sh([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=%d" % CLUSTER,
            raw, tmpimg])
        os.unlink(raw)
        zeros = coalesce([[s, k] for s, k, kind in lay["runs"] if kind == "zero"])
        cmds = ["write -q -P 0 %d %d" % (s * CLUSTER, k * CLUSTER) for s, k in zeros]
        for i in range(0, len(cmds), 2000):
            args = [QEMU_IO, "-f", "qcow2"]
            for c in cmds[i:i + 2000]:
                args += ["-c", c]
            p = sh(args + [tmpimg])
            if "failed" in p.stdout + p.stderr:
                raise BenchError("qemu-io: %s%s" % (p.stdout[-500:], p.stderr[-500:]))
        # The zero-written clusters must be data clusters, not zero flags.
        m = json.loads(sh([QEMU_IMG, "map", "--output=json", tmpimg]).stdout)
        data = sum(e["length"] for e in m if e["data"])
        want = (lay["counts"]["random"] + lay["counts"]["zero"]) * CLUSTER
        if data != want:
            raise BenchError("reference disk: %d bytes mapped as data, expected %d" % (data, want))
        with open(meta + ".tmp", "w") as f:
            json.dump(lay, f)
        os.rename(tmpimg, img)
        os.rename(meta + ".tmp", meta)
    finally:
        for p in (raw, tmpimg, meta + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)
    say("  built in %.1f s: %s allocated (%s random, %s written zeroes), %s unallocated"
        % (time.monotonic() - t0, human(want), human(lay["counts"]["random"] * CLUSTER),
           human(lay["counts"]["zero"] * CLUSTER), human(lay["counts"]["none"] * CLUSTER)))
    return img, lay


def copy_disk(src, dst):
    sh(["cp", "--sparse=always", src, dst])


def guest_rewrite(vm, clusters):
    """Guest writes (through the device) of a pattern per cluster;
    neighbouring clusters go in one write."""
    t0 = time.monotonic()
    runs = []
    for c, pat in clusters:
        if runs and runs[-1][0] + runs[-1][1] == c and runs[-1][2] == pat:
            runs[-1][1] += 1
        else:
            runs.append([c, 1, pat])
    vm.new_log()
    for c, k, pat in runs:
        vm.hmp_io("write -q -P %d %d %d" % (pat, c * CLUSTER, k * CLUSTER))
    vm.check_log("guest writes")
    return time.monotonic() - t0


# ------------------------------------------------------------------ methods

class Sample(dict):
    """One timed step: wall (s) plus whatever else was measured."""


def run_qbak(args, vm=None, what="qbak"):
    drop_caches()
    q0 = proc_cpu(vm.proc.pid) if vm else None
    wall, ru, rc, out, err, rss = timed([QBAK] + [str(a) for a in args])
    if rc != 0:
        raise BenchError("%s: qbak %s exited %d: %s%s" % (what, args[0], rc, out[-1500:], err[-1500:]))
    s = Sample(wall=wall, cpu=ru.ru_utime + ru.ru_stime)
    if rss is not None:
        s["rss_kib"] = rss
    if vm:
        s["qemu_cpu"] = proc_cpu(vm.proc.pid) - q0
    if "--json" in args:
        j = json.loads(out)
        s["json"] = j
        if "disks" in j:
            s["bytes"] = sum(d.get("bytes_written", 0) for d in j["disks"])
            s["types"] = [d.get("type") for d in j["disks"]]
        if "duration_s" in j:
            s["qbak_duration_s"] = j["duration_s"]
    return s


def qbak_backup(vm, repo, full=False, what="qbak backup", mode=None):
    args = ["backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", VMNAME, "--json"]
    if full:
        args.append("--full")
    if mode:
        args += ["--mode", mode]
    s = run_qbak(args, vm, what)
    want = "full" if full else "incremental"
    if s["types"] != [want]:
        raise BenchError("%s: expected a %s backup, qbak made %s (%s)"
                         % (what, want, s["types"], s["json"]["disks"][0].get("reason")))
    return s


class QemuPush:
    """QEMU's own blockdev-backup, into a local qcow2 chain (kind "native")
    or to an NBD server (kind "nbd"), with its own dirty bitmap."""

    def __init__(self, vm, kind, workdir, size, nbd_sock=None, nbd_proc=None):
        self.vm, self.kind, self.dir, self.size = vm, kind, workdir, size
        self.nbd_sock, self.nbd_proc = nbd_sock, nbd_proc
        self.bitmap = "bench-%s" % kind
        self.n = 0
        self.prev = None

    def backup(self):
        qmp = self.vm.qmp
        full = self.n == 0
        node = "bench-%s-%d" % (self.kind, self.n)
        job = "bench-job-%s-%d" % (self.kind, self.n)
        target = None
        create = None
        if self.kind == "native":
            target = os.path.join(self.dir, "native-%d.qcow2" % self.n)
            create = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % CLUSTER]
            if self.prev:
                create += ["-b", os.path.basename(self.prev), "-F", "qcow2"]
            create += [target, str(self.size)]
            add = {"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": target}}
        else:
            add = {"driver": "nbd", "node-name": node,
                   "server": {"type": "unix", "path": self.nbd_sock}}
        drop_caches()
        q0 = proc_cpu(self.vm.proc.pid)
        k0 = proc_cpu(self.nbd_proc.pid) if self.nbd_proc else None
        t0 = time.monotonic()
        # The whole command, as for qbak: the target image is made inside
        # the timed part, and the result is durable at the end (the file
        # and its directory entry fsynced, as qbak's commit does).
        if create:
            sh(create)
        qmp.cmd("blockdev-add", **add)
        actions = []
        backup = {"job-id": job, "device": NODE, "target": node,
                  "sync": "full" if full else "incremental"}
        if full:
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": NODE, "name": self.bitmap}})
        else:
            backup["bitmap"] = self.bitmap
        actions.append({"type": "blockdev-backup", "data": backup})
        qmp.cmd("transaction", actions=actions)
        ev = wait_event(qmp, lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                        and e["data"].get("device") == job)
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise BenchError("QEMU %s backup failed: %s" % (self.kind, ev))
        qmp.cmd("blockdev-del", **{"node-name": node})  # flushes qcow2 metadata
        if target:
            for path in (target, self.dir):
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        wall = time.monotonic() - t0
        s = Sample(wall=wall, qemu_cpu=proc_cpu(self.vm.proc.pid) - q0)
        if self.nbd_proc:
            s["nbdkit_cpu"] = proc_cpu(self.nbd_proc.pid) - k0
        if target:
            s["bytes"] = os.stat(target).st_blocks * 512
            self.prev = target
        self.n += 1
        return s


def start_nbdkit(workdir, size):
    nbdkit = shutil.which("nbdkit")
    if not nbdkit:
        return None, None
    sock = os.path.join(workdir, "null.sock")
    log = open(os.path.join(workdir, "nbdkit.log"), "w")
    p = subprocess.Popen([nbdkit, "-f", "-U", sock, "--exit-with-parent", "null",
                          "size=%d" % size], stdout=log, stderr=log)
    log.close()
    CHILDREN.append(p)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > deadline:
            raise BenchError("nbdkit did not start (see %s/nbdkit.log)" % workdir)
        time.sleep(0.02)
    return p, sock


def stop_proc(p):
    if p and p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in CHILDREN:
        CHILDREN.remove(p)


def write_limit(path, nbytes, seed):
    """The disk's write limit: nbytes of random data written with O_DIRECT in
    4 MiB requests from one page-aligned buffer (dd oflag=direct conv=fsync)
    into a new file, fsync included."""
    bs = 4 * MiB
    buf = mmap.mmap(-1, bs)
    buf.write(random.Random(seed).randbytes(bs))
    view = memoryview(buf)
    nbytes = (nbytes + 4095) // 4096 * 4096
    drop_caches()
    t0 = time.monotonic()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError as e:
        raise BenchError("disk write limit: cannot open %s with O_DIRECT (%s); "
                         "--skip limit" % (path, e))
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, view[:min(bs, nbytes - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.monotonic() - t0
    os.unlink(path)
    view.release()
    buf.close()
    return Sample(wall=wall, bytes=nbytes, gib_s=nbytes / GiB / wall)


def read_limit(path):
    """The disk's read limit for the source's allocated data: the source
    image file read whole with O_DIRECT in 4 MiB requests (its allocated
    clusters, headers and tables; holes read as the file system's zeroes)."""
    bs = 4 * MiB
    buf = mmap.mmap(-1, bs)
    nbytes = os.stat(path).st_blocks * 512
    drop_caches()
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off, end = 0, os.fstat(fd).st_size
        while off < end:
            # Only the file's data: SEEK_DATA skips its holes.
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, off, os.SEEK_HOLE)
            while off < hole:
                n = os.preadv(fd, [buf], off)
                if n <= 0:
                    break
                off += n
    finally:
        os.close(fd)
    wall = time.monotonic() - t0
    buf.close()
    return Sample(wall=wall, bytes=nbytes, gib_s=nbytes / GiB / wall)


# ----------------------------------------------------------------- the runs

def one_run(r, args, ref, lay, work, res):
    size = lay["size"]
    rdir = os.path.join(work, "run%d" % r)
    os.mkdir(rdir)
    src = os.path.join(rdir, "src.qcow2")
    copy_disk(ref, src)
    vm = BenchVM(rdir, [(DEV, src, "qcow2")])
    nbd_proc = None
    try:
        repo = os.path.join(rdir, "repo")
        push_repo = os.path.join(rdir, "repo-push")
        # "qbak": qbak --mode pull; "push": qbak --mode push.
        methods = ["qbak", "push", "native"]
        pushers = {"native": QemuPush(vm, "native", rdir, size)}
        if "nbd" not in args.skip:
            nbd_proc, nbd_sock = start_nbdkit(rdir, size)
            if nbd_proc:
                pushers["nbd"] = QemuPush(vm, "nbd", rdir, size, nbd_sock, nbd_proc)
                methods.append("nbd")
        if "native" in args.skip:
            methods.remove("native")
        rot = r % len(methods)
        order = methods[rot:] + methods[:rot]

        def step(phase, m, full=False):
            if m == "qbak":
                s = qbak_backup(vm, repo, full=full, what="%s qbak" % phase, mode="pull")
            elif m == "push":
                s = qbak_backup(vm, push_repo, full=full, what="%s qbak push" % phase,
                                mode="push")
            else:
                s = pushers[m].backup()
            res.add("%s.%s" % (phase, m), s)
            note("run %d %-6s %-6s %.3f s%s" % (r + 1, phase, m, s["wall"], " (qbak's own duration_s %.3f)"
                                                % s["qbak_duration_s"] if "qbak_duration_s" in s else ""))
            return s

        qfull = None
        limits = None  # (write, read) GiB/s of this run
        for m in order:
            s = step("full", m, full=True)
            if m == "qbak":
                qfull = s
        if "limit" not in args.skip:
            nb = qfull["bytes"]
            s = write_limit(os.path.join(rdir, "ddtest"), nb, args.seed + r)
            s["implied_for_qbak"] = qfull["bytes"] / GiB / s["gib_s"]
            res.add("full.limit", s)
            note("run %d full   limit  %.3f s (%.2f GiB/s)" % (r + 1, s["wall"], s["gib_s"]))
            rl = read_limit(src)
            res.add("full.readlimit", rl)
            limits = (s["gib_s"], rl["gib_s"])
            note("run %d full   read limit %.3f s (%.2f GiB/s, %s)"
                 % (r + 1, rl["wall"], rl["gib_s"], human(rl["bytes"])))

        for phase in ("1%", "10%", "0.1%a", "0.1%b", "0.1%c"):
            t = guest_rewrite(vm, lay["incrementals"][phase])
            note("run %d rewrote %d clusters (%s) in %.1f s"
                 % (r + 1, len(lay["incrementals"][phase]), phase, t))
            key = "inc" + phase.rstrip("abc")
            if phase.startswith("0.1%"):
                step(key, "qbak")
                step(key, "push")
            else:
                for m in order:
                    st = step(key, m)
                    if m == "qbak" and limits and phase == "10%":
                        # The disk's limits for this incremental's bytes:
                        # reading them plus writing them, at best.
                        nb = st["bytes"] / GiB
                        res.add("inc10%.limit", Sample(wall=nb / limits[0] + nb / limits[1],
                                                       bytes=st["bytes"]))

        if "restore" not in args.skip:
            restore_step(r, vm, rdir, repo, src, res)
    finally:
        vm.stop()
        if vm.proc in CHILDREN:
            CHILDREN.remove(vm.proc)
        stop_proc(nbd_proc)
    if not args.keep:
        shutil.rmtree(rdir, ignore_errors=True)


def restore_step(r, vm, rdir, repo, src, res):
    points = json.loads(sh([QBAK, "list", "--repo", repo, "--vm", VMNAME, "--json"]).stdout)["points"]
    top = points[-1]
    incs = sum(1 for p in points if p.get("parent"))
    out_q = os.path.join(rdir, "restore-qbak.raw")
    out_c = os.path.join(rdir, "restore-convert.raw")
    topfile = os.path.join(repo, VMNAME, top["point"],
                           [d["file"] for d in top["disks"] if d["disk"] == DEV][0])

    def restore_qbak():
        s = run_qbak(["restore", "--repo", repo, "--vm", VMNAME, "--disk", DEV,
                      "--point", top["point"], "--output", out_q, "--format", "raw"],
                     what="restore")
        s["chain"] = len(points)
        res.add("restore.qbak", s)
        note("run %d restore qbak    %.3f s (full + %d incrementals)" % (r + 1, s["wall"], incs))

    def restore_convert():
        drop_caches()
        t0 = time.monotonic()
        wall, ru, rc, out, err, rss = timed([QEMU_IMG, "convert", "-O", "raw", topfile, out_c])
        if rc != 0:
            raise BenchError("qemu-img convert exited %d: %s" % (rc, err[-1000:]))
        fd = os.open(out_c, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        s = Sample(wall=time.monotonic() - t0, cpu=ru.ru_utime + ru.ru_stime)
        if rss is not None:
            s["rss_kib"] = rss
        res.add("restore.convert", s)
        note("run %d restore convert %.3f s" % (r + 1, s["wall"]))

    # Whoever goes first meets the disk still busy with the backups' writes
    # (the host's cache flushing them): the order alternates between runs,
    # as the backup methods' order rotates.
    for step in ((restore_qbak, restore_convert) if r % 2 == 0
                 else (restore_convert, restore_qbak)):
        step()
    if r == 0:
        # Not timed: the restore is the disk as it is now (no guest writes
        # since the last backup), and qemu-img reading qbak's chain agrees.
        vm.flush(DEV)
        for a, fa, b in ((out_q, "raw", out_c), (src, "qcow2", out_q)):
            p = subprocess.run([QEMU_IMG, "compare", "-q", "-U", "-f", fa, "-F", "raw", a, b])
            if p.returncode != 0:
                raise BenchError("restore check: %s and %s differ" % (a, b))
        note("restore checked: identical to the source disk and to qemu-img's reading of the chain")
    os.unlink(out_q)
    os.unlink(out_c)


def bigdisk_step(args, work, res):
    """0-dirty incrementals of a 64 GiB and a 1 GiB disk holding the same
    64 MiB of data: the cost should not grow with the disk size."""
    vms = {}
    try:
        for name, size in (("64G", 64 * GiB), ("1G", GiB)):
            d = os.path.join(work, "big-%s" % name)
            os.mkdir(d)
            img = qbaktest.make_disk(os.path.join(d, "disk.qcow2"), size)
            cmds = []
            for i in range(64):
                cmds += ["-c", "write -q -P %d %d 1M" % (i + 1, size // 64 * i)]
            sh([QEMU_IO, "-f", "qcow2"] + cmds + [img])
            vm = BenchVM(d, [(DEV, img, "qcow2")])
            vms[name] = (vm, os.path.join(d, "repo"))
            s = qbak_backup(vm, vms[name][1], full=True, what="%s full" % name)
            res.add("bigfull.%s" % name, s)
            note("full of the %s disk: %.3f s, peak RSS %d KiB" % (name, s["wall"], s["rss_kib"]))
        for r in range(args.runs):
            for name in (("64G", "1G") if r % 2 == 0 else ("1G", "64G")):
                vm, repo = vms[name]
                s = qbak_backup(vm, repo, what="%s 0-dirty incremental" % name)
                res.add("zero.%s" % name, s)
                note("run %d 0-dirty incremental %-3s %.3f s" % (r + 1, name, s["wall"]))
    finally:
        for vm, _ in vms.values():
            vm.stop()
            if vm.proc in CHILDREN:
                CHILDREN.remove(vm.proc)


def guest_step(args, ref, lay, work, res):
    """Guest impact with the real Linux test guest: qbak's freeze window and
    the latency of writes timed inside the guest, idle and during a qbak
    full (scripts/bench_guest.py)."""
    bench_guest.guest_step(args, work, res, sys.modules[__name__])


def virtnbdbackup_step(args, res):
    """virtnbdbackup (pull mode, through libvirt) on the same reference disk:
    full, 1 % and 10 % incrementals per run (scripts/bench_virtnbd.py)."""
    bench_virtnbd.virtnbdbackup_step(args, res, sys.modules[__name__])


# ----------------------------------------------------------------- results

class Results:
    def __init__(self):
        self.steps = {}
        self.guest = None
        self.vmstate = None
        self.virtnbdbackup = None
        self.host = None
        self.files = None

    def add(self, key, sample):
        sample.pop("json", None)
        self.steps.setdefault(key, []).append(dict(sample))

    def vals(self, key, field="wall"):
        return [s[field] for s in self.steps.get(key, []) if field in s
                and not (isinstance(s[field], float) and math.isnan(s[field]))]

    def med(self, key, field="wall"):
        v = self.vals(key, field)
        return statistics.median(v) if v else None


def pctl(v, q):
    v = sorted(v)
    return v[max(0, math.ceil(q * len(v)) - 1)] if v else None


def fmt_t(v):
    if not v:
        return "-"
    m = statistics.median(v)
    if len(v) == 1:
        return "%.3f s" % m
    return "%.3f s [%.3f-%.3f]" % (m, min(v), max(v))


def fmt_cpu(v):
    return "%.2f" % statistics.median(v) if v else "-"


def report(args, lay, res, meta):
    size = lay["size"]
    alloc = (lay["counts"]["random"] + lay["counts"]["zero"]) * CLUSTER
    lines = []
    P = lines.append
    P("")
    P("qbak benchmark: %s qcow2 source (%s shape), 64 KiB clusters (%s random, %s written zeroes, "
      "%s never allocated; %s allocated)"
      % (human(size), SHAPE, human(lay["counts"]["random"] * CLUSTER),
         human(lay["counts"]["zero"] * CLUSTER), human(lay["counts"]["none"] * CLUSTER),
         human(alloc)))
    P("QEMU %s, %d cores, %s; seed %d; %d run(s): median [min-max]; page cache dropped "
      "before every timed step" % (meta["qemu"], os.cpu_count(), meta["kernel"], args.seed,
                                   args.runs))
    P("load average at start %s, at end %s (other work on this machine makes times noisy)"
      % (meta["load_start"], meta["load_end"]))
    P("")
    cols = [("full", "full, durable"), ("inc1%", "1 % inc"), ("inc10%", "10 % inc"),
            ("inc0.1%", "0.1 % inc"), ("restore", "restore (full+5)")]
    rows = [("qbak", "qbak --mode pull (whole cmd)", ["full", "inc1%", "inc10%", "inc0.1%"],
             "qbak"),
            ("push", "qbak --mode push (whole cmd)", ["full", "inc1%", "inc10%", "inc0.1%"], None),
            ("native", "QEMU blockdev-backup -> local qcow2", ["full", "inc1%", "inc10%"], None),
            ("nbd", "QEMU blockdev-backup -> nbdkit null", ["full", "inc1%", "inc10%"], None),
            ("virtnbd", "virtnbdbackup, libvirt pull + fsync", ["full", "inc1%", "inc10%"], None),
            ("limit", "disk write limit, qbak's bytes", ["full"], None),
            ("readlimit", "disk read limit, allocated data", ["full"], None),
            ("inclimit", "disk read + write limit, its bytes", ["inc10%"], None),
            ("convert", "qemu-img convert + fsync", [], None)]
    w0 = 38
    P("%-*s" % (w0, "time") + "".join("%-24s" % c[1] for c in cols))
    for m, label, phases, _ in rows:
        cells = []
        for key, _ in cols:
            if key == "restore":
                k = "restore.qbak" if m == "qbak" else "restore.convert" if m == "convert" else None
                cells.append(fmt_t(res.vals(k)) if k else "")
            elif m == "limit" and key == "full":
                cells.append(fmt_t(res.vals("full.limit", "implied_for_qbak")))
            elif m == "readlimit" and key == "full":
                cells.append(fmt_t(res.vals("full.readlimit")))
            elif m == "inclimit" and key == "inc10%":
                cells.append(fmt_t(res.vals("inc10%.limit")))
            elif key in phases:
                cells.append(fmt_t(res.vals("%s.%s" % (key, m))))
            else:
                cells.append("")
        P("%-*s" % (w0, label) + "".join("%-24s" % c for c in cells))
    P("%-*s%s" % (w0, "virtnbdbackup:", res.virtnbdbackup))
    P("")
    P("CPU seconds (median) of each process in each step; bytes written; peak RSS (max);")
    P("qbak's own duration_s (median: from its start of work to its commit)")
    P("%-28s %9s %9s %9s %12s %10s %10s" % ("step", "qbak/tool", "QEMU", "nbdkit", "written",
                                          "peak RSS", "qbak says"))
    for key in ["full.qbak", "full.push", "inc1%.push", "inc10%.push", "inc0.1%.push",
                "full.readlimit", "full.native", "full.nbd", "full.virtnbd", "full.limit", "inc1%.qbak",
                "inc1%.native", "inc1%.nbd", "inc1%.virtnbd", "inc10%.qbak", "inc10%.native",
                "inc10%.nbd", "inc10%.virtnbd", "inc0.1%.qbak",
                "restore.qbak", "restore.convert", "bigfull.64G", "bigfull.1G", "zero.64G",
                "zero.1G"] + bench_prune.STEP_KEYS:
        if key not in res.steps:
            continue
        b = res.vals(key, "bytes")
        rss = res.vals(key, "rss_kib")
        own = res.vals(key, "qbak_duration_s")
        P("%-28s %9s %9s %9s %12s %10s %10s" % (
            key, fmt_cpu(res.vals(key, "cpu")), fmt_cpu(res.vals(key, "qemu_cpu")),
            fmt_cpu(res.vals(key, "nbdkit_cpu")), human(statistics.median(b)) if b else "-",
            "%.1f MiB" % (max(rss) / 1024) if rss else "-",
            "%.3f s" % statistics.median(own) if own else "-"))
    lim = res.vals("full.limit", "gib_s")
    if lim:
        P("disk write limit: %.2f GiB/s [%.2f-%.2f] with O_DIRECT 4 MiB writes + fsync"
          % (statistics.median(lim), min(lim), max(lim)))
    for line in bench_vmstate.report_lines(res.vmstate):
        P(line)
    for line in bench_guest.report_lines(res.guest):
        P(line)
    for line in bench_integrity.report_lines(res, sys.modules[__name__]):
        P(line)
    for line in bench_prune.report_lines(res):
        P(line)
    for line in bench_host.report_lines(res.host):
        P(line)
    for line in bench_files.report_lines(res.files):
        P(line)
    P("")
    P("targets (backup, restore), from the medians above")
    targets = []

    def target(name, value, ok, goal, fmt="%.2f"):
        if value is None:
            targets.append({"target": name, "value": None, "goal": goal, "result": "n/a"})
            P("  %-58s %10s  %-12s %s" % (name, "-", goal, "n/a"))
            return
        r = "PASS" if ok else "MISS"
        targets.append({"target": name, "value": value, "goal": goal, "result": r})
        P("  %-58s %10s  %-12s %s" % (name, fmt % value, goal, r))

    def ratio(a, b):
        return a / b if a is not None and b else None

    q, n = res.med("full.qbak"), res.med("full.native")
    v = ratio(n, q)
    target("full: speedup of qbak over QEMU native (x)", v, v is not None and v >= 3, ">= 3")
    v = ratio(q, res.med("full.limit", "implied_for_qbak"))
    target("full: qbak / disk write limit for qbak's bytes (x)", v, v is not None and v <= 1.3,
           "<= 1.3")
    v = res.med("inc1%.qbak")
    target("1 % incremental: qbak whole command (s)", v, v is not None and v < 0.25, "< 0.25",
           "%.3f")
    v = ratio(res.med("inc10%.qbak"), res.med("inc10%.native"))
    target("10 % incremental: qbak / QEMU native (x)", v, v is not None and v <= 1, "<= 1")
    v = ratio(res.med("restore.qbak"), res.med("restore.convert"))
    target("restore full+5: qbak / qemu-img convert (x)", v, v is not None and v <= 1, "<= 1")
    v = ratio(res.med("zero.64G"), res.med("zero.1G"))
    target("0-dirty incremental: 64 GiB disk / 1 GiB disk (x)", v, v is not None and v <= 1.5,
           "<= 1.5")
    for t in bench_integrity.targets(res, ratio):
        target(*t)
    for row in bench_files.targets(res.files):
        target(*row)
    rss = res.vals("full.qbak", "rss_kib")
    v = max(rss) / 1024 if rss else None
    target("peak RSS of qbak, full of the %s disk (MiB)" % human(size), v,
           v is not None and v < 64, "< 64", "%.1f")
    bench_prune.targets(res, target, ratio)
    P("")
    P("CPU seconds per GiB backed up (median CPU / median bytes written): qbak + QEMU")
    for key in ("full.qbak", "full.push", "full.native", "inc10%.qbak", "inc10%.push",
                "inc10%.native", "inc1%.qbak", "inc1%.push", "inc1%.native"):
        b = res.med(key, "bytes")
        if not b:
            continue
        qc, ec = res.med(key, "cpu"), res.med(key, "qemu_cpu")
        P("  %-16s qbak %6s  QEMU %6s  (s/GiB)" % (
            key, "%.2f" % (qc / (b / GiB)) if qc is not None else "-",
            "%.2f" % (ec / (b / GiB)) if ec is not None else "-"))
    P("")
    P("targets (pull mode), from the medians above")
    q = res.med("full.qbak")
    v = ratio(res.med("full.native"), q)
    target("full: pull speedup over QEMU native (x)", v, v is not None and v >= 1.5, ">= 1.5")
    lim = None
    if res.med("full.limit", "implied_for_qbak") and res.med("full.readlimit"):
        lim = res.med("full.limit", "implied_for_qbak") + res.med("full.readlimit")
    v = ratio(q, lim)
    target("full: pull / disk limit (read + write of its bytes) (x)", v,
           v is not None and v <= 1.3, "<= 1.3")
    for inc in ("inc10%", "inc1%"):
        v = ratio(res.med(inc + ".native"), res.med(inc + ".qbak"))
        target("%s incremental: QEMU native / pull (x)" % inc[3:], v,
               v is not None and v >= 1.2, ">= 1.2")
    gr = res.guest or {}
    for st in (gr.get("streams") or {}).values():
        i, d = st["idle"], st["during_full"]
        for q_ in ("median", "p99"):
            v = ratio(d.get(q_), i.get(q_))
            target("guest %s latency %s: during %s full / idle (x)"
                   % (st["label"], q_, args.guest_mode or "pull"),
                   v, v is not None and v <= 1.5, "<= 1.5")
    P("")
    P("for comparison (no target)")
    for name, a, b in (("full: QEMU -> nbdkit null / qbak (x)", "full.nbd", "full.qbak"),
                       ("1 % incremental: QEMU native / qbak (x)", "inc1%.native", "inc1%.qbak"),
                       ("10 % incremental: QEMU -> nbdkit null / qbak (x)", "inc10%.nbd",
                        "inc10%.qbak"),
                       ("10 % incremental: QEMU native / disk read + write limit (x)",
                        "inc10%.native", "inc10%.limit")):
        v = ratio(res.med(a), res.med(b))
        P("  %-58s %10s" % (name, "%.2f" % v if v else "-"))
    big, small = res.vals("bigfull.64G", "rss_kib"), res.vals("bigfull.1G", "rss_kib")
    if big and small:
        P("  %-58s %10s" % ("peak RSS of qbak, full of 64 GiB / 1 GiB sparse disk (MiB)",
                            "%.1f / %.1f" % (big[0] / 1024, small[0] / 1024)))
    if size != 4 * GiB:
        P("")
        P("NOTE: --size %s is not the reference 4 GiB disk: the targets are for the reference."
          % human(size))
    text = "\n".join(lines)
    say(text)
    return targets, text


def gq(text):
    """A gnuplot single-quoted string."""
    return "'%s'" % text.replace("'", "''")


def chart(res, path, title):
    gp = shutil.which("gnuplot")
    if not gp:
        say("no gnuplot: no chart (apt-get install gnuplot-nox)")
        return False
    series = [("qbak", "qbak", "#2ca02c"), ("native", "QEMU -> local qcow2", "#1f77b4"),
              ("nbd", "QEMU -> nbdkit null", "#ff7f0e"),
              ("virtnbd", "virtnbdbackup (libvirt pull)", "#d62728"),
              ("limit", "disk write limit (qbak's bytes)", "#7f7f7f"),
              ("convert", "qemu-img convert", "#9467bd")]
    panels = [("Full backup and restore, durable (s)", [("full", "full"), ("restore", "restore full+5")]),
              ("Incremental backups (s)", [("inc1%", "1 % inc"), ("inc10%", "10 % inc")])]

    def vals(group, m):
        if group == "restore":
            key = {"qbak": "restore.qbak", "convert": "restore.convert"}.get(m)
            return res.vals(key) if key else []
        if m == "limit":
            return res.vals("full.limit", "implied_for_qbak") if group == "full" else []
        if m == "convert":
            return []
        return res.vals("%s.%s" % (group, m))

    script = ["set terminal pngcairo size 1200,600 font 'sans,10'",
              "set output '%s'" % path,
              "set multiplot layout 1,2 title %s" % gq(title),
              "set style fill solid 0.85 border -1", "set grid ytics", "set yrange [0:*]",
              "set key outside bottom center horizontal maxrows 2 width 2",
              "set boxwidth 0.16",
              "set offsets 0, 0, graph 0.08, 0"]
    for title_p, groups in panels:
        script.append("set title %s" % gq(title_p))
        script.append("set xtics (%s)" % ", ".join("%s %d" % (gq(g[1].replace("%", "%%")), i) for i, g in enumerate(groups)))
        script.append("set xrange [-0.6:%f]" % (len(groups) - 0.4))
        plots = []
        pos = {}
        for gi, g in enumerate(groups):
            here = [m for m, _, _ in series if vals(g[0], m)]
            for bi, m in enumerate(here):
                pos[(gi, m)] = gi + (bi - (len(here) - 1) / 2) * 0.18
        for si, (m, label, color) in enumerate(series):
            present = [(gi, vals(g[0], m)) for gi, g in enumerate(groups) if vals(g[0], m)]
            if not present:
                continue
            name = "$d%d%d" % (panels.index((title_p, groups)), si)
            script.append("%s << EOD" % name)
            for gi, v in present:
                med = statistics.median(v)
                script.append("%f %f %f %f \"%s\"" % (pos[(gi, m)], med, min(v), max(v),
                                                       "%.2f" % med if med >= 0.1 else "%.3f" % med))
            script.append("EOD")
            plots.append("%s using 1:2 with boxes lc rgb '%s' title %s" % (name, color, gq(label)))
            plots.append("%s using 1:3:(0):($4-$3) with vectors nohead lc rgb 'black' notitle" % name)
            plots.append("%s using 1:4:5 with labels offset 0,0.7 font 'sans,8' notitle" % name)
        if not plots:  # every step of this panel was skipped
            plots = ["0 lc rgb 'white' notitle"]
            script += ["set yrange [0:1]",
                       "set label 1 'not measured in this run' at graph 0.5, 0.5 center"]
        script.append("plot " + ", \\\n  ".join(plots))
        script += ["unset label 1", "set yrange [0:*]"]
        script.append("unset key")  # the first panel's names all the series
    script.append("unset multiplot")
    gpfile = os.path.splitext(path)[0] + ".gp"
    with open(gpfile, "w") as f:
        f.write("\n".join(script) + "\n")
    p = subprocess.run([gp, gpfile], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        say("gnuplot failed (%s): %s" % (gpfile, p.stderr[-800:]))
        return False
    return True


# -------------------------------------------------------------------- main

def loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def preflight():
    missing = [n for n, p in (("qemu-system-x86_64", QEMU), ("qemu-img", QEMU_IMG),
                              ("qemu-io", QEMU_IO)) if not p]
    if missing:
        raise BenchError("missing %s: run scripts/install-deps.sh (or scripts/bench.sh)"
                         % ", ".join(missing))
    if not os.access(QBAK, os.X_OK):
        raise BenchError("no qbak binary at %s: run make qbak (or scripts/bench.sh)" % QBAK)


def clean_stale_tmp():
    """Work dirs of earlier benchmark processes that died without cleaning."""
    if not os.path.isdir(TMP):
        return
    for e in os.listdir(TMP):
        pid = e.split("-", 1)[0]
        if pid.isdigit() and not os.path.exists("/proc/%s" % pid):
            shutil.rmtree(os.path.join(TMP, e), ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description="qbak benchmark; see scripts/bench.py")
    ap.add_argument("--size", default="4G", help="source disk size (default 4G, the reference)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--seed", type=int, default=5, help="seed of the disk layout and writes")
    ap.add_argument("--quick", action="store_true", help="--size 256M --runs 1")
    ap.add_argument("--shape", default="reference", choices=sorted(SHAPES),
                    help="disk shape: reference (40 %% data, 20 %% zeroes) or second "
                    "(30 %% data, 10 %% zeroes, the rest never written)")
    ap.add_argument("--guest-mode", choices=["pull", "push"],
                    help="mode of the guest-impact backups (default: qbak's default)")
    ap.add_argument("--guest-args", default="",
                    help="more arguments for the guest-impact backups, e.g. "
                    "'--speed 20M' or '--scratch /dev/shm'")
    ap.add_argument("--guest-dir",
                    help="directory for the guest-impact step's disk copy and repository "
                    "(e.g. a tmpfs, to take the disk out of the picture)")
    ap.add_argument("--skip", default="", help="comma list of: "
                    "main,native,nbd,limit,restore,bigdisk,guest,virtnbdbackup,integrity,prune,host,files,vmstate")
    ap.add_argument("--keep", action="store_true", help="keep the work dirs under build/bench/tmp")
    args = ap.parse_args()
    if args.quick:
        args.size, args.runs = "256M", 1
    size = parse_size(args.size)
    if size <= 0 or size % CLUSTER:
        raise BenchError("--size must be a positive multiple of 64 KiB")
    if args.runs < 1:
        raise BenchError("--runs must be at least 1")
    args.skip = set(s for s in args.skip.split(",") if s)
    global SHAPE
    SHAPE = args.shape
    preflight()
    os.makedirs(TMP, exist_ok=True)
    clean_stale_tmp()
    if not shutil.which("nbdkit"):
        say("nbdkit not installed: no QEMU -> nbdkit null rows (apt-get install nbdkit)")
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "qemu": sh([QEMU_IMG, "--version"]).stdout.split()[2],
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                               if l.startswith("model name")), "?"),
            "load_start": loadavg(), "size": size, "runs": args.runs, "seed": args.seed}
    try:
        meta["qbak_commit"] = sh(["git", "-C", ROOT, "describe", "--always", "--dirty"]).stdout.strip()
    except (BenchError, OSError):
        meta["qbak_commit"] = "?"
    ref, lay = reference_disk(size, args.seed)
    work = tempfile.mkdtemp(prefix="%d-" % os.getpid(), dir=TMP)
    res = Results()
    t0 = time.monotonic()
    try:
        for r in range(args.runs if "main" not in args.skip else 0):
            say("run %d of %d ..." % (r + 1, args.runs))
            one_run(r, args, ref, lay, work, res)
        if "prune" not in args.skip:
            say("prune of a full and %d incrementals ..." % bench_prune.INCREMENTALS)
            bench_prune.prune_step(args, ref, lay, work, res, sys.modules[__name__])
        if "bigdisk" not in args.skip:
            say("0-dirty incrementals, 64 GiB vs 1 GiB disk ...")
            bigdisk_step(args, work, res)
        if "integrity" not in args.skip:
            say("verify and checked restore of a full + 10 incrementals ...")
            bench_integrity.integrity_step(args, ref, lay, work, res, sys.modules[__name__])
        if "guest" not in args.skip:
            say("guest write latency, idle and during a qbak full ...")
            guest_step(args, ref, lay, work, res)
        if "host" not in args.skip:
            say("host: qbak run --all over %s VMs ..."
                % ", ".join(map(str, bench_host.QUICK_COUNTS if args.quick else bench_host.COUNTS)))
            bench_host.host_step(args, work, res, sys.modules[__name__])
        if "files" not in args.skip:
            say("file-level access: index, find, ls, get ...")
            try:
                bench_files.files_step(args, work, res, sys.modules[__name__])
            except (BenchError, RuntimeError, OSError) as e:
                res.files = "failed: %s" % e
        if "vmstate" not in args.skip:
            say("whole VM: guest pause with --memory, restore --start --live vs cold ...")
            bench_vmstate.vmstate_step(args, work, res, sys.modules[__name__])
        if "virtnbdbackup" not in args.skip:
            virtnbdbackup_step(args, res)
        else:
            res.virtnbdbackup = "skipped"
    finally:
        cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["load_end"] = loadavg()
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    targets, text = report(args, lay, res, meta)
    summary = {}
    for key in res.steps:
        v = res.vals(key)
        if v:
            summary[key] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
    out = {"meta": meta, "layout": {k: lay[k] for k in ("seed", "size", "cluster", "clusters",
                                                         "counts")},
           "summary": summary, "steps": res.steps, "targets": targets,
           "guest": res.guest, "virtnbdbackup": res.virtnbdbackup, "host": res.host,
           "guest": res.guest, "virtnbdbackup": res.virtnbdbackup, "files": res.files,
           "guest": res.guest, "vmstate": res.vmstate, "virtnbdbackup": res.virtnbdbackup,
           "table": text}
    jpath = os.path.join(OUT, "results.json")
    with open(jpath + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.rename(jpath + ".tmp", jpath)
    png = os.path.join(OUT, "results.png")
    ok = chart(res, png, "qbak vs QEMU, %s source disk, median of %d run(s), min-max bars"
               % (human(size), args.runs))
    say("")
    say("wrote %s%s (%.0f s in all)" % (jpath, " and " + png if ok else "", meta["elapsed_s"]))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    signal.signal(signal.SIGHUP, lambda s, f: sys.exit(128 + s))
    try:
        sys.exit(main())
    except BenchError as e:
        print("bench: %s" % e, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()

"""Shared helpers for qbak's integration tests against real QEMU.

Each test is a script exiting 0 (pass), 77 (skip) or anything else (fail).
Under CI=true a skip of a required test is a failure (tests/run decides).
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QBAK = os.environ.get("QBAK", os.path.join(ROOT, "qbak"))
QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
SKIP = 77


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def require_qemu():
    if not QEMU or not QEMU_IMG:
        log("SKIP: qemu-system-x86_64 or qemu-img missing (scripts/install-deps.sh)")
        sys.exit(SKIP)


def fail(msg):
    log("FAIL: " + msg)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def run(cmd, check_rc=True, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, **kw)
    if check_rc and p.returncode != 0:
        fail("%s exited %d\nstdout: %s\nstderr: %s"
             % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
    return p


def connect_unix(path, deadline):
    """Connect to a unix socket, retrying until it exists (QEMU creates it
    a moment after starting)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.time() > deadline:
                raise
            time.sleep(0.05)


class QMP:
    """A minimal synchronous QMP client for the test side."""

    def __init__(self, path, timeout=30):
        self.sock = connect_unix(path, time.time() + timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events = []
        self.greeting = self._recv()
        self.cmd("qmp_capabilities")

    def _recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, command, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._recv()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError("%s: %s" % (command, r["error"]["desc"]))
            return r["return"]

    def hmp(self, line):
        out = self.cmd("human-monitor-command", **{"command-line": line})
        return out

    def close(self):
        self.sock.close()


class VM:
    """qemu-system-x86_64 -machine q35 -S: vCPUs paused, no guest OS.
    Disks are virtio-blk devices with ids vd0, vd1, ...; guest writes go
    through the device with HMP qemu-io (DESIGN.md section 4)."""

    def __init__(self, workdir, disks, extra=None, blkdebug=None, run=False):
        """blkdebug: {disk index: "inject-error.0.event=read_aio,..."} puts
        a blkdebug node between that disk's qcow2 and file nodes."""
        self.dir = workdir
        self.disks = disks  # list of (id, path, fmt)
        self.qbak_sock = os.path.join(workdir, "qbak.qmp")
        self.test_sock = os.path.join(workdir, "test.qmp")
        args = [QEMU, "-machine", "q35", "-accel", "tcg", "-nodefaults",
                "-display", "none"] + ([] if run else ["-S", "-m", "64"]) + [
                "-qmp", "unix:%s,server=on,wait=off" % self.qbak_sock,
                "-qmp", "unix:%s,server=on,wait=off" % self.test_sock]
        for i, (dev, path, fmt) in enumerate(disks):
            args += self.disk_args(i, dev, path, fmt, (blkdebug or {}).get(i))
        # A free root port, so tests can hot-plug a disk (q35's root bus
        # cannot).
        args += ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"]
        args += extra or []
        self.log = open(os.path.join(workdir, "qemu.log"), "w")
        self.log_pos = 0
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)
        self.qmp = QMP(self.test_sock)

    @staticmethod
    def disk_args(i, dev, path, fmt, blkdebug=None):
        args = ["-blockdev", "driver=file,filename=%s,node-name=file%d" % (path, i)]
        below = "file%d" % i
        if blkdebug:
            args += ["-blockdev", "driver=blkdebug,image=file%d,node-name=dbg%d,%s"
                     % (i, i, blkdebug)]
            below = "dbg%d" % i
        return args + ["-blockdev", "driver=%s,file=%s,node-name=drive%d" % (fmt, below, i),
                       "-device", "virtio-blk-pci,drive=drive%d,id=%s" % (i, dev)]

    def new_log(self):
        """What QEMU printed since the last call (HMP qemu-io prints its
        results there, not in the monitor reply)."""
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            f.seek(self.log_pos)
            text = f.read()
            self.log_pos = f.tell()
        return text

    def io(self, dev, cmd, may_fail=False):
        self.new_log()
        self.qmp.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "%s"' % (dev, cmd))
        out = self.new_log()
        if not may_fail and ("failed" in out or "error" in out.lower()):
            fail("guest I/O failed: qemu-io %s %s: %s" % (dev, cmd, out))
        return out

    def flush(self, dev):
        self.io(dev, "flush")

    def reference(self, dev, dest):
        """A raw copy of the disk as the guest sees it now."""
        path = [p for d, p, f in self.disks if d == dev][0]
        fmt = [f for d, p, f in self.disks if d == dev][0]
        self.flush(dev)
        run([QEMU_IMG, "convert", "-U", "-f", fmt, "-O", "raw", path, dest])
        return dest

    def bitmaps(self, node):
        for b in self.qmp.cmd("query-block"):
            ins = b.get("inserted", {})
            if ins.get("node-name") == node:
                return ins.get("dirty-bitmaps", [])
        return []

    def jobs(self):
        return self.qmp.cmd("query-jobs")

    def block_nodes(self):
        return [n["node-name"] for n in self.qmp.cmd("query-named-block-nodes")]

    def stop(self):
        try:
            self.qmp.cmd("quit")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


def make_disk(path, size, fmt="qcow2"):
    run([QEMU_IMG, "create", "-q", "-f", fmt, path, str(size)])
    return path


def qbak(*args, check_rc=True, env=None):
    p = run([QBAK] + [str(a) for a in args], check_rc=check_rc, env=env)
    return p


def qbak_json(*args, env=None):
    p = qbak(*(list(args) + ["--json"]), env=env)
    try:
        return json.loads(p.stdout)
    except ValueError:
        fail("qbak %s printed no JSON: %r" % (args[0], p.stdout))


def img_check(path):
    p = run([QEMU_IMG, "check", path], check_rc=False)
    check(p.returncode == 0, "qemu-img check %s: %s%s" % (path, p.stdout, p.stderr))


def img_compare(a, b, fmt_a=None, fmt_b="raw"):
    cmd = [QEMU_IMG, "compare", "-q"]
    if fmt_a:
        cmd += ["-f", fmt_a]
    if fmt_b:
        cmd += ["-F", fmt_b]
    p = run(cmd + [a, b], check_rc=False)
    check(p.returncode == 0, "qemu-img compare %s %s: differ (%d) %s%s"
          % (a, b, p.returncode, p.stdout, p.stderr))


def workdir(name):
    base = os.environ.get("QBAK_TEST_TMP", tempfile.gettempdir())
    return tempfile.mkdtemp(prefix="qbak-%s-" % name, dir=base)


def random_writes(vm, dev, size, rng, n, max_len=256 * 1024, zero_ratio=0.2,
                  discard_ratio=0.1):
    """n guest writes of random patterns, zero writes and discards, at any
    alignment (512-byte sectors, as a guest would)."""
    for _ in range(n):
        length = rng.randrange(1, max_len // 512 + 1) * 512
        off = rng.randrange(0, max(1, (size - length) // 512)) * 512
        r = rng.random()
        if r < zero_ratio:
            vm.io(dev, "write -z %d %d" % (off, length))
        elif r < zero_ratio + discard_ratio:
            vm.io(dev, "discard %d %d" % (off, length))
        else:
            vm.io(dev, "write -P 0x%02x %d %d" % (rng.randrange(1, 256), off, length))


def list_points(repo, vm_name):
    if not os.path.isdir(os.path.join(repo, vm_name)):
        return []
    return [p["point"] for p in qbak_json("list", "--repo", repo, "--vm", vm_name)["points"]]


def oracle(vm, repo, vm_name, expect_points=None, run_state=None):
    """RELIABILITY.md's oracle after a fault: only committed points listed,
    no .partial-* left, every file passes qemu-img check, no leftovers of
    ours in QEMU, bitmaps as the chain expects and not busy, the VM's run
    state unchanged, no BLOCK_IO_ERROR, and a next backup that succeeds
    and restores to the disk as it was when it started (which also proves
    the lock was released).  Returns that backup's result."""
    points = list_points(repo, vm_name)
    if expect_points is not None:
        check(points == expect_points, "listed %s, expected %s" % (points, expect_points))
    vmdir = os.path.join(repo, vm_name)
    refs = {d: vm.reference(d, os.path.join(vm.dir, "oracle-%s.raw" % d))
            for d, _, _ in vm.disks}
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", vm_name)
    check(not [e for e in os.listdir(vmdir) if e.startswith(".partial-")],
          "no .partial-* after recovery")
    for p in os.listdir(vmdir):
        if not p.startswith("."):
            for f in os.listdir(os.path.join(vmdir, p)):
                if f.endswith(".qcow2"):
                    img_check(os.path.join(vmdir, p, f))
    for d in res["disks"]:
        img_compare(os.path.join(vmdir, res["point"], d["file"]), refs[d["disk"]], fmt_a="qcow2")
        out = os.path.join(vm.dir, "oracle-restore.raw")
        qbak("restore", "--repo", repo, "--vm", vm_name, "--disk", d["disk"],
             "--output", out, "--force")
        img_compare(out, refs[d["disk"]], fmt_a="raw")
        os.unlink(out)
    check(vm.jobs() == [], "jobs left in QEMU: %s" % vm.jobs())
    check(not [n for n in vm.block_nodes() if n.startswith("qbak")],
          "qbak nodes left in QEMU: %s" % vm.block_nodes())
    # Only this repository's bitmaps: another one backing up the same VM
    # has its own.
    ours = "qbak-%s-" % open(os.path.join(vmdir, ".id")).read().strip()
    for d in res["disks"]:
        node = [b["inserted"]["node-name"] for b in vm.qmp.cmd("query-block")
                if b.get("qdev", "").startswith("/machine/peripheral/%s/" % d["disk"])][0]
        bms = [b for b in vm.bitmaps(node) if b["name"].startswith(ours)]
        check([b["name"] for b in bms] == [d["bitmap"]] and not bms[0]["busy"]
              and bms[0]["recording"], "%s: bitmaps %s" % (d["disk"], bms))
    st = vm.qmp.cmd("query-status")
    if run_state:
        check(st["status"] == run_state, "run state %s, expected %s" % (st["status"], run_state))
    errors = [e for e in vm.qmp.events if e["event"] == "BLOCK_IO_ERROR"]
    check(not errors, "the guest saw I/O errors: %s" % errors)
    return res


class QGA:
    """A test-side guest agent client: resynchronises like qbak does."""

    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        self.sock = connect_unix(path, deadline)
        self.buf = b""
        self.sync(deadline)

    def sync(self, deadline):
        while time.time() < deadline:
            sid = random.randrange(1, 1 << 30)
            self.sock.sendall(b"\xff" + json.dumps(
                {"execute": "guest-sync-delimited", "arguments": {"id": sid}}).encode() + b"\n")
            end = time.time() + 1.5
            while time.time() < end:
                self.sock.settimeout(max(0.05, end - time.time()))
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    raise EOFError("QGA closed")
                self.buf += chunk
                if b"\xff" in self.buf:
                    self.buf = self.buf[self.buf.rindex(b"\xff") + 1:]
                while b"\n" in self.buf:
                    line, self.buf = self.buf.split(b"\n", 1)
                    try:
                        if json.loads(line).get("return") == sid:
                            return
                    except ValueError:
                        pass
        raise TimeoutError("guest agent did not sync")

    def cmd(self, command, timeout=30, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QGA closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError("%s: %s" % (command, r["error"].get("desc")))
        return r.get("return")

    def close(self):
        self.sock.close()


def guest_image():
    """Kernel and initrd of the test guest (scripts/build-test-guest.sh),
    built once and cached; None when it cannot be built here."""
    p = subprocess.run([os.path.join(ROOT, "scripts", "build-test-guest.sh")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        log(p.stderr[-2000:])
        return None
    env = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    return env["QBAK_GUEST_KERNEL"], env["QBAK_GUEST_INITRD"], env["QBAK_GUEST_APPEND"]


def need_guest_image():
    """guest_image() for a test that cannot run without it: skips (a
    failure under CI=true) when the guest cannot be built here."""
    require_qemu()
    image = guest_image()
    if not image:
        log("SKIP: the test guest could not be built (scripts/build-test-guest.sh)")
        sys.exit(SKIP)
    return image


def make_guest_disk(path, mib=64):
    run([os.path.join(ROOT, "scripts", "build-test-guest.sh"), "mkdisk", path, str(mib)])
    return path


class Guest(VM):
    """The Linux test guest: qemu-ga, an ext4 data disk vd0 mounted at /data
    and a writer process making files it can verify (see
    scripts/build-test-guest.sh).  qbak gets its own QMP monitor; the test
    has the other one and the QGA socket while qbak is not using it."""

    def __init__(self, workdir, data_disk, image, append_extra="", more_disks=()):
        """more_disks: (id, path, fmt) of further virtio-blk disks, after
        vd0 (the guest names them /dev/vdb, /dev/vdc, ... in that order)."""
        kernel, initrd, append = image
        self.qga_sock = os.path.join(workdir, "qga.sock")
        extra = ["-m", "256", "-kernel", kernel, "-initrd", initrd,
                 "-append", (append + " " + append_extra).strip(), "-no-reboot",
                 "-serial", "file:" + os.path.join(workdir, "console.log"),
                 "-device", "virtio-serial-pci",
                 "-chardev", "socket,path=%s,server=on,wait=off,id=qga0" % self.qga_sock,
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        VM.__init__(self, workdir, [("vd0", data_disk, "qcow2")] + list(more_disks),
                    extra=extra, run=True)

    def agent(self, timeout=60):
        return QGA(self.qga_sock, timeout)

    def agent_do(self, fn):
        """fn(agent) on a fresh guest-agent connection, closed after."""
        a = self.agent()
        try:
            return fn(a)
        finally:
            a.close()


# ------------------------------------------------- file-level access (ls, find, get, mount)

GUESTFISH = shutil.which("guestfish")
FILES_MTIME = 1600000000  # every fixture path's mtime, unless a state changes it

# The fixture disk's first partition (ext4) in state A: path -> (type, mode,
# content or symlink target).  Names with control characters and a 255-byte
# name are planted for get's name checks.
FILES_LONG = "L" * 255
FILES_EXT4_A = {
    "/docs": ("dir", 0o755, None),
    "/docs/a.txt": ("file", 0o644, b"alpha v1\n"),
    "/docs/gone.txt": ("file", 0o600, b"deleted after the first point\n"),
    "/docs/sub": ("dir", 0o750, None),
    "/docs/sub/b.txt": ("file", 0o640, b"bee\n"),
    "/docs/sub/link": ("symlink", 0o777, "../a.txt"),
    "/docs/big.bin": ("file", 0o644, bytes(range(256)) * 1200),
    "/escape": ("symlink", 0o777, "/etc"),
    "/modes": ("dir", 0o755, None),
    "/modes/ro.txt": ("file", 0o444, b"read only\n"),
    "/modes/run.sh": ("file", 0o755, b"#!/bin/sh\necho hi\n"),
    "/modes/suid": ("file", 0o4755, b"not really a binary\n"),
    "/evil": ("dir", 0o755, None),
    "/evil/ok.txt": ("file", 0o644, b"fine\n"),
    "/evil/new\nline": ("file", 0o644, b"newline in my name\n"),
    "/evil/esc\x1b[31mred": ("file", 0o644, b"escape sequence in my name\n"),
    "/evil/up": ("symlink", 0o777, "../../../../../../../../tmp/qbak-files-escaped"),
    "/evil/" + FILES_LONG: ("file", 0o644, b"long name\n"),
}
FILES_XFS = {
    "/x": ("dir", 0o755, None),
    "/x/y.txt": ("file", 0o644, b"xfs file\n"),
    "/x/deep": ("dir", 0o755, None),
    "/x/deep/z.txt": ("file", 0o600, b"deep in xfs\n"),
}
FILES_LVM = {
    "/lvfile": ("file", 0o644, b"on lvm\n"),
}


def _gf_quote(s):
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _gf_populate(lines, tree, tmp):
    for i, (path, (kind, mode, data)) in enumerate(sorted(tree.items())):
        q = _gf_quote(path)
        if kind == "dir":
            lines.append("mkdir-p %s" % q)
            lines.append("chmod 0%o %s" % (mode, q))
        elif kind == "file":
            src = os.path.join(tmp, "f%d-%d" % (len(lines), i))
            with open(src, "wb") as f:
                f.write(data)
            lines.append("upload %s %s" % (_gf_quote(src), q))
            lines.append("chmod 0%o %s" % (mode, q))
        else:
            lines.append("ln-s %s %s" % (_gf_quote(data), q))
    for path, (kind, _, _) in sorted(tree.items(), reverse=True):
        if kind != "symlink":
            lines.append("utimens %s %d 0 %d 0" % (_gf_quote(path), FILES_MTIME, FILES_MTIME))


def files_fixture():
    """A 1 GiB GPT disk as a sparse raw file, made once with guestfish and
    cached under build/files-fixture (keyed by this recipe): partition 1
    ext4 (label data, FILES_EXT4_A), 2 xfs (label xdata, FILES_XFS), 3 an
    LVM PV holding vg0/lv0, ext4 (FILES_LVM).  LVM is made inside the
    appliance, which has its own device-mapper.  Returns (raw path,
    partitions from sfdisk -J)."""
    if not GUESTFISH:
        log("SKIP: guestfish missing (scripts/install-deps.sh installs libguestfs-tools)")
        sys.exit(SKIP)
    import hashlib
    recipe = repr((FILES_EXT4_A, FILES_XFS, FILES_LVM, FILES_MTIME, 3)).encode()
    key = hashlib.sha256(recipe).hexdigest()[:16]
    cache = os.path.join(ROOT, "build", "files-fixture")
    raw = os.path.join(cache, "gpt-%s.raw" % key)
    if not os.path.exists(raw):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        try:
            img = os.path.join(tmp, "disk.raw")
            with open(img, "wb") as f:
                f.truncate(1 << 30)
            lines = ["add-drive %s format:raw" % _gf_quote(img), "run",
                     "part-init /dev/sda gpt",
                     "part-add /dev/sda p 2048 206847",
                     "part-add /dev/sda p 206848 870399",
                     "part-add /dev/sda p 870400 2095103",
                     "mkfs ext4 /dev/sda1 label:data",
                     "mkfs xfs /dev/sda2 label:xdata",
                     "pvcreate /dev/sda3", "vgcreate vg0 /dev/sda3",
                     "lvcreate-free lv0 vg0 100", "mkfs ext4 /dev/vg0/lv0",
                     "mount /dev/sda1 /"]
            _gf_populate(lines, FILES_EXT4_A, tmp)
            lines += ["umount /", "mount /dev/sda2 /"]
            _gf_populate(lines, FILES_XFS, tmp)
            lines += ["umount /", "mount /dev/vg0/lv0 /"]
            _gf_populate(lines, FILES_LVM, tmp)
            lines += ["umount /", "sync"]
            script = os.path.join(tmp, "make.gf")
            with open(script, "w") as f:
                f.write("\n".join(lines) + "\n")
            run([GUESTFISH, "-f", script])
            os.rename(img, raw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    parts = json.loads(run(["sfdisk", "-J", raw]).stdout)["partitiontable"]["partitions"]
    return raw, parts


def debugfs(raw, offset, commands):
    """Runs debugfs -w commands on the ext4 at offset in raw (no mount)."""
    script = raw + ".debugfs"
    with open(script, "w") as f:
        f.write("\n".join(commands) + "\n")
    p = run(["debugfs", "-w", "-f", script, "%s?offset=%d" % (raw, offset)])
    os.unlink(script)
    return p


def write_diff(vm, dev, old_raw, new_raw, start, length, chunk=64 * 1024):
    """Writes the chunks in which new_raw differs from old_raw (within
    start..start+length) into the VM's disk through the device (HMP
    qemu-io write -s), so the guest's disk becomes new_raw there and the
    dirty bitmaps see every change.  Returns how many chunks."""
    n = 0
    buf = os.path.join(vm.dir, "chunk.bin")
    with open(old_raw, "rb") as a, open(new_raw, "rb") as b:
        off = start
        while off < start + length:
            a.seek(off)
            b.seek(off)
            x, y = a.read(chunk), b.read(chunk)
            if x != y:
                with open(buf, "wb") as f:
                    f.write(y)
                vm.io(dev, "write -s %s %d %d" % (buf, off, len(y)))
                n += 1
            off += chunk
    vm.flush(dev)
    return n


def tree_hashes(top):
    """sha256 of every file under top (path -> digest): repository files
    must stay byte-identical."""
    import hashlib
    out = {}
    for d, _, files in os.walk(top):
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for blk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(blk)
            out[os.path.relpath(p, top)] = h.hexdigest()
    return out


FILES_STATES = [
    # (debugfs commands on the ext4 partition, truth changes) from the
    # previous state: B changes a.txt, deletes gone.txt, adds new.txt; C
    # adds third.txt and leaves the rest as it was.
    ([("rm", "/docs/a.txt"), ("write", "/docs/a.txt", b"alpha v2, longer now\n", 1600000100),
      ("rm", "/docs/gone.txt"), ("write", "/docs/new.txt", b"added for point 2\n", 1600000200)]),
    ([("write", "/docs/third.txt", b"added for point 3\n", 1600000300)]),
]


def files_points(w, vm_name="vm1"):
    """Three qbak points of a running QEMU (paused vCPUs) whose disk is the
    fixture (files_fixture()): state A, then B and C written through the
    device (write_diff()), a backup after each.  Returns (repo, points,
    truths, parts) where truths[i] is the ext4 partition's tree at
    points[i] (path -> (type, mode, content or target, mtime))."""
    fixture, parts = files_fixture()
    ext4_off = parts[0]["start"] * 512
    ext4_len = parts[0]["size"] * 512
    raws = [os.path.join(w, "state0.raw")]
    run(["cp", "--sparse=always", fixture, raws[0]])
    truth = {p: (k, m, d, FILES_MTIME) for p, (k, m, d) in FILES_EXT4_A.items()}
    truths = [dict(truth)]
    for i, changes in enumerate(FILES_STATES):
        raw = os.path.join(w, "state%d.raw" % (i + 1))
        run(["cp", "--sparse=always", raws[-1], raw])
        cmds = []
        for c in changes:
            if c[0] == "rm":
                cmds.append('rm "%s"' % c[1])
                truth.pop(c[1])
            else:
                _, path, data, mtime = c
                src = os.path.join(w, "src%d" % len(cmds))
                with open(src, "wb") as f:
                    f.write(data)
                d, name = os.path.split(path)
                cmds += ['cd "%s"' % d, 'write "%s" "%s"' % (src, name),
                         'sif "%s" mode 0100644' % name, 'sif "%s" mtime %d' % (name, mtime),
                         "cd /"]
                truth[path] = ("file", 0o644, data, mtime)
        debugfs(raw, ext4_off, cmds)
        raws.append(raw)
        truths.append(dict(truth))
    disk = os.path.join(w, "disk.qcow2")
    run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raws[0], disk])
    repo = os.path.join(w, "repo")
    vm = VM(w, [("vd0", disk, "qcow2")])
    points = []
    try:
        for i in range(len(raws)):
            if i:
                n = write_diff(vm, "vd0", raws[i - 1], raws[i], ext4_off, ext4_len)
                check(n > 0, "state %d: no change written" % i)
            res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", vm_name)
            points.append(res["point"])
    finally:
        vm.stop()
    for r in raws:
        os.unlink(r)
    return repo, points, truths, parts


def check_repo_unchanged(before, after, new_ok=(".catalog",)):
    """Every file of before is byte-identical in after; new files are only
    lock files (.browse, .lock) and names ending in new_ok."""
    for f, h in before.items():
        check(after.get(f) == h, "repository file changed: %s" % f)
    new = [f for f in after if f not in before
           and os.path.basename(f) not in (".browse", ".lock")
           and not f.endswith(tuple(new_ok))]
    check(not new, "repository files added: %s" % new)


FILES_OS_ROOT = {
    "/etc": ("dir", 0o755, None),
    "/etc/fstab": ("file", 0o644, b"LABEL=osroot / ext4 defaults 0 1\n"
                   b"LABEL=osdata /srv ext4 defaults 0 2\n"),
    "/etc/os-release": ("file", 0o644, b'ID=debian\nVERSION_ID="12"\n'
                        b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'),
    "/etc/debian_version": ("file", 0o644, b"12.0\n"),
    "/bin": ("dir", 0o755, None),
    "/bin/sh": ("file", 0o755, b"#!not really\n"),
    "/srv": ("dir", 0o755, None),
}
FILES_OS_SRV = {
    "/hello.txt": ("file", 0o644, b"from the second partition, mounted at /srv\n"),
}


def files_os_fixture():
    """A small disk that looks like an installed Linux to libguestfs's
    inspection: partition 1 the root (its /etc/fstab mounts LABEL=osdata on
    /srv), partition 2 that file system.  Cached like files_fixture()."""
    if not GUESTFISH:
        log("SKIP: guestfish missing (scripts/install-deps.sh installs libguestfs-tools)")
        sys.exit(SKIP)
    import hashlib
    key = hashlib.sha256(repr((FILES_OS_ROOT, FILES_OS_SRV, 1)).encode()).hexdigest()[:16]
    cache = os.path.join(ROOT, "build", "files-fixture")
    raw = os.path.join(cache, "os-%s.raw" % key)
    if not os.path.exists(raw):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        try:
            img = os.path.join(tmp, "disk.raw")
            with open(img, "wb") as f:
                f.truncate(128 << 20)
            lines = ["add-drive %s format:raw" % _gf_quote(img), "run",
                     "part-init /dev/sda gpt",
                     "part-add /dev/sda p 2048 131071",
                     "part-add /dev/sda p 131072 260095",
                     "mkfs ext4 /dev/sda1 label:osroot",
                     "mkfs ext4 /dev/sda2 label:osdata",
                     "mount /dev/sda1 /"]
            _gf_populate(lines, FILES_OS_ROOT, tmp)
            lines += ["umount /", "mount /dev/sda2 /"]
            _gf_populate(lines, FILES_OS_SRV, tmp)
            lines += ["umount /", "sync"]
            script = os.path.join(tmp, "make.gf")
            with open(script, "w") as f:
                f.write("\n".join(lines) + "\n")
            run([GUESTFISH, "-f", script])
            os.rename(img, raw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return raw


FILES_BTRFS = {
    "/top.txt": ("file", 0o644, b"on btrfs\n"),
    "/dir": ("dir", 0o755, None),
    "/dir/inner.txt": ("file", 0o600, b"inner btrfs file\n"),
}
FILES_VFAT = {
    "/DOS.TXT": ("file", 0o755, b"on vfat\n"),
}
FILES_NTFS = {
    "/win.txt": ("file", 0o777, b"on ntfs\n"),
}


def files_mbr_fixture():
    """An MBR disk: partition 1 btrfs (with a subvolume sub), 2 vfat, 3
    ntfs, populated in libguestfs's appliance.  Cached like
    files_fixture()."""
    if not GUESTFISH:
        log("SKIP: guestfish missing (scripts/install-deps.sh installs libguestfs-tools)")
        sys.exit(SKIP)
    import hashlib
    key = hashlib.sha256(repr((FILES_BTRFS, FILES_VFAT, FILES_NTFS, 1)).encode()).hexdigest()[:16]
    cache = os.path.join(ROOT, "build", "files-fixture")
    raw = os.path.join(cache, "mbr-%s.raw" % key)
    if not os.path.exists(raw):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        try:
            img = os.path.join(tmp, "disk.raw")
            with open(img, "wb") as f:
                f.truncate(768 << 20)
            lines = ["add-drive %s format:raw" % _gf_quote(img), "run",
                     "part-init /dev/sda mbr",
                     "part-add /dev/sda p 2048 1050623",
                     "part-add /dev/sda p 1050624 1312767",
                     "part-add /dev/sda p 1312768 1572863",
                     "mkfs btrfs /dev/sda1", "mkfs vfat /dev/sda2", "mkfs ntfs /dev/sda3",
                     "mount /dev/sda1 /", "btrfs-subvolume-create /sub",
                     "write /sub/in-subvolume.txt \"in a subvolume\\n\""]
            _gf_populate(lines, FILES_BTRFS, tmp)
            lines += ["umount /", "mount /dev/sda2 /"]
            lines += ["upload %s /DOS.TXT" % _gf_quote(os.path.join(tmp, "vfat"))]
            lines += ["umount /", "mount /dev/sda3 /"]
            lines += ["upload %s /win.txt" % _gf_quote(os.path.join(tmp, "ntfs"))]
            lines += ["umount /", "sync"]
            with open(os.path.join(tmp, "vfat"), "wb") as f:
                f.write(FILES_VFAT["/DOS.TXT"][2])
            with open(os.path.join(tmp, "ntfs"), "wb") as f:
                f.write(FILES_NTFS["/win.txt"][2])
            script = os.path.join(tmp, "make.gf")
            with open(script, "w") as f:
                f.write("\n".join(lines) + "\n")
            run([GUESTFISH, "-f", script])
            os.rename(img, raw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return raw


# Backup mode under test: QBAK_MODE=push|pull|auto adds --mode to every
# `qbak backup` these helpers run (unset: qbak's default, auto).  A test
# that runs qbak itself adds mode_args().  The tests with a -pull.py twin
# (test-crash.py and test-crash-pull.py) set push themselves, the twin pull.
BACKUP_MODE = os.environ.get("QBAK_MODE") or None
_qbak_any_mode = qbak


def mode_args():
    return ["--mode", BACKUP_MODE] if BACKUP_MODE else []


def backup_mode():
    """The mode asked for (push, pull or auto), else qbak's default."""
    return BACKUP_MODE or "auto"


def qbak(*args, check_rc=True, env=None):  # noqa: F811
    if args and args[0] == "backup" and BACKUP_MODE and "--mode" not in args:
        args = tuple(args) + ("--mode", BACKUP_MODE)
    return _qbak_any_mode(*args, check_rc=check_rc, env=env)


def run_in_mode(test_name, mode):
    """Body of a wrapper test: runs tests/integration/<test_name> with
    QBAK_MODE=mode."""
    os.environ["QBAK_MODE"] = mode
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "integration", test_name)
    os.execv(sys.executable, [sys.executable, path])

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


def make_guest_disk(path, mib=64):
    run([os.path.join(ROOT, "scripts", "build-test-guest.sh"), "mkdisk", path, str(mib)])
    return path


class Guest(VM):
    """The Linux test guest: qemu-ga, an ext4 data disk vd0 mounted at /data
    and a writer process making files it can verify (see
    scripts/build-test-guest.sh).  qbak gets its own QMP monitor; the test
    has the other one and the QGA socket while qbak is not using it."""

    def __init__(self, workdir, data_disk, image, append_extra=""):
        kernel, initrd, append = image
        self.qga_sock = os.path.join(workdir, "qga.sock")
        extra = ["-m", "256", "-kernel", kernel, "-initrd", initrd,
                 "-append", (append + " " + append_extra).strip(), "-no-reboot",
                 "-serial", "file:" + os.path.join(workdir, "console.log"),
                 "-device", "virtio-serial-pci",
                 "-chardev", "socket,path=%s,server=on,wait=off,id=qga0" % self.qga_sock,
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        VM.__init__(self, workdir, [("vd0", data_disk, "qcow2")], extra=extra, run=True)

    def agent(self, timeout=60):
        return QGA(self.qga_sock, timeout)


# Backup mode under test: QBAK_MODE=push|pull adds --mode to every `qbak
# backup` these helpers run (unset: qbak's default).  A test that runs qbak
# itself adds mode_args().  Wrappers such as test-crash-push.py run a test
# again in the other mode.
BACKUP_MODE = os.environ.get("QBAK_MODE") or None
_qbak_any_mode = qbak


def mode_args():
    return ["--mode", BACKUP_MODE] if BACKUP_MODE else []


def backup_mode():
    """The mode backups run in: the one asked for, else qbak's default."""
    return BACKUP_MODE or "pull"


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

#!/usr/bin/env python3
"""Smoke test of the qbak test guest (scripts/build-test-guest.sh).

Boots the guest under TCG in a temporary directory, talks to the real
qemu-ga through the virtio-serial socket, and checks:
  - the agent answers guest-sync-delimited, guest-ping, guest-fsfreeze-status;
  - the writer makes progress (counted with guest-exec);
  - guest-fsfreeze-freeze freezes at least one file system (/data), the
    status says "frozen", and a copy of the disk taken while frozen is a
    clean ext4 (no journal replay) whose files all verify, and does not
    change while frozen;
  - guest-fsfreeze-thaw thaws and the writer goes on;
  - after QMP "quit" (a crash from the guest's point of view) the data disk
    verifies with scripts/verify-guest-data.sh (journal replayed).
Prints how long the guest took until the agent answered.

Usage: scripts/guest-smoke-test.py [--keep]   (--keep: keep the temp dir)
Environment: QBAK_GUEST_DIR (cache, see build-test-guest.sh),
QBAK_SMOKE_TIMEOUT (seconds for the test after the build, default 55).
Exit status 0 on success, 1 on failure (with a message on stderr).
Python 3 standard library only.
"""

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build-test-guest.sh")
VERIFY = os.path.join(HERE, "verify-guest-data.sh")
QGA_NAME = "org.qemu.guest_agent.0"


class Fail(Exception):
    pass


def log(msg):
    print("guest-smoke-test: " + msg, flush=True)


def qemu_command(kernel, initrd, append, d):
    """The command line qbak's tests use to boot the test guest in dir d."""
    return [
        "qemu-system-x86_64",
        "-machine", "q35", "-accel", "tcg", "-m", "256",
        "-nodefaults", "-display", "none",
        "-serial", "file:" + os.path.join(d, "console.log"),
        "-kernel", kernel, "-initrd", initrd, "-append", append,
        "-no-reboot",
        "-qmp", "unix:%s,server=on,wait=off" % os.path.join(d, "qmp.sock"),
        "-blockdev", "driver=file,filename=%s,node-name=file0"
        % os.path.join(d, "data.qcow2"),
        "-blockdev", "driver=qcow2,file=file0,node-name=drive0",
        "-device", "virtio-blk-pci,drive=drive0,id=vd0",
        "-device", "virtio-serial-pci",
        "-chardev", "socket,path=%s,server=on,wait=off,id=qga0"
        % os.path.join(d, "qga.sock"),
        "-device", "virtserialport,chardev=qga0,name=" + QGA_NAME,
    ]


def connect_unix(path, deadline):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.setblocking(False)
            return s
        except OSError as e:
            s.close()
            if time.monotonic() >= deadline:
                raise Fail("cannot connect to %s: %s" % (path, e))
            time.sleep(0.05)


class Channel:
    """Newline-delimited JSON over a non-blocking unix socket."""

    def __init__(self, sock, what):
        self.sock = sock
        self.what = what
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def fill(self, deadline):
        """Read what is there, waiting until deadline; False on timeout."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        data = self.sock.recv(65536)
        if not data:
            raise Fail("%s closed the connection" % self.what)
        self.buf += data
        return True

    def next_json(self, deadline):
        """Next JSON object (0xFF bytes and blank lines skipped)."""
        while True:
            self.buf = self.buf.lstrip(b"\xff\r\n ")
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                line = line.replace(b"\xff", b"").strip()
                if not line:
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    raise Fail("%s sent bad JSON: %r" % (self.what, line[:200]))
            if not self.fill(deadline):
                raise Fail("timeout waiting for %s" % self.what)


class QGA(Channel):
    def __init__(self, path, deadline):
        super().__init__(connect_unix(path, deadline), "qemu-ga")
        self.sync_id = int(time.time() * 1000) % 1000000000

    def sync(self, deadline, resend=1.0):
        """guest-sync-delimited until the agent answers the latest id.

        Bytes sent before the guest opened its port can be lost or queued;
        every resend uses a new id and only the newest id counts, so stale
        replies to earlier syncs are skipped."""
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise Fail("qemu-ga did not answer guest-sync-delimited in time")
            if now >= next_send:
                self.sync_id += 1
                req = {"execute": "guest-sync-delimited",
                       "arguments": {"id": self.sync_id}}
                self.send(b"\xff" + json.dumps(req).encode() + b"\n")
                next_send = now + resend
            if not self.fill(min(next_send, deadline)):
                continue
            # Everything up to the last 0xFF sentinel is stale.
            while True:
                ff = self.buf.rfind(b"\xff")
                if ff >= 0:
                    self.buf = self.buf[ff + 1:]
                nl = self.buf.find(b"\n")
                if nl < 0:
                    break
                line, self.buf = self.buf[:nl].strip(), self.buf[nl + 1:]
                try:
                    msg = json.loads(line) if line else None
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("return") == self.sync_id:
                    self.buf = b""
                    return

    def cmd(self, name, args=None, timeout=10.0):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.send(json.dumps(req).encode() + b"\n")
        msg = self.next_json(time.monotonic() + timeout)
        if "error" in msg:
            raise Fail("%s failed: %s" % (name, msg["error"]))
        if "return" not in msg:
            raise Fail("%s: unexpected reply %r" % (name, msg))
        return msg["return"]

    def sh(self, script, timeout=10.0):
        """Run a shell command in the guest (guest-exec); returns stdout."""
        deadline = time.monotonic() + timeout
        pid = self.cmd("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                      "capture-output": True})["pid"]
        while True:
            st = self.cmd("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                break
            if time.monotonic() >= deadline:
                raise Fail("guest command %r did not finish" % script)
            time.sleep(0.1)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        if st.get("exitcode") != 0:
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
            raise Fail("guest command %r exited %r: %s" % (script, st.get("exitcode"), err))
        return out


class QMP(Channel):
    def __init__(self, path, deadline):
        super().__init__(connect_unix(path, deadline), "QMP")
        greeting = self.next_json(deadline)
        if "QMP" not in greeting:
            raise Fail("bad QMP greeting %r" % greeting)
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None, timeout=10.0):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.send(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next_json(deadline)
            if "event" in msg:
                continue
            if "error" in msg:
                raise Fail("QMP %s failed: %s" % (name, msg["error"]))
            return msg.get("return")


def run(cmd, timeout, what):
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Fail("%s timed out after %ss" % (what, timeout))
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        raise Fail("%s failed (exit %d):\n%s" % (what, p.returncode, out))
    return out


def done_count(qga):
    out = qga.sh("wc -l < /data/w/DONE-log 2>/dev/null || echo 0").strip()
    try:
        return int(out)
    except ValueError:
        raise Fail("bad DONE-log count %r" % out)


def wait_progress(qga, base, more, timeout):
    deadline = time.monotonic() + timeout
    while True:
        n = done_count(qga)
        if n >= base + more:
            return n
        if time.monotonic() >= deadline:
            raise Fail("writer made no progress: DONE-log %d -> %d in %ss"
                       % (base, n, timeout))
        time.sleep(0.3)


def smoke(d, env):
    kernel, initrd, append = (env["QBAK_GUEST_KERNEL"], env["QBAK_GUEST_INITRD"],
                              env["QBAK_GUEST_APPEND"])
    disk = os.path.join(d, "data.qcow2")
    run([BUILD, "mkdisk", disk, "64"], 30, "mkdisk")

    cmd = qemu_command(kernel, initrd, append, d)
    log("boot: " + " ".join(cmd))
    t0 = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=open(os.path.join(d, "qemu.log"), "wb"),
                            stderr=subprocess.STDOUT)
    try:
        qga = QGA(os.path.join(d, "qga.sock"), t0 + 10)
        qga.sync(t0 + 40)
        boot = time.monotonic() - t0
        log("agent answered %.1f s after QEMU started" % boot)

        if qga.cmd("guest-ping") != {}:
            raise Fail("guest-ping: unexpected reply")
        info = qga.cmd("guest-info")
        log("qemu-ga version %s" % info.get("version"))
        st = qga.cmd("guest-fsfreeze-status")
        if st != "thawed":
            raise Fail("fsfreeze-status before freeze is %r, expected thawed" % st)

        c0 = done_count(qga)
        c1 = wait_progress(qga, c0, 2, 10)
        log("writer progress: DONE-log %d -> %d" % (c0, c1))

        t = time.monotonic()
        n = qga.cmd("guest-fsfreeze-freeze", timeout=20)
        log("guest-fsfreeze-freeze froze %r file system(s) in %.2f s"
            % (n, time.monotonic() - t))
        if not isinstance(n, int) or n < 1:
            raise Fail("guest-fsfreeze-freeze returned %r, expected >= 1" % n)
        try:
            st = qga.cmd("guest-fsfreeze-status")
            if st != "frozen":
                raise Fail("fsfreeze-status after freeze is %r, expected frozen" % st)
            # The disk as it is while frozen: clean ext4, all files intact,
            # and unchanged while frozen although the writer keeps trying.
            a = os.path.join(d, "frozen-a.raw")
            b = os.path.join(d, "frozen-b.raw")
            run(["qemu-img", "convert", "-U", "-O", "raw", disk, a], 20, "copy while frozen")
            time.sleep(1.0)
            run(["qemu-img", "convert", "-U", "-O", "raw", disk, b], 20, "copy while frozen")
            if subprocess.run(["cmp", "-s", a, b]).returncode != 0:
                raise Fail("the data disk changed while the guest was frozen")
            out = run([VERIFY, "--clean", "--min-files", str(c1), a], 30,
                      "verify the frozen copy")
            log("frozen copy: " + out.strip().splitlines()[-1])
            os.unlink(a)
            os.unlink(b)
        finally:
            t = time.monotonic()
            n = qga.cmd("guest-fsfreeze-thaw", timeout=20)
            log("guest-fsfreeze-thaw thawed %r file system(s) in %.2f s"
                % (n, time.monotonic() - t))
        if not isinstance(n, int) or n < 1:
            raise Fail("guest-fsfreeze-thaw returned %r, expected >= 1" % n)
        st = qga.cmd("guest-fsfreeze-status")
        if st != "thawed":
            raise Fail("fsfreeze-status after thaw is %r, expected thawed" % st)

        c2 = done_count(qga)
        c3 = wait_progress(qga, c2, 2, 10)
        log("writer progress after thaw: DONE-log %d -> %d" % (c2, c3))

        qmp = QMP(os.path.join(d, "qmp.sock"), time.monotonic() + 5)
        qmp.cmd("quit")
        try:
            qemu.wait(10)
        except subprocess.TimeoutExpired:
            raise Fail("QEMU did not exit after quit")
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    if qemu.returncode != 0:
        raise Fail("QEMU exited with %d: %s" % (qemu.returncode,
                   open(os.path.join(d, "qemu.log"), errors="replace").read()))

    out = run([VERIFY, "--min-files", str(c3), disk], 30, "verify the data disk")
    log("data disk after quit: " + out.strip().splitlines()[-1])
    return boot


def main():
    keep = "--keep" in sys.argv[1:]
    timeout = int(os.environ.get("QBAK_SMOKE_TIMEOUT", "55"))
    # The build (cached; a first build downloads ~70 MB) is not timed.
    try:
        out = run([BUILD], 900, "build-test-guest.sh")
    except Fail as e:
        print("guest-smoke-test: FAIL: %s" % e, file=sys.stderr)
        return 1
    env = dict(l.split("=", 1) for l in out.splitlines()
               if l.startswith("QBAK_GUEST_") and "=" in l)

    d = tempfile.mkdtemp(prefix="qbak-smoke.")

    def on_alarm(signum, frame):
        raise Fail("the whole test took more than %d s" % timeout)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    t0 = time.monotonic()
    ok = False
    try:
        boot = smoke(d, env)
        ok = True
        log("PASS (boot %.1f s, test %.1f s)" % (boot, time.monotonic() - t0))
    except Fail as e:
        print("guest-smoke-test: FAIL: %s" % e, file=sys.stderr)
        con = os.path.join(d, "console.log")
        if os.path.exists(con):
            lines = open(con, errors="replace").read().splitlines()
            print("--- last lines of the guest console ---", file=sys.stderr)
            print("\n".join(lines[-30:]), file=sys.stderr)
    finally:
        signal.alarm(0)
        if keep or not ok:
            for f in ("frozen-a.raw", "frozen-b.raw"):
                if os.path.exists(os.path.join(d, f)):
                    os.unlink(os.path.join(d, f))
            log("files kept in %s" % d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A scripted fake QMP server for fault tests (python3 stdlib only).

Real QEMU will not send garbage, cut a reply in the middle or answer with
an id nobody asked for; this fake does, on demand, on a unix socket qbak
connects to with --qmp.  It plays a list of steps:

    Send(data)            bytes, or a message (dict, sent as QEMU frames it:
                          json.dumps + "\\r\\n"); pace= sends it byte by byte
    Expect(name, ...)     read qbak's next command; check its "execute" is
                          name, then answer: ret= ("return" with the id
                          echoed), error=(class, desc), raw= exact bytes (or
                          a function of the command), reply= a function
                          of (fake, cmd) doing its own sending, noreply=True;
                          before= bytes or messages sent first (events),
                          delay= seconds to wait first.  Without any of
                          these the Qemu model below answers.
    Close(abrupt=False)   end the session: shut down our side and read
                          until qbak hangs up (qbak sees a clean EOF), or
                          with abrupt=True close at once (qbak may see a
                          reset if it had sent something we did not read)
    Serve()               answer every further command with the Qemu model
                          until qbak hangs up
    Sleep(seconds)        do nothing for a while (qbak's next command stays
                          unread)

When the script runs out without Close or Serve, the fake answers nothing
more and waits for qbak to hang up: a command left unanswered is the test's
intent ("a reply that never comes").

FakeQMP(path, steps, cut_at=k) cuts the session after the first k bytes
the fake sends (then Close): "EOF at any byte".

Qemu is a small model of QEMU 7.2 for what qbak sends: one qcow2 disk
drive0 on a virtio-blk device vd0, NBD nodes added with blockdev-add (it
connects to qbak's NBD export, as QEMU does, and writes the disk's data into
it when the backup transaction starts), dirty bitmaps, and backup jobs
that go to "pending" at once and conclude on job-finalize or job-cancel.

Everything the fake received is in .commands; .sent counts the bytes it
sent, .marks the offsets where its messages end and .replies (command,
offset) where each reply ends.  Anything that went wrong on the fake's side (qbak sent invalid JSON, a command the script did not
expect, an exception) is in .errors: a test must check it is empty before
blaming qbak.
"""
import array
import json
import os
import socket
import struct
import threading
import time

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": ""},
                    "capabilities": []}}

_UNSET = object()


def frame(msg):
    """A message as QEMU puts it on the wire."""
    if isinstance(msg, (bytes, bytearray)):
        return bytes(msg)
    return json.dumps(msg).encode() + b"\r\n"


def event(name, data=None):
    ev = {"timestamp": {"seconds": int(time.time()), "microseconds": 0},
          "event": name}
    if data is not None:
        ev["data"] = data
    return ev


def reply(cmd, ret):
    """{"return": ret, "id": <cmd's id>} (QEMU omits the id when the
    command had none)."""
    msg = {"return": ret}
    if "id" in cmd:
        msg["id"] = cmd["id"]
    return msg


def error_reply(cmd, cls, desc):
    msg = {"error": {"class": cls, "desc": desc}}
    if "id" in cmd:
        msg = {"id": cmd["id"], "error": msg["error"]}
    return msg


class Send:
    def __init__(self, data, pace=0.0):
        self.data = data
        self.pace = pace


class Expect:
    def __init__(self, name, ret=_UNSET, error=None, raw=None, reply=None,
                 noreply=False, before=(), delay=0.0):
        self.name = name
        self.ret = ret
        self.error = error
        self.raw = raw
        self.reply = reply
        self.noreply = noreply
        self.before = before if isinstance(before, (list, tuple)) else [before]
        self.delay = delay


class Close:
    def __init__(self, abrupt=False):
        self.abrupt = abrupt


class Serve:
    pass


class Sleep:
    def __init__(self, seconds):
        self.seconds = seconds


class _Cut(Exception):
    pass


class _Gone(Exception):
    pass


class NBDClient:
    """The client side of what QEMU's nbd driver does: fixed newstyle
    handshake with NBD_OPT_GO, simple replies, NBD_CMD_DISC on close."""

    def __init__(self, sock, export, timeout=10):
        """sock: connected to the server (qbak hands QEMU its end)."""
        self.sock = sock
        self.sock.settimeout(timeout)
        self.handle = 0
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != 0x4e42444d41474943 or opt != 0x49484156454F5054:
            raise OSError("NBD: bad greeting %x %x" % (magic, opt))
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE|NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data))
                          + data)
        self.size = None
        while True:
            magic, opt, typ, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != 0x3e889045565a9:
                raise OSError("NBD: bad option reply magic %x" % magic)
            if typ == 1:  # ACK
                break
            if typ & 0x80000000:
                raise OSError("NBD: NBD_OPT_GO refused (%x)" % typ)
            if typ == 3 and struct.unpack(">H", payload[:2])[0] == 0:
                self.size = struct.unpack(">Q", payload[2:10])[0]

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise OSError("NBD: server closed the connection")
            buf += chunk
        return buf

    def _request(self, typ, offset, length, payload=b""):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ,
                                      self.handle, offset, length) + payload)

    def write(self, offset, data):
        self._request(1, offset, len(data), data)
        magic, err, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != 0x67446698 or err or handle != self.handle:
            raise OSError("NBD: write at %d failed (error %d)" % (offset, err))

    def close(self):
        try:
            self._request(2, 0, 0)
        except OSError:
            pass
        self.sock.close()


class Qemu:
    """What QEMU 7.2 answers to qbak's commands, for one VM with one qcow2
    disk.  data: [(offset, bytes)] the guest wrote, pushed through the NBD
    export when the backup starts (a full backup writes what is
    allocated)."""

    def __init__(self, size=1 << 20, data=None, nbd=True, noise=None):
        self.size = size
        self.noise = noise  # cmd -> messages sent before each reply
        self.data = [(0, b"\x5a" * 65536), (512 << 10, b"qbak" * 1024)] \
            if data is None else data
        self.nbd = nbd  # connect to qbak's export on blockdev-add
        self.bitmaps = []
        self.nodes = {}  # our added nodes: name -> dict(args, client)
        self.fds = {}  # getfd: name -> fd
        self.jobs = {}   # id -> dict
        self.txn = []    # job ids started together

    def image_bytes(self):
        """The disk as the guest sees it: what a restore must give back."""
        img = bytearray(self.size)
        for off, buf in self.data:
            img[off:off + len(buf)] = buf
        return bytes(img)

    def disconnect(self):
        """Drop the NBD connections without NBD_CMD_DISC, as a dying QEMU
        does."""
        for n in self.nodes.values():
            if n["client"]:
                n["client"].sock.close()
                n["client"] = None

    def image(self, fmt, virtual_size, actual=200704):
        img = {"virtual-size": virtual_size, "filename": "d0.qcow2",
               "format": fmt, "actual-size": actual, "dirty-flag": False}
        if fmt == "qcow2":
            img["cluster-size"] = 65536
            img["format-specific"] = {
                "type": "qcow2",
                "data": {"compat": "1.1", "compression-type": "zlib",
                         "lazy-refcounts": False, "refcount-bits": 16,
                         "corrupt": False, "extended-l2": False}}
        return img

    def node(self, name, drv, image, bitmaps=None):
        n = {"iops_rd": 0, "detect_zeroes": "off", "image": image,
             "iops_wr": 0, "ro": False, "node-name": name,
             "backing_file_depth": 0, "drv": drv, "iops": 0, "bps_wr": 0,
             "write_threshold": 0, "encrypted": False, "bps": 0, "bps_rd": 0,
             "cache": {"no-flush": False, "direct": False, "writeback": True},
             "file": "d0.qcow2"}
        if bitmaps is not None:
            n["dirty-bitmaps"] = bitmaps
        return n

    def query_block(self):
        return [{"io-status": "ok", "device": "", "locked": False,
                 "removable": False,
                 "inserted": self.node("drive0", "qcow2",
                                       self.image("qcow2", self.size),
                                       [dict(b) for b in self.bitmaps]),
                 "qdev": "/machine/peripheral/vd0/virtio-backend",
                 "type": "unknown"}]

    def query_named_block_nodes(self):
        nodes = [self.node("drive0", "qcow2", self.image("qcow2", self.size)),
                 self.node("file0", "file", self.image("file", 197120))]
        for name, n in self.nodes.items():
            nodes.append(self.node(name, "nbd", {
                "virtual-size": self.size, "format": "nbd",
                "filename": "nbd+unix:///%s?socket=%s"
                            % (n["args"].get("export", ""),
                               n["args"]["server"]["path"]),
                "dirty-flag": False}))
        return nodes

    def _job_event(self, fake, job, status):
        job["status"] = status
        fake.send(frame(event("JOB_STATUS_CHANGE",
                              {"status": status, "id": job["id"]})))

    def handle(self, fake, cmd):
        name = cmd.get("execute")
        args = cmd.get("arguments", {})
        for msg in self.noise(cmd) if self.noise else []:
            fake.send(frame(msg))
        fn = getattr(self, "cmd_" + str(name).replace("-", "_"), None)
        if fn is None:
            fake.send(frame(error_reply(
                cmd, "CommandNotFound",
                "The command %s has not been found" % name)))
            return
        res = fn(fake, args)
        if isinstance(res, tuple):
            fake.send(frame(error_reply(cmd, *res)))
        else:
            fake.send(frame(reply(cmd, res)))
        fake.replies.append((name, fake.sent))

    def cmd_qmp_capabilities(self, fake, args):
        return {}

    def cmd_query_jobs(self, fake, args):
        out = []
        for j in self.jobs.values():
            e = {"current-progress": self.size, "status": j["status"],
                 "total-progress": self.size, "type": "backup", "id": j["id"]}
            if j.get("error"):
                e["error"] = j["error"]
            out.append(e)
        return out

    def cmd_query_named_block_nodes(self, fake, args):
        return self.query_named_block_nodes()

    def cmd_query_block(self, fake, args):
        return self.query_block()

    def cmd_getfd(self, fake, args):
        if not fake.fds:
            return ("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        fd = fake.fds.pop(0)
        old = self.fds.pop(args.get("fdname"), None)
        if old is not None:
            os.close(old)
        self.fds[args.get("fdname")] = fd
        return {}

    def cmd_closefd(self, fake, args):
        fd = self.fds.pop(args.get("fdname"), None)
        if fd is None:
            return ("GenericError", "File descriptor named '%s' not found"
                    % args.get("fdname"))
        os.close(fd)
        return {}

    def take_fd(self, server):
        """The socket a blockdev-add names (getfd), taken as QEMU does."""
        if server.get("type") != "fd":
            raise OSError("server type %r, expected fd" % server.get("type"))
        fd = self.fds.pop(server.get("str"), None)
        if fd is None:
            raise OSError("File descriptor named '%s' has not been found"
                          % server.get("str"))
        return socket.socket(fileno=fd)

    def cmd_blockdev_add(self, fake, args):
        name = args.get("node-name")
        if name in self.nodes or name in ("drive0", "file0"):
            return ("GenericError", "Duplicate nodes with node-name='%s'" % name)
        client = None
        if args.get("driver") == "nbd" and self.nbd:
            try:
                client = NBDClient(self.take_fd(args["server"]),
                                   args.get("export", ""))
            except OSError as e:
                return ("GenericError", "Failed to connect: %s" % e)
        self.nodes[name] = {"args": args, "client": client}
        return {}

    def cmd_blockdev_del(self, fake, args):
        n = self.nodes.pop(args.get("node-name"), None)
        if n is None:
            return ("GenericError", "Failed to find node with node-name='%s'"
                    % args.get("node-name"))
        if n["client"]:
            n["client"].close()
        return {}

    def cmd_block_dirty_bitmap_add(self, fake, args):
        if args.get("node") != "drive0":
            return ("GenericError", "Cannot find device='%s' nor node-name='%s'"
                    % (args.get("node"), args.get("node")))
        if any(b["name"] == args.get("name") for b in self.bitmaps):
            return ("GenericError", "Bitmap already exists: %s" % args.get("name"))
        self.bitmaps.append({"name": args["name"], "recording": True,
                             "persistent": bool(args.get("persistent")),
                             "busy": False, "granularity": 65536, "count": 0})
        return {}

    def cmd_block_dirty_bitmap_remove(self, fake, args):
        for b in self.bitmaps:
            if b["name"] == args.get("name") and args.get("node") == "drive0":
                self.bitmaps.remove(b)
                return {}
        return ("GenericError", "Dirty bitmap '%s' not found" % args.get("name"))

    def cmd_transaction(self, fake, args):
        acts = args.get("actions", [])
        for a in acts:
            d = a.get("data", {})
            if a.get("type") != "blockdev-backup":
                return ("GenericError", "unsupported action %s" % a.get("type"))
            if d.get("device") != "drive0":
                return ("GenericError", "Cannot find device='%s' nor "
                        "node-name='%s'" % (d.get("device"), d.get("device")))
            if d.get("target") not in self.nodes:
                return ("GenericError", "Cannot find device='%s' nor "
                        "node-name='%s'" % (d.get("target"), d.get("target")))
            if d.get("bitmap") and not any(b["name"] == d["bitmap"]
                                           for b in self.bitmaps):
                return ("GenericError", "Bitmap '%s' could not be found"
                        % d["bitmap"])
            if d.get("job-id") in self.jobs:
                return ("GenericError", "Job ID '%s' already in use"
                        % d["job-id"])
        self.txn = []
        for a in acts:
            d = a["data"]
            job = {"id": d["job-id"], "status": "undefined", "data": d}
            self.jobs[job["id"]] = job
            self.txn.append(job["id"])
            self._job_event(fake, job, "created")
            self._job_event(fake, job, "running")
            client = self.nodes[d["target"]]["client"]
            # The job copies while qbak waits for this reply (QEMU's job
            # runs in its own coroutine; qbak's ring serves NBD meanwhile).
            for off, buf in self.data if client else []:
                client.write(off, buf)
            self._job_event(fake, job, "waiting")
            self._job_event(fake, job, "pending")
        return {}

    def _verb(self, fake, args, verb, ok):
        job = self.jobs.get(args.get("id"))
        if job is None:
            return ("GenericError", "Job not found")
        if job["status"] not in ok:
            return ("GenericError", "Job '%s' in state '%s' cannot accept "
                    "command verb '%s'" % (job["id"], job["status"], verb))
        return job

    def cmd_job_finalize(self, fake, args):
        job = self._verb(fake, args, "finalize", ("pending",))
        if isinstance(job, tuple):
            return job
        for jid in self.txn if job["id"] in self.txn else [job["id"]]:
            self._job_event(fake, self.jobs[jid], "concluded")
        return {}

    def cmd_job_cancel(self, fake, args):
        job = self._verb(fake, args, "cancel",
                         ("created", "running", "paused", "ready", "standby",
                          "waiting", "pending"))
        if isinstance(job, tuple):
            return job
        for jid in self.txn if job["id"] in self.txn else [job["id"]]:
            j = self.jobs[jid]
            if j["status"] != "concluded":
                j["error"] = "Operation canceled"
                self._job_event(fake, j, "aborting")
                self._job_event(fake, j, "concluded")
        return {}

    def cmd_job_dismiss(self, fake, args):
        job = self._verb(fake, args, "dismiss", ("concluded",))
        if isinstance(job, tuple):
            return job
        self._job_event(fake, job, "null")
        del self.jobs[job["id"]]
        return {}

    def cmd_query_status(self, fake, args):
        return {"status": "prelaunch", "singlestep": False, "running": False}


class FakeQMP:
    def __init__(self, path, steps, qemu=None, cut_at=None, timeout=30):
        self.path = path
        self.steps = list(steps)
        self.qemu = qemu or Qemu()
        self.cut_at = cut_at
        self.timeout = timeout
        self.commands = []
        self.errors = []
        self.sent = 0
        self.marks = []  # self.sent after each message: frame boundaries
        self.replies = []  # (command, self.sent after its reply)
        self.peer_gone = False
        self.conn = None
        self._buf = b""
        self.fds = []  # received with qbak's commands (SCM_RIGHTS), for getfd
        self._ids = set()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def wait(self, timeout=None):
        self.thread.join(self.timeout if timeout is None else timeout)
        if self.thread.is_alive():
            self.errors.append("fake QMP server still running")

    def names(self):
        return [c.get("execute") for c in self.commands]

    # -- I/O -------------------------------------------------------------
    def send(self, data, pace=0.0):
        data = frame(data)
        if self.cut_at is not None and self.sent + len(data) >= self.cut_at:
            data = data[:self.cut_at - self.sent]
            self._sendall(data)
            raise _Cut()
        if pace:
            for i in range(len(data)):
                self._sendall(data[i:i + 1])
                time.sleep(pace)
        else:
            self._sendall(data)
        self.marks.append(self.sent)

    def _sendall(self, data):
        try:
            self.conn.sendall(data)
        except OSError:  # qbak gave up and hung up: its exit code tells
            self.peer_gone = True
            raise _Gone()
        self.sent += len(data)

    def recv_command(self):
        """qbak's next command, or None when it hung up."""
        while b"\n" not in self._buf:
            try:
                chunk, anc, _, _ = self.conn.recvmsg(
                    65536, socket.CMSG_SPACE(16 * 4))
            except OSError:
                chunk, anc = b"", []
            for level, typ, data in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    self.fds += list(fds)
            if not chunk:
                if self._buf.strip():
                    self.errors.append("qbak hung up in the middle of a "
                                       "command: %r" % self._buf[:200])
                self.peer_gone = True
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            cmd = json.loads(line)
        except ValueError:
            self.errors.append("qbak sent invalid JSON: %r" % line[:200])
            return None
        if not isinstance(cmd, dict) or not isinstance(cmd.get("execute"), str):
            self.errors.append("qbak sent a non-command: %r" % line[:200])
            return None
        if "id" in cmd:
            if cmd["id"] in self._ids:
                self.errors.append("qbak reused id %r" % cmd["id"])
            self._ids.add(cmd["id"])
        self.commands.append(cmd)
        return cmd

    def _close(self, abrupt):
        if abrupt:
            self.conn.close()
            return
        try:
            self.conn.shutdown(socket.SHUT_WR)
            while self.conn.recv(65536):  # until qbak hangs up
                pass
        except OSError:
            pass
        self.conn.close()

    # -- the script ------------------------------------------------------
    def _expect(self, step):
        cmd = self.recv_command()
        if cmd is None:
            raise _Gone()
        if step.name is not None and cmd["execute"] != step.name:
            self.errors.append("script expected %s, qbak sent %s"
                               % (step.name, cmd["execute"]))
            self.send(frame(error_reply(cmd, "GenericError",
                                        "fake QMP: unexpected command")))
            raise _Gone()
        for b in step.before:
            self.send(frame(b))
        if step.delay:
            time.sleep(step.delay)
        if step.noreply:
            return
        if step.reply is not None:
            step.reply(self, cmd)
        elif step.raw is not None:
            self.send(step.raw(cmd) if callable(step.raw) else step.raw)
        elif step.error is not None:
            self.send(frame(error_reply(cmd, *step.error)))
        elif step.ret is not _UNSET:
            self.send(frame(reply(cmd, step.ret)))
        else:
            self.qemu.handle(self, cmd)
            return
        self.replies.append((cmd["execute"], self.sent))

    def _run(self):
        self.listener.settimeout(self.timeout)
        try:
            self.conn, _ = self.listener.accept()
        except OSError as e:
            self.errors.append("qbak did not connect: %s" % e)
            return
        finally:
            self.listener.close()
        self.conn.settimeout(self.timeout)
        abrupt = False
        try:
            for step in self.steps:
                if isinstance(step, Send):
                    self.send(step.data, step.pace)
                elif isinstance(step, Expect):
                    self._expect(step)
                elif isinstance(step, Sleep):
                    time.sleep(step.seconds)
                elif isinstance(step, Close):
                    abrupt = step.abrupt
                    break
                elif isinstance(step, Serve):
                    while True:
                        cmd = self.recv_command()
                        if cmd is None:
                            break
                        self.qemu.handle(self, cmd)
                    break
            else:
                # Script done: answer nothing more, read what qbak still
                # sends, until it hangs up.
                while self.recv_command() is not None:
                    pass
        except _Cut:
            # QEMU going away closes its NBD connections too.
            self.qemu.disconnect()
        except _Gone:
            pass
        except socket.timeout:
            self.errors.append("fake QMP: qbak neither sent nor hung up "
                               "within %d s" % self.timeout)
        except Exception as e:  # a bug in the fake or the test's script
            self.errors.append("fake QMP: %s: %s" % (type(e).__name__, e))
        self._close(abrupt)
        self.qemu.disconnect()


def session_prefix():
    """The steps of a normal session up to the disks being known, as qbak
    runs it: greeting, qmp_capabilities, query-jobs twice (recovery lists
    an earlier run's jobs, then checks they have all concluded),
    query-named-block-nodes, query-block; all answered by the model."""
    return [Send(GREETING), Expect("qmp_capabilities"), Expect("query-jobs"),
            Expect("query-jobs"), Expect("query-named-block-nodes"),
            Expect("query-block")]

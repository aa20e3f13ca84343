"""A scripted guest agent for fault tests: speaks enough of the QGA
protocol (0xFF resync, guest-sync-delimited, fsfreeze status/freeze/thaw)
and misbehaves on demand.  It models the guest's freeze state, so a test
can assert the guest was never left frozen."""
import json
import os
import socket
import threading
import time


class FakeQGA:
    def __init__(self, path, behaviour, delay=0.0, state="thawed"):
        self.path = path
        self.behaviour = behaviour
        self.delay = delay
        self.state = state
        self.calls = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.srv.bind(path)
        self.srv.listen(4)
        self.srv.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def close(self):
        self.stop = True
        self.thread.join(10)
        self.srv.close()

    def serve(self):
        while not self.stop:
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            try:
                self.session(conn)
            except (OSError, ValueError):
                pass
            conn.close()

    def send(self, conn, obj, cid, raw=b""):
        if cid is not None:
            obj["id"] = cid
        conn.sendall(raw + json.dumps(obj).encode() + b"\n")

    def session(self, conn):
        buf = b""
        conn.settimeout(0.2)
        while not self.stop:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            buf += chunk.replace(b"\xff", b"")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                msg = json.loads(line)
                cmd, cid = msg.get("execute"), msg.get("id")
                self.calls.append(cmd)
                if self.behaviour == "silent":
                    continue
                if cmd == "guest-sync-delimited":
                    junk = b""
                    if self.behaviour == "garbage":
                        junk = b"\x00garbage{]\"\n" + b"x" * (2 << 20) + b"\n"
                    self.send(conn, {"return": msg["arguments"]["id"]}, None, junk + b"\xff")
                elif cmd == "guest-fsfreeze-status":
                    self.send(conn, {"return": self.state}, cid)
                elif cmd == "guest-fsfreeze-freeze":
                    if self.behaviour == "error":
                        self.send(conn, {"error": {"class": "GenericError",
                                                   "desc": "fsfreeze is disabled"}}, cid)
                        continue
                    self.state = "frozen"  # takes effect even if never answered
                    if self.behaviour == "disconnect":
                        return
                    if self.behaviour == "freeze-hangs":
                        continue
                    if self.behaviour == "freeze-late":
                        time.sleep(self.delay)
                    self.send(conn, {"return": 2}, cid)
                elif cmd == "guest-fsfreeze-thaw":
                    n = 2 if self.state == "frozen" else 0
                    self.state = "thawed"
                    self.send(conn, {"return": n}, cid)
                else:
                    self.send(conn, {"error": {"class": "CommandNotFound", "desc": cmd}}, cid)

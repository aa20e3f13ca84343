#!/usr/bin/env python3
"""Malformed and hostile QMP (untrusted input stays contained: malformed
QMP JSON, oversized messages, unknown ids, events between reply and
command, EOF at any byte), played by a scripted fake QMP server
(tests/fake/fake_qmp.py) against the real qbak.

Each case runs `qbak backup --timeout 2 --json` against its own fake, its
own repository, and checks:
  - the exit code: 1, or 0 for benign noise; never a signal, never a hang
    (killed after HANG s), and within the case's time bound (bounds have a
    margin no machine load reaches: they catch waiting without end or
    retrying without end, not a slow machine);
  - on failure exactly one printable UTF-8 stderr line "qbak backup: ..."
    that names the problem (key words per case);
  - no point listed (`qbak list`), no .partial-*;
  - on success: the point is listed and restores to the fake disk's bytes,
    and no node, job, monitor fd or bitmap of ours but the chain's bitmap is
    left in the fake QEMU; where the fake keeps serving after a fault, qbak removed
    everything it had added there;
  - the fake itself saw valid commands in the order its script expected.

Cases: garbage, non-object, unterminated, invalid UTF-8, NUL, 1000-deep,
huge-number and oversized (> 16 MiB, streamed) greetings and replies; a
message exactly at the 16 MiB limit; EOF at every byte offset of a normal
session's first 640 bytes, around every message boundary and at a sample of
the later offsets up to the end of a whole backup (the point must be
committed exactly when the reply that confirms the job is pending is
complete, and not before); unknown ids, replies without
id, duplicate replies, events (JOB_STATUS_CHANGE of another job, an event
carrying the pending id, a second greeting, a flood of 120000) between any
command and its reply; a reply that never comes, comes late or after a
delay; error replies (with control characters too); query-block with wrong
types and hostile names; errors from getfd, blockdev-add (before and after
QEMU connected to the NBD export), block-dirty-bitmap-add and transaction.

Also run under AddressSanitizer+UBSan when build/asan/qbak (or $QBAK_ASAN)
exists, with a sparser EOF sweep.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, os.path.join(HERE, "..", "fake"))
from qbaktest import QBAK, QEMU_IMG, ROOT, log, workdir  # noqa: E402
from fake_qmp import (GREETING, Close, Expect, FakeQMP, NBDClient,  # noqa: E402
                      Qemu, Send, Serve, Sleep, error_reply, event, frame,
                      reply)

TIMEOUT = 2                # qbak --timeout in the cases that test it
CALM = 60                  # qbak --timeout in all other cases: no answer
                           # may miss it because the machine is busy
# The default time bound of a case: a call's timeout, another one during
# cleanup, qbak's 2 s grace for the NBD client to go (6 s on an idle
# machine), and a margin for ASan on a machine loaded with other work, which
# stretched such runs to 25 s and more: load must never fail a case.
MARGIN = 54
HANG = 180                 # qbak still running after this: hung, killed
LIMIT = 16 << 20           # the QMP parser's message limit
VM = "vm1"

# qbak's commands up to the backup transaction, in order (recovery lists
# jobs and nodes in one batch; the VM's settings recorded in every point
# come from one batch of queries, query-block first: the disks are planned
# from it).
SETTINGS = ["query-block", "query-version", "query-name", "query-uuid",
            "query-kvm", "query-status", "query-cpus-fast",
            "query-hotpluggable-cpus", "query-memdev",
            "query-memory-size-summary", "query-memory-devices",
            "query-named-block-nodes", "query-pci",
            "query-chardev", "query-migrate-capabilities",
            "query-migrate-parameters", "qom-list", "qom-list", "qom-get"]
ORDER = ["qmp_capabilities", "query-jobs",
         "query-named-block-nodes"] + SETTINGS + [
         "getfd", "blockdev-add", "block-dirty-bitmap-add", "transaction"]
QB = Qemu().query_block()  # the model's query-block, for edits
CLOSED = ("connection closed", "connection reset", "broken pipe")


class Case:
    def __init__(self, name, steps, words=(), rc=1, qemu=Qemu, max_s=None,
                 min_s=0.0, cut_at=None, clean=False, sweep=False,
                 timeout=None, check=None):
        self.name = name
        # qbak --timeout: short where the case waits for it to expire (it
        # has a lower time bound), long elsewhere, more for bulk data.
        if timeout is None:
            timeout = TIMEOUT if min_s > 0 else CALM
        self.timeout = timeout
        if max_s is None:
            max_s = 2 * timeout + 2 + MARGIN
        self.check = check      # message -> [problems]
        self.steps = steps
        self.words = words    # each a word or a tuple of alternatives
        self.rc = rc
        self.qemu = qemu      # factory of the fake's QEMU model
        self.max_s = max_s
        self.min_s = min_s
        self.cut_at = cut_at
        self.clean = clean    # the fake serves on: nothing of ours left
        self.sweep = sweep    # one of many: fewer checks


def at(cmd, nth=0, then=(Serve(),), **answer):
    """A normal session up to the nth cmd, answered as given (Expect's
    arguments), then `then` (by default: the model answers the rest)."""
    steps = [Send(GREETING)]
    seen = 0
    for name in ORDER:
        if name == cmd:
            if seen == nth:
                return steps + [Expect(name, **answer)] + list(then)
            seen += 1
        steps.append(Expect(name))
    raise ValueError(cmd)


def raw(template):
    """A raw reply: template bytes with @ID@ replaced by the command's id."""
    return lambda cmd: template.replace(b"@ID@", str(cmd["id"]).encode())


def qb(edit):
    """The model's query-block list after edit(list)."""
    b = copy.deepcopy(QB)
    edit(b)
    return b


def ins(key, value):
    return qb(lambda b: b[0]["inserted"].__setitem__(key, value))


def img(key, value):
    return qb(lambda b: b[0]["inserted"]["image"].__setitem__(key, value))


def qdev(path):
    return qb(lambda b: b[0].__setitem__("qdev", path))


def greeting_with(package):
    """The greeting's bytes with a raw package string (may be invalid)."""
    return frame(GREETING).replace(b'"package": ""', b'"package": "' + package + b'"')


def deep(n, opener=b"[", closer=b"]"):
    return opener * n + closer * n


def unknown_ids(cmd):
    """Replies nobody asked for, sent before cmd's own reply."""
    i = cmd["id"]
    out = [{"return": {}, "id": v} for v in
           (i + 1, i - 1, 0, -i, 10 ** 15, str(i), i + 0.5, None, [i],
            {"id": i}, True)]
    out += [{"return": {}}, {"return": []},
            {"error": {"class": "GenericError", "desc": "no id"}},
            {"error": {"class": "GenericError", "desc": "old"}, "id": i + 1000}]
    return out


def events(cmd):
    """Events between a command and its reply, one carrying the pending id."""
    return [event("JOB_STATUS_CHANGE", {"status": "running", "id": "other-job"}),
            event("BLOCK_JOB_COMPLETED", {"device": "other-job", "len": 1,
                                          "offset": 1, "speed": 0,
                                          "type": "backup"}),
            event("RESUME"), event("NIC_RX_FILTER_CHANGED", "not an object"),
            dict(event("STOP"), id=cmd["id"]),
            GREETING]


def noisy(fake, cmd):
    for m in unknown_ids(cmd) + events(cmd):
        fake.send(frame(m))
    fake.qemu.handle(fake, cmd)


def connect_then_fail(fake, cmd):
    """QEMU connected to the export, then failed the blockdev-add."""
    sock = fake.qemu.take_fd(cmd["arguments"]["server"])
    NBDClient(sock, cmd["arguments"]["export"]).sock.close()
    fake.send(frame(error_reply(cmd, "GenericError", "boom-nbd after connect")))


def at_limit(extra):
    """A query-block reply of exactly LIMIT + extra bytes (without CRLF)."""
    def make(cmd):
        head = b'{"return": ' + json.dumps(QB).encode() + \
            b', "id": ' + str(cmd["id"]).encode() + b', "pad": "'
        return head + b"A" * (LIMIT + extra - len(head) - 2) + b'"}\r\n'
    return make


class GarbageJobs(Qemu):
    """query-jobs answers garbage once the backup has started."""
    def cmd_query_jobs(self, fake, args):
        return "garbage" if self.txn else Qemu.cmd_query_jobs(self, fake, args)


QB_BYTES = json.dumps(QB).encode()
# More events than qbak queues (100000): the rest must be dropped.
FLOOD = frame({"event": "RESUME"}) * 120000


# A longer --timeout (and bound) for a case that streams megabytes: that
# can take more than 2 s under ASan, and minutes on a loaded machine.
BULK = {"timeout": 120, "max_s": 150}


def bulk(data):
    return BULK if len(data) > (1 << 20) else {}


def named_cases():
    c = []
    # The greeting.
    for name, data, words in [
            ("greeting-http", b"HTTP/1.1 400 Bad Request\r\n\r\n",
             ["QMP greeting", "unexpected byte 0x48"]),
            ("greeting-binary", bytes(range(256)) * 4,
             ["QMP greeting", "unexpected byte 0x00"]),
            ("greeting-array", b"[" + frame(GREETING).strip() + b"]\r\n",
             ["QMP greeting", "not a JSON object"]),
            ("greeting-string", b'"QMP"\r\n', ["QMP greeting", "not a JSON object"]),
            ("greeting-number", b"7\r\n", ["QMP greeting", "not a JSON object"]),
            ("greeting-invalid-utf8", greeting_with(b"\xff\xfe"),
             ["QMP greeting", "invalid JSON"]),
            ("greeting-overlong-utf8", greeting_with(b"\xc0\xaf"),
             ["QMP greeting", "invalid JSON"]),
            ("greeting-cut-utf8", greeting_with(b"\xe2\x82"),
             ["QMP greeting", "invalid JSON"]),
            ("greeting-nul-in-string", greeting_with(b"a\x00b"),
             ["QMP greeting", "invalid JSON"]),
            ("greeting-nul-before", b"\x00" + frame(GREETING),
             ["QMP greeting", "unexpected byte 0x00"]),
            ("greeting-1000-deep", b'{"QMP": ' + deep(1000) + b"}\r\n",
             ["QMP greeting", "nesting deeper than 64"]),
            ("greeting-1000-deep-objects",
             b'{"QMP": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"}\r\n",
             ["QMP greeting", "nesting deeper than 64"]),
            ("greeting-oversized",
             b'{"QMP": {"package": "' + b"A" * (LIMIT + (1 << 20)) + b'"}}\r\n',
             ["QMP greeting", "exceeds 16777216 bytes"])]:
        c.append(Case(name, [Send(data)], words, **bulk(data)))
    c += [
        Case("greeting-unterminated-eof", [Send(frame(GREETING)[:60]), Close()],
             ["QMP greeting", CLOSED]),
        Case("greeting-eof-at-once", [Close()], ["QMP greeting", CLOSED]),
        Case("greeting-then-reset", [Send(GREETING), Sleep(0.3), Close(abrupt=True)],
             ["qmp_capabilities", CLOSED]),
        Case("greeting-silence", [], ["QMP greeting", "2000 ms"], min_s=TIMEOUT - 0.1),
        Case("greeting-not-a-greeting", [Send({"return": {}})],
             ["QMP greeting", "not one", "QMP monitor socket"]),
        Case("greeting-dribbled", [Send(GREETING, pace=0.002), Serve()], rc=0),
    ]
    # JSON faults in a reply (query-block's: the one with most in it).
    for name, template, words in [
            ("reply-1e400", b'{"return": [], "id": @ID@, "x": 1e400}\r\n',
             ["query-block", "invalid JSON", "overflow"]),
            ("reply-400-digit-int",
             b'{"return": [], "id": @ID@, "x": ' + b"9" * 400 + b"}\r\n",
             ["query-block", "invalid JSON", "too big"]),
            ("reply-400-digit-negative",
             b'{"return": [], "id": @ID@, "x": -' + b"9" * 400 + b"}\r\n",
             ["query-block", "invalid JSON", "too big"]),
            ("reply-id-beyond-int64",
             b'{"return": [], "id": 18446744073709551616}\r\n',
             ["query-block", "invalid JSON", "too big"]),
            ("reply-invalid-utf8",
             QB_BYTES.replace(b"vd0", b"v\xffd0").join(
                 [b'{"return": ', b', "id": @ID@}\r\n']),
             ["query-block", "invalid JSON"]),
            ("reply-overlong-utf8", b'{"return": [], "id": @ID@, "x": "\xc0\xaf"}\r\n',
             ["query-block", "invalid JSON"]),
            ("reply-lone-surrogate", b'{"return": [], "id": @ID@, "x": "\\ud800"}\r\n',
             ["query-block", "invalid JSON"]),
            ("reply-nul-in-string", b'{"return": [], "id": @ID@, "x": "a\x00b"}\r\n',
             ["query-block", "invalid JSON"]),
            ("reply-nul-escaped", b'{"return": [], "id": @ID@, "x": "a\\u0000b"}\r\n',
             ["query-block", "invalid JSON"]),
            ("reply-nul-before", b'\x00{"return": [], "id": @ID@}\r\n',
             ["query-block", "unexpected byte 0x00"]),
            ("reply-1000-deep", b'{"return": ' + deep(1000) + b', "id": @ID@}\r\n',
             ["query-block", "nesting deeper than 64"]),
            ("reply-1000-deep-objects",
             b'{"return": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b', "id": @ID@}\r\n',
             ["query-block", "nesting deeper than 64"]),
            ("reply-mismatched-bracket", b'{"return": [}, "id": @ID@}\r\n',
             ["query-block", "mismatched"]),
            ("reply-oversized",
             b'{"return": [], "id": @ID@, "pad": "' + b"A" * (LIMIT + (1 << 20)) + b'"}\r\n',
             ["query-block", "exceeds 16777216 bytes"]),
            ("reply-error-no-desc", b'{"error": {"class": "GenericError"}, "id": @ID@}\r\n',
             ["query-block", "without description"]),
            ("reply-error-not-object", b'{"error": "boom", "id": @ID@}\r\n',
             ["query-block"]),
            ("reply-neither-return-nor-error", b'{"id": @ID@}\r\n',
             ["query-block", "neither return nor error"])]:
        c.append(Case(name, at("query-block", raw=raw(template)), words,
                      **bulk(template)))
    c += [
        Case("reply-at-limit", at("query-block", raw=at_limit(0)), rc=0,
             **BULK),
        Case("reply-limit-plus-one", at("query-block", raw=at_limit(1)),
             ["query-block", "exceeds 16777216 bytes"], **BULK),
        Case("reply-garbage-after", at("query-block", raw=lambda cmd: frame(
            reply(cmd, QB)) + b"xyz"), ["unexpected byte 0x78"]),
        Case("reply-without-id-only", at("query-block", raw=frame({"return": QB})),
             ["query-block", "no reply within 2000 ms"], min_s=TIMEOUT - 0.1),
    ]
    # Noise that must not matter: the backup completes.
    c += [
        Case("unknown-ids", at("query-block", before=(), reply=lambda f, cmd: (
            [f.send(frame(m)) for m in unknown_ids(cmd)], f.qemu.handle(f, cmd))),
            rc=0),
        Case("events-before-reply", at("query-block", reply=lambda f, cmd: (
            [f.send(frame(m)) for m in events(cmd)], f.qemu.handle(f, cmd))),
            rc=0),
        Case("noise-everywhere", [Send(GREETING), Serve()], rc=0,
             qemu=lambda: Qemu(noise=lambda cmd: unknown_ids(cmd) + events(cmd))),
        Case("event-flood", at("query-block", before=[FLOOD]), rc=0, **BULK),
        Case("duplicate-reply", at("query-block", raw=lambda cmd: frame(
            reply(cmd, QB)) * 2), rc=0),
        Case("delayed-reply", at("query-block", delay=TIMEOUT * 0.6), rc=0),
        Case("query-jobs-garbage", at("query-jobs", ret="garbage"), rc=0),
        Case("query-jobs-garbage-entries", at("query-jobs", ret=[
            1, None, {"id": 5}, {"id": "other", "status": "running"}]), rc=0),
        Case("named-nodes-garbage", at("query-named-block-nodes", ret=[
            1, {"node-name": 5}, {"node-name": "qbak-"}]), rc=0),
        Case("qb-dirty-bitmaps-garbage", at("query-block", ret=ins(
            "dirty-bitmaps", [1, {"name": 5}, {"name": "qbak-x", "busy": "x"}])),
            rc=0),
    ]
    # No reply, a late one, an error reply.
    c += [
        Case("no-reply-qmp_capabilities", at("qmp_capabilities", noreply=True, then=()),
             ["qmp_capabilities", "no reply within 2000 ms"], min_s=TIMEOUT - 0.1),
        Case("no-reply-query-block", at("query-block", noreply=True, then=()),
             ["query-block", "no reply within 2000 ms"], min_s=TIMEOUT - 0.1),
        Case("no-reply-blockdev-add", at("blockdev-add", noreply=True),
             ["vd0", "blockdev-add", "no reply within 2000 ms"],
             min_s=TIMEOUT - 0.1, clean=True),
        Case("no-reply-transaction", at("transaction", noreply=True),
             ["transaction", "no reply within 2000 ms"], min_s=TIMEOUT - 0.1,
             clean=True),
        Case("late-reply", at("blockdev-add", raw=raw(b'{"return": {}, "id": @ID@}\r\n'),
                              delay=TIMEOUT + 0.5),
             ["blockdev-add", "no reply within 2000 ms"], min_s=TIMEOUT - 0.1,
             clean=True),
        Case("error-qmp_capabilities", at("qmp_capabilities", error=(
            "CommandNotFound", "The command qmp_capabilities has not been found")),
            ["qmp_capabilities", "has not been found"]),
        Case("error-query-jobs", at("query-jobs", error=("GenericError", "boom")),
             ["query-jobs", "boom"]),
        Case("error-query-named-block-nodes", at("query-named-block-nodes", error=(
            "GenericError", "boom")), ["query-named-block-nodes", "boom"]),
        Case("error-query-block", at("query-block", error=("GenericError", "boom")),
             ["query-block", "boom"]),
        Case("error-desc-control-chars", at("query-block", error=(
            "GenericError", "line1\nline2\x1b[2J\r")), ["query-block", "line1"]),
        Case("error-getfd", at("getfd", error=("GenericError", "boom-fd")),
             ["vd0", "getfd", "boom-fd"], clean=True),
        Case("error-blockdev-add", at("blockdev-add", error=("GenericError", "boom-nbd")),
             ["vd0", "blockdev-add", "boom-nbd"], clean=True),
        Case("error-blockdev-add-after-connect", at("blockdev-add", reply=connect_then_fail),
             ["vd0", "blockdev-add", "boom-nbd after connect"], clean=True),
        Case("noise-then-error-blockdev-add",
             [Send(GREETING)] + [Expect(n, reply=noisy)
                                 for n in ORDER[:ORDER.index("getfd") + 1]] +
             [Expect("blockdev-add", error=("GenericError", "boom-nbd")), Serve()],
             ["vd0", "blockdev-add", "boom-nbd"], clean=True,
             qemu=lambda: Qemu(noise=lambda cmd: unknown_ids(cmd) + events(cmd))),
        Case("error-bitmap-add", at("block-dirty-bitmap-add", error=("GenericError", "boom-bm")),
             ["vd0", "block-dirty-bitmap-add", "boom-bm"], clean=True),
        Case("error-transaction", at("transaction", error=("GenericError", "boom-txn")),
             ["transaction", "boom-txn"], clean=True),
        Case("query-jobs-garbage-during-job", [Send(GREETING), Serve()],
             ["vd0", "vanished"], qemu=GarbageJobs, clean=True),
    ]
    # query-block with wrong types or hostile content.
    nowritable = ["no writable disk"]
    for name, ret, words in [
            ("qb-string", "drive0", ["query-block", "not an array"]),
            ("qb-object", {"drive0": QB[0]}, ["query-block", "not an array"]),
            ("qb-null", None, ["query-block", "not an array"]),
            ("qb-entries-garbage", [1, "x", None, [], True, {}], nowritable),
            ("qb-virtual-size-string", img("virtual-size", "1048576"), nowritable),
            ("qb-virtual-size-float", img("virtual-size", 1048576.0), nowritable),
            ("qb-virtual-size-negative", img("virtual-size", -512), nowritable),
            ("qb-virtual-size-huge", img("virtual-size", 2 ** 63 - 1),
             ["vd0", "virtual size"]),
            ("qb-image-missing", qb(lambda b: b[0]["inserted"].pop("image")), nowritable),
            ("qb-node-name-missing", qb(lambda b: b[0]["inserted"].pop("node-name")),
             nowritable),
            ("qb-node-name-int", ins("node-name", 7), nowritable),
            ("qb-inserted-list", qb(lambda b: b[0].__setitem__("inserted", [])),
             nowritable),
            ("qb-read-only", ins("ro", True), nowritable),
            ("qb-disk-name-dotdot", qdev("/machine/peripheral/../virtio-backend"),
             ["invalid disk name"]),
            ("qb-disk-name-empty", qdev("/machine/peripheral//virtio-backend"),
             ["invalid disk name"]),
            ("qb-disk-name-control-chars",
             qdev("/machine/peripheral/a\nb\x1b[31m/virtio-backend"),
             ["invalid disk name"]),
            # An anonymous device on node "vd0" and a device with id "vd0":
            # real QEMU 7.2 accepts this configuration.
            ("qb-disk-name-twice", qb(lambda b: b.append(dict(
                copy.deepcopy(b[0]), qdev="/machine/peripheral-anon/device[1]/virtio-backend",
                inserted=dict(b[0]["inserted"], **{"node-name": "vd0"})))),
             ["vd0", ("twice", "duplicate", "same name", "two disks")])]:
        c.append(Case(name, at("query-block", ret=ret), words, clean=True))
    return c


def session_marks(binary, tag):
    """Run a whole normal session.  Returns its result, the bytes the fake
    sent, and the offset from which qbak must have committed: the end of
    the JSON (before CRLF) of the query-jobs reply that shows the job still
    pending right before the commit (the second after the transaction)."""
    res = run_case(Case("baseline", [Send(GREETING), Serve()], rc=0), binary, tag)
    fake = res["fake"]
    names = [n for n, _ in fake.replies]
    if res["problems"] or "transaction" not in names:
        return res, None, None
    after = fake.replies[names.index("transaction") + 1:]
    jobs = [end for n, end in after if n == "query-jobs"]
    return res, fake.sent, jobs[1] - 2


def nbd_names_disk(msg):
    """QEMU going away also drops its NBD connection, and qbak may notice
    that first: fine, if it says which disk."""
    if "NBD" in msg and "vd0" not in msg:
        return ["an NBD error that does not name the disk"]
    return []


def sweep_cases(offsets, commit_at):
    return [Case("eof-at-%d" % k, [Send(GREETING), Serve()],
                 [CLOSED + ("NBD client disconnected",)],
                 rc=0 if k >= commit_at else 1, cut_at=k, sweep=True,
                 check=nbd_names_disk)
            for k in sorted(offsets)]


def run_case(case, binary, tag):
    d = os.path.join(W, case.name + tag)
    os.makedirs(d)
    sock = os.path.join(d, "qmp.sock")
    repo = os.path.join(d, "repo")
    qemu = case.qemu()
    hang = max(HANG, case.timeout + 10)
    fake = FakeQMP(sock, case.steps, qemu=qemu, cut_at=case.cut_at,
                   timeout=hang + 5).start()
    env = dict(os.environ,
               ASAN_OPTIONS="detect_leaks=%s:abort_on_error=1"
               % os.environ.get("QBAK_TEST_LEAKS", "0"),
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    t0 = time.monotonic()
    try:
        p = subprocess.run([binary, "backup", "--qmp", sock, "--repo", repo,
                            "--vm", VM, "--timeout", str(case.timeout), "--json",
                            "--mode", "push"],  # the fake speaks push
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=env, timeout=hang)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or b"", e.stderr or b""
    elapsed = time.monotonic() - t0
    fake.wait(10)
    problems = []

    if rc is None:
        problems.append("hung: still running after %d s, killed" % hang)
    elif rc < 0:
        problems.append("killed by signal %d" % -rc)
    elif rc != case.rc:
        problems.append("exit %d, expected %d" % (rc, case.rc))
    if rc is not None and not case.min_s <= elapsed <= case.max_s:
        problems.append("took %.2f s, expected %.1f to %.1f s"
                        % (elapsed, case.min_s, case.max_s))
    try:
        text = err.decode("utf-8")
    except UnicodeDecodeError:
        problems.append("stderr is not valid UTF-8")
        text = err.decode("utf-8", "replace")
    if rc == 1:
        lines = text.split("\n")
        msg = lines[0]
        if len(lines) != 2 or lines[1] != "":
            problems.append("want exactly one stderr line, got %d"
                            % (len(lines) - (lines[-1] == "")))
        if not msg.startswith("qbak backup: "):
            problems.append("stderr does not start with 'qbak backup: '")
        if any(ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0 for ch in msg):
            problems.append("unprintable characters in the error line")
        for w in case.words:
            alts = (w,) if isinstance(w, str) else w
            if not any(a.lower() in msg.lower() for a in alts):
                problems.append("message lacks %s" % " or ".join(map(repr, alts)))
        problems += case.check(msg) if case.check else []
    elif rc == 0 and text:
        problems.append("stderr not empty on success")

    vmdir = os.path.join(repo, VM)
    entries = os.listdir(vmdir) if os.path.isdir(vmdir) else []
    partial = [e for e in entries if e.startswith(".partial-")]
    points = sorted(e for e in entries if not e.startswith("."))
    if partial:
        problems.append(".partial-* left: %s" % partial)
    if rc == 0:
        problems += check_success(case, binary, qemu, out, repo, points, d)
    elif rc is not None:
        if points:
            problems.append("points left in the repository: %s" % points)
        if not case.sweep and os.path.isdir(vmdir):
            listed = qbak_list(binary, repo)
            if listed != []:
                problems.append("qbak list: %s" % listed)
        if case.clean:
            problems += leftovers(qemu, [])
    if fake.errors:
        problems.append("fake QMP: " + "; ".join(fake.errors))
    return {"case": case, "tag": tag, "rc": rc, "stderr": text,
            "elapsed": elapsed, "problems": problems, "dir": d, "fake": fake}


def qbak_list(binary, repo):
    p = subprocess.run([binary, "list", "--repo", repo, "--vm", VM, "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=HANG)
    if p.returncode != 0:
        return "exit %d: %s" % (p.returncode, p.stderr.strip())
    return [x["point"] for x in json.loads(p.stdout)["points"]]


def leftovers(qemu, bitmaps):
    out = []
    if qemu.nodes:
        out.append("nodes left in QEMU: %s" % list(qemu.nodes))
    if qemu.fds:
        out.append("fds left in QEMU's monitor: %s" % list(qemu.fds))
    if qemu.jobs:
        out.append("jobs left in QEMU: %s" % list(qemu.jobs))
    names = [b["name"] for b in qemu.bitmaps if b["name"].startswith("qbak-")]
    if names != bitmaps:
        out.append("bitmaps in QEMU: %s, expected %s" % (names, bitmaps))
    return out


def check_success(case, binary, qemu, out, repo, points, d):
    problems = []
    try:
        res = json.loads(out)
        point, disk = res["point"], res["disks"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return ["no result JSON on stdout: %r" % out[:300]]
    if points != [point]:
        problems.append("repository holds %s, expected [%s]" % (points, point))
    if case.sweep and case.cut_at is not None:
        pass  # QEMU went away after the commit: its state is moot
    else:
        problems += leftovers(qemu, [disk["bitmap"]])
    listed = qbak_list(binary, repo)
    if listed != [point]:
        problems.append("qbak list: %s, expected [%s]" % (listed, point))
    restored = os.path.join(d, "restored.raw")
    p = subprocess.run([binary, "restore", "--repo", repo, "--vm", VM,
                        "--disk", disk["disk"], "--output", restored],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=HANG)
    if p.returncode != 0:
        problems.append("restore: %s" % p.stderr.strip())
    else:
        with open(restored, "rb") as f:
            if f.read() != qemu.image_bytes():
                problems.append("restored disk differs from the fake's disk")
    if QEMU_IMG and not case.sweep:
        q = subprocess.run([QEMU_IMG, "check", os.path.join(
            repo, VM, point, disk["file"])], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        if q.returncode != 0:
            problems.append("qemu-img check: %s" % q.stdout.strip())
    return problems


def report(results, verbose):
    failed = [r for r in results if r["problems"]]
    for r in results:
        if r["problems"] or verbose:
            log("%s %s%s: rc=%s %.2fs stderr=%r" % (
                "FAIL" if r["problems"] else "ok  ", r["case"].name, r["tag"],
                r["rc"], r["elapsed"], r["stderr"][:400]))
            for p in r["problems"]:
                log("       - " + p)
            if r["problems"]:
                log("       dir: %s; fake got: %s" % (r["dir"], r["fake"].names()))
    return failed


def messages(results):
    """How the sweep's failures were worded, with counts."""
    seen = {}
    for r in results:
        key = (r["rc"], r["stderr"].replace(r["dir"], "DIR").strip())
        key = (key[0], "".join("N" if ch.isdigit() else ch for ch in key[1]))
        seen[key] = seen.get(key, 0) + 1
    for (rc, msg), n in sorted(seen.items(), key=lambda x: -x[1]):
        log("  %5d x rc=%s %s" % (n, rc, msg or "(no stderr)"))


def main():
    global W
    if not os.path.exists(QBAK):
        p = subprocess.run(["make", "qbak"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            log("FAIL: make qbak:\n" + p.stdout)
            return 1
    W = workdir("qmp-faults")
    # A private copy: other work may relink ./qbak while 1000 runs go on.
    binaries = [("", os.path.join(W, "qbak"))]
    shutil.copy2(QBAK, binaries[0][1])
    asan = os.environ.get("QBAK_ASAN", os.path.join(ROOT, "build", "asan", "qbak"))
    if ("QBAK_ASAN" not in os.environ and os.path.exists(asan)
            and os.path.getmtime(asan) < os.path.getmtime(QBAK)):
        # built from older sources (make check-asan rebuilds it)
        log("build/asan/qbak is older than %s: not used" % QBAK)
    elif os.path.exists(asan):
        binaries.append(("-asan", os.path.join(W, "qbak-asan")))
        shutil.copy2(asan, binaries[1][1])
    t0 = time.monotonic()
    failed = []
    plans = []
    for tag, binary in binaries:
        base, total, commit_at = session_marks(binary, tag)
        if commit_at is None:
            report([base], True)
            log("FAIL: a normal session against the fake does not complete")
            return 1
        # Every offset of the first 640 bytes (the greeting, the small
        # replies and well into query-named-block-nodes), every message
        # boundary and the bytes around it, the commit point, and a sample
        # of the rest up to the end of the whole backup; fewer under ASan.
        dense, step = (640, 13) if not tag else (64, 61)
        offsets = set(range(0, dense))
        offsets |= set(range(dense, commit_at, step))
        offsets |= set(range(commit_at, total + 1, 3 * step))
        offsets |= {m + d for m in base["fake"].marks for d in (-2, -1, 0, 1)
                    if 0 <= m + d <= total and (not tag or d == 0)}
        offsets |= {commit_at - 1, commit_at}
        plans.append((tag, binary, named_cases(), sweep_cases(offsets, commit_at)))
        log("qbak%s: a session of %d bytes, committed once %d are in; "
            "%d cases, %d EOF offsets" % (tag, total, commit_at,
                                           len(plans[-1][2]), len(plans[-1][3])))
    # Named cases wait on timeouts (many workers, the longest first); the
    # sweep is CPU-bound.
    with ThreadPoolExecutor(24) as ex:
        jobs = [(tag, ex.submit(run_case, c, binary, tag))
                for tag, binary, named, _ in plans
                for c in sorted(named, key=lambda c: -(c.max_s + c.min_s))]
        res_named = [(tag, j.result()) for tag, j in jobs]
    with ThreadPoolExecutor(2 * (os.cpu_count() or 2)) as ex:
        jobs = [(tag, ex.submit(run_case, c, binary, tag))
                for tag, binary, _, sweep in plans for c in sweep]
        res_sweep = [(tag, j.result()) for tag, j in jobs]
    for tag, _, _, _ in plans:
        failed += report([r for t, r in res_named if t == tag], True)
        sweep = [r for t, r in res_sweep if t == tag]
        failed += report(sweep, False)
        log("qbak%s: EOF sweep, %d offsets, outcomes:" % (tag, len(sweep)))
        messages(sweep)
    log("%d failed; %.1f s" % (len(failed), time.monotonic() - t0))
    if failed:
        log("FAIL: %s (work dirs kept under %s)"
            % (", ".join(r["case"].name + r["tag"] for r in failed), W))
        return 1
    shutil.rmtree(W, ignore_errors=True)
    return 0


W = None
if __name__ == "__main__":
    sys.exit(main())

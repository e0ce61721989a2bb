"""The client protocol of CONTRACT.md, exercised the way an external client
would: pyzmq + msgpack against three real raft-zmq processes.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -r tests/python/requirements.txt
    cargo build --release
    RAFT_ZMQ_BIN=target/release/raft-zmq /tmp/venv/bin/python -m pytest -q tests/python

Every socket has a receive timeout and linger 0, every wait has a deadline,
and the node processes are killed in teardown whatever happens.
"""

import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("RAFT_ZMQ_BIN", REPO / "target" / "release" / "raft-zmq")).resolve()
DEADLINE_S = 30
TIMEOUT_MS = 5000
RETRYABLE = {"no_leader", "timeout", "shutting_down"}
ERROR_KEYS = {"ok", "error", "message", "leader"}
WRITES = {"put", "delete", "cas", "propose"}


_handed_out = set()
_rng = random.Random(os.getpid())


def free_port():
    """A port nothing listens on and not handed out before in this run.

    Chosen below the kernel's ephemeral range (32768+), so the source port of
    an outgoing connection cannot take it before the node binds it.
    """
    while True:
        port = _rng.randrange(10_000, 32_000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame):
    return msgpack.unpackb(frame, raw=False)


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.ctx = zmq.Context()
        self.nodes = [
            {"id": i, "raft": f"tcp://127.0.0.1:{free_port()}", "client": f"tcp://127.0.0.1:{free_port()}"}
            for i in range(3)
        ]
        self.config = tmp / "config.json"
        self.config.write_text(json.dumps({"nodes": self.nodes, "election_timeout_ms": [300, 600], "heartbeat_ms": 50}))
        self.procs = []
        self.outputs = []
        self.seq = 0

    def start(self):
        assert BIN.is_file(), f"{BIN} not found: run `cargo build --release` or set RAFT_ZMQ_BIN"
        for node in self.nodes:
            out = open(self.tmp / f"node{node['id']}.out", "wb")
            self.outputs.append(out)
            self.procs.append(
                subprocess.Popen(
                    [str(BIN), "--node-id", str(node["id"]), "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "RUST_LOG": "info"},
                )
            )

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for out in self.outputs:
            out.close()
        self.ctx.destroy(linger=0)

    def socket(self, kind, node_id, timeout_ms=TIMEOUT_MS):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, timeout_ms)
        s.setsockopt(zmq.SNDTIMEO, timeout_ms)
        s.connect(self.nodes[node_id]["client"])
        return s

    def call_raw(self, node_id, frame, timeout_ms=TIMEOUT_MS):
        """One frame out, one reply back, on a fresh REQ socket. None on timeout."""
        s = self.socket(zmq.REQ, node_id, timeout_ms)
        try:
            s.send(frame)
            return unpack(s.recv())
        except zmq.Again:
            return None
        finally:
            s.close()

    def call(self, node_id, request):
        """Retries while the reply says retry (or no reply came) until the
        deadline; returns the first other reply. A write without a session
        gets one, so that a retry after `timeout` applies at most once."""
        if request.get("op") in WRITES and "client_id" not in request:
            self.seq += 1
            request = {**request, "client_id": f"pytest-{os.getpid()}", "seq": self.seq}
        deadline = time.monotonic() + DEADLINE_S
        while True:
            reply = self.call_raw(node_id, pack(request))
            if reply is not None and (reply["ok"] or reply["error"] not in RETRYABLE):
                return reply
            assert time.monotonic() < deadline, f"no definitive reply to {request} from node {node_id}: {reply}"
            time.sleep(0.05)

    def ok(self, node_id, request):
        reply = self.call(node_id, request)
        assert reply["ok"] is True, f"{request} -> {reply}"
        return reply

    def status(self, node_id):
        return self.call_raw(node_id, pack({"op": "status"}), timeout_ms=500)

    def wait_for_leader(self, agreeing=2):
        deadline = time.monotonic() + DEADLINE_S
        while True:
            for proc in self.procs:
                assert proc.poll() is None, f"a node exited with {proc.returncode}; see {self.tmp}"
            statuses = [s for s in (self.status(i) for i in range(3)) if s and s.get("ok")]
            leaders = [s for s in statuses if s["role"] == "leader"]
            if leaders:
                leader = leaders[0]
                agree = [s for s in statuses if s["leader"] == leader["id"] and s["term"] == leader["term"]]
                if len(agree) >= agreeing:
                    return leader["id"]
            assert time.monotonic() < deadline, "no leader within the deadline"
            time.sleep(0.05)

    def followers(self):
        leader = self.wait_for_leader()
        return [i for i in range(3) if i != leader]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("raft-zmq"))
    try:
        c.start()
        # Every node, not just a majority: the first tests write through a
        # follower, which must know the leader (and hear from it) already.
        c.wait_for_leader(agreeing=3)
        yield c
    finally:
        c.stop()


def assert_error(reply, code):
    assert reply is not None, "no reply"
    assert set(reply) == ERROR_KEYS, reply
    assert reply["ok"] is False
    assert reply["error"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"].strip(), reply
    assert reply["leader"] is None or (isinstance(reply["leader"], int) and reply["leader"] >= 0), reply


def test_contract_example(cluster):
    # As in CONTRACT.md, minus the fixed port, plus a timeout.
    s = cluster.ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    s.connect(cluster.nodes[1]["client"])
    try:
        s.send(msgpack.packb({"op": "put", "key": "a", "value": "1"}))
        reply = msgpack.unpackb(s.recv())
    finally:
        s.close()
    assert reply["ok"] is True, reply
    assert isinstance(reply["index"], int) and not isinstance(reply["index"], bool)
    assert reply["index"] > 0


def test_follower_forwards_writes_and_reads(cluster):
    f1, f2 = cluster.followers()
    put = cluster.ok(f1, {"op": "put", "key": "fwd", "value": "via-follower"})
    assert put["index"] > 0
    assert cluster.ok(f2, {"op": "get", "key": "fwd"})["value"] == "via-follower"
    assert cluster.ok(f1, {"op": "get", "key": "fwd"})["value"] == "via-follower"


def test_absent_key_reads_nil(cluster):
    reply = cluster.ok(0, {"op": "get", "key": "never-written"})
    assert "value" in reply and reply["value"] is None


def test_str_stays_str_and_bin_stays_bin(cluster):
    cluster.ok(0, {"op": "put", "key": "s", "value": "text"})
    cluster.ok(1, {"op": "put", "key": b"\x00bin-key", "value": b"\x00\xff\x80raw"})
    s = cluster.ok(2, {"op": "get", "key": "s"})["value"]
    b = cluster.ok(2, {"op": "get", "key": b"\x00bin-key"})["value"]
    assert s == "text" and isinstance(s, str)
    assert b == b"\x00\xff\x80raw" and isinstance(b, bytes)
    # A bin value under a str key.
    cluster.ok(0, {"op": "put", "key": "sb", "value": b"bytes"})
    assert cluster.ok(1, {"op": "get", "key": "sb"})["value"] == b"bytes"


def test_delete_reports_whether_the_key_existed(cluster):
    cluster.ok(0, {"op": "put", "key": "del", "value": "x"})
    first = cluster.ok(1, {"op": "delete", "key": "del"})
    assert first["existed"] is True and isinstance(first["index"], int)
    second = cluster.ok(2, {"op": "delete", "key": "del"})
    assert second["existed"] is False and second["index"] > first["index"]
    assert cluster.ok(0, {"op": "get", "key": "del"})["value"] is None


def test_cas_swaps_or_returns_the_current_value(cluster):
    absent = cluster.ok(0, {"op": "cas", "key": "cas", "expect": None, "value": "1"})
    assert absent["swapped"] is True and isinstance(absent["index"], int)
    swapped = cluster.ok(1, {"op": "cas", "key": "cas", "expect": "1", "value": "2"})
    assert swapped["swapped"] is True
    stale = cluster.ok(2, {"op": "cas", "key": "cas", "expect": "1", "value": "3"})
    assert stale["swapped"] is False and stale["value"] == "2"
    must_be_absent = cluster.ok(0, {"op": "cas", "key": "cas", "expect": None, "value": "4"})
    assert must_be_absent["swapped"] is False and must_be_absent["value"] == "2"
    assert cluster.ok(1, {"op": "get", "key": "cas"})["value"] == "2"


def test_propose_returns_an_index_and_lands_in_the_log(cluster):
    reply = cluster.ok(1, {"op": "propose", "command": "opaque-python-command"})
    index = reply["index"]
    assert isinstance(index, int) and index > 0
    entries = cluster.ok(0, {"op": "log", "from": index, "limit": 1})["entries"]
    # Committed by the time propose was acknowledged; node 0 may be a
    # follower that has not applied it yet, so ask the leader as well.
    leader = cluster.wait_for_leader()
    entries = entries or cluster.ok(leader, {"op": "log", "from": index, "limit": 1})["entries"]
    assert entries and entries[0]["index"] == index
    assert "opaque-python-command" in entries[0]["command"]


def test_status_fields_and_types(cluster):
    leader = cluster.wait_for_leader()
    for node_id in range(3):
        st = cluster.ok(node_id, {"op": "status"})
        for field in ("id", "term", "commit_index", "last_applied", "last_log_index"):
            assert isinstance(st[field], int) and not isinstance(st[field], bool) and st[field] >= 0, (field, st)
        assert st["id"] == node_id
        assert st["role"] in ("leader", "follower", "candidate")
        assert st["leader"] is None or isinstance(st["leader"], int)
        assert st["last_applied"] <= st["commit_index"] <= st["last_log_index"], st
        assert sorted(st["members"]) == [0, 1, 2]
        assert st["learners"] == [] and st["alarms"] == []
        assert st["first_log_index"] >= 1 and st["snapshot_index"] < st["first_log_index"], st
    assert cluster.ok(leader, {"op": "status"})["role"] == "leader"


def test_log_returns_committed_entries(cluster):
    cluster.ok(0, {"op": "put", "key": "log-me", "value": "v"})
    leader = cluster.wait_for_leader()
    entries = cluster.ok(leader, {"op": "log"})["entries"]
    assert entries, "the log holds at least the leader's no-op and our put"
    assert entries[0]["index"] == 1
    for prev, entry in zip(entries, entries[1:]):
        assert entry["index"] == prev["index"] + 1
        assert entry["term"] >= prev["term"]
    for entry in entries:
        assert set(entry) == {"index", "term", "command"}, entry
        assert isinstance(entry["index"], int) and isinstance(entry["term"], int)
        assert isinstance(entry["command"], str)
    limited = cluster.ok(leader, {"op": "log", "from": 2, "limit": 1})["entries"]
    assert [e["index"] for e in limited] == [2]


def test_retry_with_the_same_client_id_and_seq_gets_the_first_result(cluster):
    first = cluster.ok(0, {"op": "put", "key": "once", "value": "first", "client_id": "py-client", "seq": 1})
    retry = cluster.ok(1, {"op": "put", "key": "once", "value": "second", "client_id": "py-client", "seq": 1})
    assert retry["index"] == first["index"]
    assert cluster.ok(2, {"op": "get", "key": "once"})["value"] == "first"
    nxt = cluster.ok(2, {"op": "put", "key": "once", "value": "third", "client_id": "py-client", "seq": 2})
    assert nxt["index"] > first["index"]


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1 garbage, not msgpack",
        pack(["op", "put"]),
        pack({1: "put"}),
        pack({"op": "frobnicate"}),
        pack({"key": "a"}),
        pack({"op": "put", "value": "1"}),
        pack({"op": "put", "key": "a", "value": 5}),
        pack({"op": "put", "key": "a", "value": "1", "client_id": "c", "seq": -1}),
        pack({"op": "put", "key": "a", "value": "1", "client_id": "c"}),
    ],
    ids=["garbage", "array", "int-key", "unknown-op", "no-op", "no-key", "int-value", "negative-seq", "no-seq"],
)
def test_bad_request(cluster, frame):
    for node_id in range(3):
        assert_error(cluster.call_raw(node_id, frame), "bad_request")


def test_dealer_with_empty_delimiter(cluster):
    s = cluster.socket(zmq.DEALER, 2)
    try:
        s.send_multipart([b"", pack({"op": "status"})])
        delimiter, frame = s.recv_multipart()
        assert delimiter == b""
        status = unpack(frame)
        assert status["ok"] is True and status["id"] == 2
        deadline = time.monotonic() + DEADLINE_S
        while True:
            s.send_multipart([b"", pack({"op": "put", "key": "dealer", "value": "d"})])
            delimiter, frame = s.recv_multipart()
            reply = unpack(frame)
            if reply["ok"] or reply["error"] not in RETRYABLE:
                break
            assert time.monotonic() < deadline, reply
            time.sleep(0.05)
        assert delimiter == b"" and reply["ok"] is True and reply["index"] > 0, reply
    finally:
        s.close()
    assert cluster.ok(0, {"op": "get", "key": "dealer"})["value"] == "d"

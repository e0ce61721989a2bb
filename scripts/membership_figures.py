#!/usr/bin/env python3
"""The figures issue #9 asks for, measured on local clusters of BINARY
(default target/release/raft-zmq) on free ports in a temp dir:

    .venv/bin/python scripts/membership_figures.py transfer [ROUNDS] [BINARY]
    .venv/bin/python scripts/membership_figures.py remove-leader [ROUNDS] [BINARY]
    .venv/bin/python scripts/membership_figures.py add-node [KEYS] [BINARY]

transfer: 3 nodes, one client writing without pause (retrying at once on any
error); ROUNDS times (default 20) the leader is asked to hand over with
`transfer_leader`. The gap is the longest time between two acknowledged
writes from just before the request to just after the new leader answered.

remove-leader: the same writer; ROUNDS times a new node joins (`--join`,
`add_node`) and, once it is a voter, the leader is removed (`remove_node`):
it hands over, then leaves. Gaps as above. At the end every acknowledged
write is read back: acknowledged writes lost must be 0.

add-node: 3 nodes holding KEYS keys (default 100,000) of 1 KiB; a fourth
joins; prints the time from `add_node` until it is a voter (it catches up
by snapshot, the log having been compacted).

Prints p50 and max in ms. Needs pyzmq and msgpack (tests/python/requirements.txt).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import zmq


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(ctx, endpoint, request, timeout_ms=2000):
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.connect(endpoint)
    try:
        s.send(msgpack.packb(request))
        return msgpack.unpackb(s.recv())
    except zmq.Again:
        return {"ok": False, "error": "no reply"}
    finally:
        s.close()


class Cluster:
    def __init__(self, binary, d, n):
        self.binary, self.d = binary, d
        self.ctx = zmq.Context()
        self.nodes = {}
        self.procs = {}
        for i in range(n):
            self.nodes[i] = self.new_node(i)
        self.write_config("config.json", list(self.nodes))
        for i in range(n):
            self.start(i, "config.json")

    @staticmethod
    def new_node(i):
        return {"id": i, "raft": f"tcp://127.0.0.1:{free_port()}", "client": f"tcp://127.0.0.1:{free_port()}"}

    def write_config(self, name, ids):
        with open(os.path.join(self.d, name), "w") as f:
            json.dump({"nodes": [self.nodes[i] for i in ids]}, f)

    def start(self, i, config, *args):
        self.procs[i] = subprocess.Popen(
            [self.binary, "--node-id", str(i), "--config", os.path.join(self.d, config), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def live(self):
        return [i for i, p in self.procs.items() if p.poll() is None]

    def leader(self):
        while True:
            for i in self.live():
                reply = call(self.ctx, self.nodes[i]["client"], {"op": "status"}, 500)
                if reply.get("role") == "leader":
                    return reply["id"]
            time.sleep(0.05)

    def join(self, i):
        """Starts node i with --join and adds it; returns when add_node was answered."""
        self.nodes[i] = self.new_node(i)
        members = self.live()
        self.write_config(f"join-{i}.json", members + [i])
        self.start(i, f"join-{i}.json", "--join")
        while True:
            leader = self.leader()
            n = self.nodes[i]
            reply = call(self.ctx, self.nodes[leader]["client"],
                         {"op": "add_node", "id": i, "raft": n["raft"], "client": n["client"]}, 10_000)
            if reply.get("ok"):
                return
            time.sleep(0.1)

    def wait_voter(self, i):
        while True:
            reply = call(self.ctx, self.nodes[i]["client"], {"op": "status"}, 1000)
            if i in reply.get("members", []):
                return
            time.sleep(0.01)

    def kill_all(self):
        for p in self.procs.values():
            p.kill()
            p.wait()


class Writer:
    """One client writing unique keys without pause; remembers every ack."""

    def __init__(self, cluster):
        self.cluster, self.acks, self.acked = cluster, [], {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        i = 0
        while not self.stop.is_set():
            i += 1
            live = self.cluster.live()
            node = self.cluster.nodes[live[i % len(live)]]
            reply = call(self.cluster.ctx, node["client"], {"op": "put", "key": f"k{i}", "value": str(i)}, 1000)
            if reply.get("ok"):
                self.acks.append(time.monotonic())
                self.acked[f"k{i}"] = str(i)

    def gap_ms(self, before, after):
        window = [t for t in self.acks if before - 0.05 <= t <= after + 0.3]
        return max(b - a for a, b in zip(window, window[1:])) * 1000 if len(window) > 1 else float("inf")

    def finish(self):
        self.stop.set()
        self.thread.join()


def report(what, gaps, writer):
    gaps.sort()
    print(f"{len(gaps)} {what}: write gap p50 {gaps[len(gaps) // 2]:.1f} ms, max {gaps[-1]:.1f} ms "
          f"({len(writer.acks)} writes acknowledged)")


def transfer(cluster, rounds):
    cluster.leader()
    writer = Writer(cluster)
    gaps = []
    for _ in range(rounds):
        time.sleep(0.5)
        current = cluster.leader()
        before = time.monotonic()
        reply = call(cluster.ctx, cluster.nodes[current]["client"], {"op": "transfer_leader"}, 5000)
        after = time.monotonic()
        assert reply.get("ok"), reply
        time.sleep(0.3)
        gaps.append(writer.gap_ms(before, after))
    writer.finish()
    report("transfers", gaps, writer)


def remove_leader(cluster, rounds):
    cluster.leader()
    writer = Writer(cluster)
    gaps = []
    for r in range(rounds):
        new = 3 + r
        cluster.join(new)
        cluster.wait_voter(new)
        time.sleep(0.3)
        current = cluster.leader()
        before = time.monotonic()
        reply = call(cluster.ctx, cluster.nodes[current]["client"], {"op": "remove_node", "id": current}, 10_000)
        assert reply.get("ok"), reply
        # Answered once the removal is committed; the gap ends when another leads.
        while cluster.leader() == current:
            time.sleep(0.005)
        after = time.monotonic()
        time.sleep(0.3)
        gaps.append(writer.gap_ms(before, after))
        cluster.procs[current].wait(timeout=30)
    writer.finish()
    report("leader removals", gaps, writer)
    leader = cluster.nodes[cluster.leader()]["client"]
    lost = [k for k, v in writer.acked.items() if call(cluster.ctx, leader, {"op": "get", "key": k}).get("value") != v]
    print(f"acknowledged writes lost: {len(lost)} of {len(writer.acked)}")


def add_node(cluster, keys):
    leader = cluster.nodes[cluster.leader()]["client"]
    s = cluster.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(leader)
    value = "v" * 1024
    in_flight, sent, done = 0, 0, 0
    started = time.monotonic()
    while done < keys:
        while in_flight < 256 and sent < keys:
            s.send_multipart([b"", msgpack.packb({"op": "put", "key": f"key-{sent}", "value": value})])
            sent, in_flight = sent + 1, in_flight + 1
        _, frame = s.recv_multipart()
        reply = msgpack.unpackb(frame)
        in_flight -= 1
        if reply.get("ok"):
            done += 1
        else:  # busy: one more write in its place
            s.send_multipart([b"", msgpack.packb({"op": "put", "key": f"retry-{done}", "value": value})])
            in_flight += 1
    s.close()
    print(f"loaded {keys} keys of 1 KiB in {time.monotonic() - started:.1f} s")
    time.sleep(1)
    before = time.monotonic()
    cluster.join(3)
    cluster.wait_voter(3)
    print(f"node 3: add_node to voter in {(time.monotonic() - before) * 1000:.0f} ms "
          f"(cluster holding {keys} keys of 1 KiB)")


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "transfer"
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else (100_000 if mode == "add-node" else 20)
    binary = os.path.realpath(sys.argv[3] if len(sys.argv) > 3 else "target/release/raft-zmq")
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(binary, d, 3)
        try:
            {"transfer": transfer, "remove-leader": remove_leader, "add-node": add_node}[mode](cluster, arg)
        finally:
            cluster.kill_all()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Resource bounds under hostile load (issue #7), measured on a fresh local
3-node cluster of the release binary:

  a) 300 clients pipelining puts (each keeps WINDOW requests in flight);
  b) after 100 values of 512 KiB were written, 8 clients hammering `log`
     while one client keeps writing.

For each it prints every node's peak RSS (VmHWM), the leader changes seen,
the replies by code, and the slowest acknowledged write. Run it with the
test virtualenv:  .venv/bin/python scripts/stress.py [--seconds 20]
It exits 1 if a bound is broken: a node above 1 GiB, a leader change, or an
acknowledged write slower than 2 s.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import msgpack
import zmq

BIN = os.environ.get("RAFT_ZMQ_BIN", os.path.join(os.path.dirname(__file__), "..", "target", "release", "raft-zmq"))
RSS_LIMIT_KB = 1 << 20
STALL_LIMIT_S = 2.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, n=3):
        self.dir = tempfile.mkdtemp(prefix="raft-zmq-stress-")
        self.nodes = [
            {"id": i, "raft": f"tcp://127.0.0.1:{free_port()}", "client": f"tcp://127.0.0.1:{free_port()}"}
            for i in range(n)
        ]
        self.config = os.path.join(self.dir, "config.json")
        with open(self.config, "w") as f:
            json.dump({"nodes": self.nodes}, f)
        self.procs = [
            subprocess.Popen(
                [BIN, "--node-id", str(i), "--config", self.config],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.dir, f"node{i}.out"), "w"),
            )
            for i in range(n)
        ]
        self.ctx = zmq.Context()

    def call(self, i, request, timeout_ms=2000):
        s = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, timeout_ms)
        s.connect(self.nodes[i]["client"])
        try:
            s.send(msgpack.packb(request))
            return msgpack.unpackb(s.recv())
        except zmq.Again:
            return None
        finally:
            s.close()

    def leader(self, deadline_s=30):
        end = time.time() + deadline_s
        while time.time() < end:
            for i in range(len(self.nodes)):
                st = self.call(i, {"op": "status"}, 300)
                if st and st.get("ok") and st["role"] == "leader":
                    return i
            time.sleep(0.05)
        raise SystemExit("no leader")

    def peak_rss_kb(self):
        peaks = []
        for p in self.procs:
            with open(f"/proc/{p.pid}/status") as f:
                peaks.append(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")))
        return peaks

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class LeaderWatch(threading.Thread):
    """Polls every node's status; records each (term, leader) it sees."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.seen, self.stop = cluster, set(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            for i in range(len(self.cluster.nodes)):
                st = self.cluster.call(i, {"op": "status"}, 500)
                if st and st.get("ok") and st["leader"] is not None:
                    self.seen.add((st["term"], st["leader"]))
            time.sleep(0.1)


def pipelined_puts(cluster, endpoints, clients, window, seconds, value):
    """Each client keeps `window` puts in flight; returns (codes, slowest ok)."""
    ctx, poller, sockets = cluster.ctx, zmq.Poller(), []
    for c in range(clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoints[c % len(endpoints)])
        poller.register(s, zmq.POLLIN)
        sockets.append(s)
    sent, codes, slowest, seq = {}, Counter(), 0.0, 0

    def send(s):
        nonlocal seq
        seq += 1
        key = f"p{seq % 1000}"
        s.send_multipart([b"", msgpack.packb({"op": "put", "key": key, "value": value})])
        sent.setdefault(s, []).append(time.time())

    for s in sockets:
        for _ in range(window):
            send(s)
    end = time.time() + seconds
    while time.time() < end:
        for s, _ in poller.poll(100):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                started = sent[s].pop(0)
                reply = msgpack.unpackb(frames[-1])
                code = "ok" if reply.get("ok") else reply["error"]
                codes[code] += 1
                if code == "ok":
                    slowest = max(slowest, time.time() - started)
                send(s)
    for s in sockets:
        s.close()
    return codes, slowest


def log_hammer(cluster, endpoint, clients, seconds):
    stop, counts = time.time() + seconds, Counter()

    def hammer():
        s = cluster.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10000)
        s.connect(endpoint)
        while time.time() < stop:
            s.send(msgpack.packb({"op": "log", "from": 1, "limit": 1000}))
            try:
                reply = msgpack.unpackb(s.recv())
            except zmq.Again:
                counts["no reply"] += 1
                break
            counts["ok" if reply.get("ok") else reply["error"]] += 1
        s.close()

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads, counts


def report(name, cluster, watch, codes, slowest):
    peaks = cluster.peak_rss_kb()
    changes = len(watch.seen) - 1
    print(f"{name}:")
    print(f"  peak RSS per node: {', '.join(f'{kb / 1024:.0f} MiB' for kb in peaks)}")
    print(f"  leaders seen (term, id): {sorted(watch.seen)}")
    print(f"  replies: {dict(codes)}")
    print(f"  slowest acknowledged write: {slowest * 1000:.0f} ms")
    return max(peaks) <= RSS_LIMIT_KB and changes == 0 and slowest <= STALL_LIMIT_S


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    ok = True

    cluster = Cluster()
    try:
        leader = cluster.leader()
        watch = LeaderWatch(cluster)
        watch.start()
        endpoints = [n["client"] for n in cluster.nodes]
        codes, slowest = pipelined_puts(cluster, endpoints, args.clients, args.window, args.seconds, "x" * 64)
        watch.stop.set()
        watch.join()
        ok &= report(f"a) {args.clients} clients x {args.window} pipelined puts, {args.seconds:.0f} s", cluster, watch, codes, slowest)
    finally:
        cluster.stop()

    cluster = Cluster()
    try:
        leader = cluster.leader()
        big = b"\xab" * (512 * 1024)
        for i in range(100):
            reply = cluster.call(leader, {"op": "put", "key": f"big-{i}", "value": big}, 10000)
            assert reply and reply.get("ok"), reply
        watch = LeaderWatch(cluster)
        watch.start()
        threads, log_counts = log_hammer(cluster, cluster.nodes[leader]["client"], 8, args.seconds)
        codes, slowest = pipelined_puts(cluster, [cluster.nodes[leader]["client"]], 1, 1, args.seconds, "y" * 64)
        for t in threads:
            t.join()
        watch.stop.set()
        watch.join()
        ok &= report(f"b) 8 clients reading log after 100 x 512 KiB, {args.seconds:.0f} s", cluster, watch, codes, slowest)
        print(f"  log replies: {dict(log_counts)}")
    finally:
        cluster.stop()

    print("PASS" if ok else "FAIL: a bound was broken")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

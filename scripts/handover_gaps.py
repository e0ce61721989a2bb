#!/usr/bin/env python3
"""Write unavailability on a leadership change asked for (issue #9).

Runs a local 3-node cluster of BINARY (default target/release/raft-zmq) on
free ports in a temp dir, keeps one client writing (retrying at once on any
error), and asks the leader to hand over with `transfer_leader`, ROUNDS
times (default 20). For each, the gap is the longest time between two
acknowledged writes from just before the request to just after the new
leader answered. Prints p50 and max in ms.

    .venv/bin/python scripts/handover_gaps.py [ROUNDS] [BINARY]

Needs pyzmq and msgpack (tests/python/requirements.txt).
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


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    binary = os.path.realpath(sys.argv[2] if len(sys.argv) > 2 else "target/release/raft-zmq")
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as d:
        nodes = [
            {"id": i, "raft": f"tcp://127.0.0.1:{free_port()}", "client": f"tcp://127.0.0.1:{free_port()}"}
            for i in range(3)
        ]
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"nodes": nodes}, f)
        procs = [
            subprocess.Popen(
                [binary, "--node-id", str(n["id"]), "--config", os.path.join(d, "config.json")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n in nodes
        ]
        try:
            def leader():
                while True:
                    for n in nodes:
                        reply = call(ctx, n["client"], {"op": "status"}, 500)
                        if reply.get("role") == "leader":
                            return reply["id"]
                    time.sleep(0.05)

            leader()
            acks = []
            stop = threading.Event()

            def writer():
                i = 0
                while not stop.is_set():
                    i += 1
                    reply = call(ctx, nodes[i % 3]["client"], {"op": "put", "key": "k", "value": str(i)}, 1000)
                    if reply.get("ok"):
                        acks.append(time.monotonic())

            thread = threading.Thread(target=writer)
            thread.start()
            gaps = []
            for _ in range(rounds):
                time.sleep(0.5)
                current = leader()
                before = time.monotonic()
                reply = call(ctx, nodes[current]["client"], {"op": "transfer_leader"}, 5000)
                after = time.monotonic()
                assert reply.get("ok"), reply
                time.sleep(0.3)
                window = [t for t in acks if before - 0.05 <= t <= after + 0.3]
                gaps.append(max(b - a for a, b in zip(window, window[1:])) * 1000 if len(window) > 1 else float("inf"))
            stop.set()
            thread.join()
            gaps.sort()
            print(
                f"{rounds} transfers: write gap p50 {gaps[len(gaps) // 2]:.1f} ms, max {gaps[-1]:.1f} ms "
                f"({len(acks)} writes acknowledged)"
            )
        finally:
            for p in procs:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()

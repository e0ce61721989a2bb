#!/usr/bin/env bash
# Runs every test: the core's unit and scenario tests, the shell's unit
# tests, the integration tests that start real raft-zmq processes on
# 127.0.0.1, and the Python (pyzmq + msgpack) client tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/need-libzmq.sh
# The `ci` profile: optimised, with debug assertions and overflow checks.
# Integration tests run whole clusters; three at a time suits a 2-core box.
cargo test --profile ci -- --test-threads=3

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
RAFT_ZMQ_BIN="$PWD/target/ci/raft-zmq" .venv/bin/python -m pytest -q tests/python

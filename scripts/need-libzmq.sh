#!/usr/bin/env bash
# The build links the system libzmq (.cargo/config.toml explains why):
# Debian's libzmq3-dev, which is built with libsodium and so has CURVE.
# Installs it when it is missing and we are root; otherwise says how to.
set -euo pipefail

if ! command -v dpkg-query >/dev/null; then
  # Not Debian: nothing to check here; the build and the
  # `libzmq_supports_curve` test say what is missing.
  exit 0
fi
if dpkg-query -W -f='${Status}' libzmq3-dev 2>/dev/null | grep -q "ok installed"; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "libzmq3-dev is not installed; run: sudo apt-get install --no-install-recommends libzmq3-dev" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libzmq3-dev

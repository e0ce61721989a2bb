#!/usr/bin/env bash
# Fuzzes for as long as you like (not part of the test suite, which replays
# the corpus only): scripts/fuzz.sh [SECONDS per target, default 60] [TARGET...]
# Targets: client_request peer_frame core_sequence http_request_head snapshot_file (tests/fuzz_targets/mod.rs).
# New inputs go to fuzz/work/<target>/; crashes to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
# cargo-fuzz passes nightly-only flags; the stable toolchain takes them with this.
export RUSTC_BOOTSTRAP=1

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(client_request peer_frame core_sequence http_request_head snapshot_file)
for target in "${targets[@]}"; do
  mkdir -p "fuzz/work/$target"
  # Optimised, with debug assertions and overflow checks (cargo-fuzz's default).
  # The first corpus dir receives new inputs; the checked-in seeds are read only.
  cargo fuzz run --sanitizer none "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1
done

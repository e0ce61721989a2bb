#!/usr/bin/env bash
# Mutation testing, on demand (not part of CI; a full run takes hours on two
# cores). cargo-mutants changes the Raft core (src/raft, its Ready driver
# included) and the node's server (src/node/server: every decision about
# client requests, without I/O) one small edit at a time, and runs the fast
# suites against each mutant: the unit tests and the deterministic simulation,
# which drives that server. A mutant that no test catches ("missed") is a gap
# to close. The rest of src/node (threads and sockets) is left out: only the
# real-process tests reach it, minutes a mutant.
#
#   scripts/mutants.sh                          # everything (~640 mutants)
#   scripts/mutants.sh -f src/raft/progress.rs  # only the mutants of one file
#   scripts/mutants.sh --list                   # what it would try
#
# Results go to mutants.out/ (missed.txt, caught.txt, timeout.txt).
#
# The `mutants` profile is the CI profile built incrementally: a mutant
# rebuilds in about 10 s instead of 80 s, and the tests run about a quarter
# slower. The simulation runs fresh random seeds for SIM_SOAK_SECS (10 by
# default) instead of its fixed 20,000, as most mutants fail in far less.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-mutants >/dev/null || cargo install cargo-mutants
export SIM_SOAK_SECS="${SIM_SOAK_SECS:-10}"
files=(-f 'src/raft/*.rs' -f 'src/raft/engine/*.rs' -f 'src/node/server/*.rs')
for arg in "$@"; do
  # Files named on the command line replace the default set.
  if [ "$arg" = -f ] || [ "$arg" = --file ]; then files=(); fi
done
# `-C` limits the builds too, not only the test runs: building every
# integration test for each mutant took minutes.
exec cargo mutants "${files[@]}" -e src/raft/tests.rs -e src/node/server/tests.rs --profile mutants \
  -C --lib -C --test=simulation "$@"

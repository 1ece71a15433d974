#!/usr/bin/env bash
# The cluster simulator (release build): N nodes (default 2,000) of ipamd's
# production pool and reconciler on one simulated EC2 account, every pool
# policy in one run. Arguments go to cluster-sim (--nodes, --seed, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p vpc-cni-e2e --bin cluster-sim
exec "${CARGO_TARGET_DIR:-target}"/release/cluster-sim "$@"

#!/usr/bin/env bash
# vpc-cni ADD/DEL against Debian's ptp + host-local in the same run (root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked --workspace --bins
exec ./target/release/cni-bench "$@"

#!/usr/bin/env bash
# vpc-cni ADD/DEL against Debian's ptp + host-local in the same run (root).
# The plugin measured is the shipped build (scripts/build-cni.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked --workspace --bins
# After the workspace build, which would relink vpc-cni dynamically.
./scripts/build-cni.sh
exec "${CARGO_TARGET_DIR:-target}"/release/cni-bench "$@"

#!/usr/bin/env bash
# Benchmarks ipamd (release build): AddNetwork/DelNetwork p50/p99 at 1 and 64
# clients against the gRPC health check on the same socket, and RSS with 250
# assignments. Journal on tmpfs (/dev/shm) as on a node.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p ipamd --bins
exec "${CARGO_TARGET_DIR:-target}"/release/ipamd-bench "$@"

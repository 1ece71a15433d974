#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root: the network tests build
# namespaces): install what is missing, formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo build --locked --workspace --bins
cargo test --locked --workspace

#!/usr/bin/env bash
# ipamd's RSS with its Kubernetes watches (release build): a 250-pod node
# while the in-process fake API server holds 0, 5,000 and 50,000 pods on
# other nodes, next to ipamd without Kubernetes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p ipamd --bins
cargo build --release --locked -p vpc-cni-e2e --bin kube-bench
exec "${CARGO_TARGET_DIR:-target}"/release/kube-bench --ipamd "${CARGO_TARGET_DIR:-target}/release/ipamd" "$@"

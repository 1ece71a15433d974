#!/usr/bin/env bash
# The main job (run as root): a simulated VPC in network namespaces, two
# nodes each running ipamd on the sim provider, pods on both wired by the
# vpc-cni plugin; shows them talking (pod to pod without NAT on one node and
# across nodes, node to pod, pod to the internet SNATed to the node), then
# removes everything it created. Nothing touches the root namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --workspace --bins
exec "${CARGO_TARGET_DIR:-target}"/debug/vpc-lab

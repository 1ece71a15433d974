#!/usr/bin/env bash
# ARM writes per 100 pods scheduled to an Azure node (release build): ipamd's
# pool on the Azure provider against the fake ARM and IMDS, Azure CNS's
# batches against the warm-IP targets in one run. Arguments go to arm-writes
# (--pods, --arrival-ms, --operation-ms).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p vpc-cni-e2e --bin arm-writes
exec "${CARGO_TARGET_DIR:-target}"/release/arm-writes "$@"

#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root: the network tests build
# namespaces): install what is missing, start LocalStack (EC2, on the host,
# no Docker), formatting, lints, every test; LocalStack is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./localstack/start.sh
trap './localstack/stop.sh' EXIT
cargo fmt --all --check
# The alert rules shipped with the chart, unit-tested by promtool (the
# /metrics exposition itself goes through promtool in ipamd's metrics test).
(cd charts/vpc-cni && ../../.tools/bin/promtool check rules files/prometheus-rules.yaml &&
  ../../.tools/bin/promtool test rules tests/prometheus-rules.test.yaml)
# The Helm chart: lint, four value sets rendered and validated, ENIConfigs
# against the CRD, the values schema.
./scripts/check-chart.sh
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo build --locked --workspace --bins
cargo test --locked --workspace
# The plugin as shipped (static release build): the network tests again.
./scripts/build-cni.sh
VPC_CNI_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vpc-cni" cargo test --locked -p vpc-cni-e2e \
  --test e2e --test chain --test podman --test commands

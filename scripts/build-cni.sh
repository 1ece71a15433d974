#!/usr/bin/env bash
# The vpc-cni plugin as shipped: release build, linked statically.
#
# The container runtime execs the plugin for every pod, and the plugin is
# copied onto the node, whose glibc may not be the one it was built against.
# A static, non-PIE binary needs no dynamic loader and no relocation at
# start: on the 2-vCPU test VM it starts (VERSION) in ~0.6 ms instead of
# ~1.2 ms dynamically linked, or ~0.65 ms as a static PIE. Non-PIE like the
# reference plugins (Debian's and upstream's Go binaries): the binary itself
# is not address-randomised; its heap, stack and mappings still are.
# Only this binary: ipamd stays dynamically linked (it resolves AWS endpoint
# names through glibc's NSS, which static glibc does not support well).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo rustc --locked --release -p vpc-cni --bin vpc-cni -- \
  -C target-feature=+crt-static -C relocation-model=static
bin="${CARGO_TARGET_DIR:-target}/release/vpc-cni"
[ -x "$bin" ] || { echo "$bin was not built" >&2; exit 1; }
# ldd fails on a static binary ("not a dynamic executable").
if ldd "$bin" >/dev/null 2>&1; then
  echo "$bin is dynamically linked; expected a static binary" >&2
  exit 1
fi
echo "built $bin (statically linked)"

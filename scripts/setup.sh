#!/usr/bin/env bash
# Installs what the tests and the main job need beyond the Rust toolchain,
# from Debian's packages. Idempotent: installs only what is missing.
#   iproute2                    ip, for the network-namespace tests
#   nftables                    nft, the node's SNAT rules
#   containernetworking-plugins ptp/host-local (the benchmark's peer), portmap
#                               and bandwidth (chained after vpc-cni)
#   podman, runc                a real container runtime calling the plugin
#   iptables                    what Debian's portmap programs (in the node namespace)
#   busybox-static              the container image's rootfs
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
[ -x /usr/lib/cni/portmap ] || need+=(containernetworking-plugins)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
[ -x /bin/busybox ] || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${need[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

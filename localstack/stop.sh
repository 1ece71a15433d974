#!/usr/bin/env bash
# Stops the LocalStack that start.sh started.
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/.pid" ]; then
  pid=$(cat "$here/.pid")
  # Only a LocalStack we started: the pid may have been reused since.
  if grep -q "localstack.runtime.main" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$here/.pid"
fi
# The state directory start.sh made (never one given as LOCALSTACK_STATE).
if [ -f "$here/.state" ]; then
  state=$(cat "$here/.state")
  case "$state" in
    /tmp/localstack.*) rm -rf "$state" ;;
  esac
  rm -f "$here/.state"
fi

#!/usr/bin/env bash
# Stops the LocalStack that start.sh started.
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/.pid" ]; then
  pid=$(cat "$here/.pid")
  # Only a LocalStack we started: the pid may have been reused since.
  if grep -q "localstack.runtime.main" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$here/.pid"
fi

#!/usr/bin/env bash
# Stops the LocalStack that start.sh started.
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/.pid" ]; then
  kill "$(cat "$here/.pid")" 2>/dev/null || true
  rm -f "$here/.pid"
fi

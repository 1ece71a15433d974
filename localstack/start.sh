#!/usr/bin/env bash
# Starts LocalStack (EC2 only) on the host, without Docker, on 127.0.0.1:4566,
# installing it into a venv beside this script the first time, and waits for
# EC2 to be healthy. Prints the PID; stop.sh stops it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import localstack, boto3' 2>/dev/null; then
  echo "localstack: installing into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    'localstack-core[runtime]==4.14.0' boto3 'cbor2<6' 'cryptography==45.0.7' 'pyopenssl==25.3.0' service-identity
fi
if curl -sf http://127.0.0.1:4566/_localstack/health >/dev/null 2>&1; then
  echo "localstack: already running" >&2
  exit 0
fi
if [ -n "${LOCALSTACK_STATE:-}" ]; then
  state=$LOCALSTACK_STATE
else
  # Ours to remove: stop.sh deletes it.
  state=$(mktemp -d /tmp/localstack.XXXXXX)
  echo "$state" > "$here/.state"
fi
GATEWAY_LISTEN=127.0.0.1:4566 SERVICES=ec2 EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 \
  SKIP_SSL_CERT_DOWNLOAD=1 LOCALSTACK_VOLUME_DIR="$state" \
  nohup "$venv/bin/python" -m localstack.runtime.main > "$state/localstack.log" 2>&1 &
echo $! > "$here/.pid"
for _ in $(seq 1 120); do
  if curl -sf http://127.0.0.1:4566/_localstack/health 2>/dev/null | grep -q '"ec2": "\(running\|available\)"'; then
    echo "localstack: EC2 ready on 127.0.0.1:4566 (pid $(cat "$here/.pid"), log $state/localstack.log)" >&2
    exit 0
  fi
  kill -0 "$(cat "$here/.pid")" 2>/dev/null || { cat "$state/localstack.log" >&2; exit 1; }
  sleep 0.5
done
echo "localstack: EC2 not healthy after 60 s" >&2
tail -20 "$state/localstack.log" >&2
exit 1

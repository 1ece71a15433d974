#!/usr/bin/env bash
# Checks a /metrics exposition with promtool (`promtool check metrics`).
# aws-node's metric names are kept so that its dashboards and alerts work;
# one of them breaks a promtool lint rule (`awscni_aws_api_latency_ms`: a
# unit other than seconds). Exactly the findings listed in
# ipamd/metrics-lint.allow are accepted; any other finding, a parse error,
# or a listed finding that no longer occurs fails the check.
#   usage: scripts/check-metrics.sh FILE   (or the exposition on stdin)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
promtool="${PROMTOOL:-$root/.tools/bin/promtool}"
allow="$root/ipamd/metrics-lint.allow"
if [ ! -x "$promtool" ]; then
  echo "check-metrics: promtool not found at $promtool (run scripts/setup.sh)" >&2
  exit 2
fi
input="${1:-/dev/stdin}"
set +e
found="$("$promtool" check metrics <"$input" 2>&1)"
rc=$?
set -e
case $rc in
  0 | 3) ;; # 3: lint findings, compared below
  *)
    echo "check-metrics: promtool failed ($rc):" >&2
    echo "$found" >&2
    exit 1
    ;;
esac
want="$(sed '/^#/d; /^$/d' "$allow" | sort)"
got="$(echo "$found" | sed '/^$/d' | sort)"
if [ "$want" != "$got" ]; then
  echo "check-metrics: promtool's findings differ from $allow" >&2
  diff <(echo "$want") <(echo "$got") | sed 's/^</  expected, not found:/; s/^>/  found, not expected:/' >&2 || true
  exit 1
fi
echo "check-metrics: ok ($(echo "$want" | grep -c . ) accepted findings, all from aws-node's names)"

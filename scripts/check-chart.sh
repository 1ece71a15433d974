#!/usr/bin/env bash
# The Helm chart: helm lint; each value set in charts/vpc-cni/ci rendered
# (CRDs included) and validated with kubernetes-validate --strict against
# Kubernetes 1.37 (custom resources only warn there, so the rendered
# ENIConfigs and the examples are checked against the CRD's own schema);
# a typo in a setting refused by values.schema.json. Needs scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/.tools"
helm="$tools/bin/helm"
validate="$tools/venv/bin/kubernetes-validate"
py="$tools/venv/bin/python"
for t in "$helm" "$validate"; do
  [ -x "$t" ] || { echo "check-chart: $t is missing: run scripts/setup.sh" >&2; exit 1; }
done
chart=charts/vpc-cni
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
export HELM_CACHE_HOME="$out/cache" HELM_CONFIG_HOME="$out/config" HELM_DATA_HOME="$out/data"
"$helm" lint --strict "$chart"
for values in "$chart"/ci/*.yaml; do
  name="$(basename "$values" .yaml)"
  "$helm" template vpc-cni "$chart" --namespace kube-system --include-crds \
    -f "$values" > "$out/$name.yaml"
  "$validate" --strict --quiet -k 1.37.0 "$out/$name.yaml" 2>&1 |
    grep -v "Couldn't find schema for kind \(ENIConfig\|ServiceMonitor\|PrometheusRule\)" || true
  # kubernetes-validate's exit status: 0 valid (warnings allowed).
  if ! "$validate" --strict --quiet -k 1.37.0 "$out/$name.yaml" >/dev/null 2>&1; then
    echo "check-chart: $name: kubernetes-validate failed" >&2
    "$validate" --strict -k 1.37.0 "$out/$name.yaml" >&2 || true
    exit 1
  fi
  echo "check-chart: $name: rendered and valid ($(grep -c '^kind:' "$out/$name.yaml") objects)"
done
# ENIConfigs (rendered and the examples) against the CRD's own schema.
"$py" - "$chart/crds/eniconfigs.yaml" "$out"/*.yaml "$chart"/examples/*.yaml <<'PY'
import sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def strict(s):
    # Structural schemas prune unknown fields; here they are errors.
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s:
            s.setdefault("additionalProperties", False)
            s["properties"].setdefault("apiVersion", {"type": "string"})
            s["properties"].setdefault("kind", {"type": "string"})
            s["properties"].setdefault("metadata", {"type": "object"})
        for v in s.values():
            strict(v)
    return s
schema = strict(schema)
n = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "ENIConfig":
            continue
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as e:
            sys.exit(f"check-chart: {path}: ENIConfig {doc['metadata'].get('name')}: {e.message}")
        n += 1
if n == 0:
    sys.exit("check-chart: no ENIConfig was checked")
print(f"check-chart: {n} ENIConfig objects valid against the CRD's schema")
PY
# A release installed before the growers values (helm upgrade
# --reuse-values keeps the old values): renders, with the growers off.
"$helm" template vpc-cni "$chart" --set growers=null > "$out/old.yaml"
if grep -q "kind: Role$" "$out/old.yaml" || ! grep -A1 "IPAMD_GROWERS_NAMESPACE" "$out/old.yaml" | grep -q 'value: ""'; then
  echo "check-chart: without growers values the growers are not off" >&2; exit 1
fi
# values.schema.json refuses a misspelt setting and a bad type.
if "$helm" template vpc-cni "$chart" --set settings.WARM_IP_TAGRET=5 >/dev/null 2>"$out/err"; then
  echo "check-chart: a misspelt setting was accepted" >&2; exit 1
fi
grep -q "WARM_IP_TAGRET" "$out/err" || { echo "check-chart: the schema error does not name the setting:" >&2; cat "$out/err" >&2; exit 1; }
# Values that would make ipamd exit 64 on every node, or that the API
# server would refuse, are refused at render time.
for bad in podGoneGraceSeconds=3 settings.WARM_IP_TARGET=abc \
  settings.ENABLE_PREFIX_DELEGATION=yes settings.AWS_VPC_K8S_CNI_VETHPREFIX=toolong \
  updateStrategy.maxUnavailable=0 stateDir=/ eniConfigs.Bad_Name.subnet=subnet-1 \
  introspectionPort=61678 provider=gcp settings.MAX_PODS=0 \
  settings.IPAM_SCALER_BATCH_SIZE=0 settings.WARM_IP_TARGET=10000000000 \
  settings.IP_COOLDOWN_PERIOD=-3 logLevel=verbose "startupTaint=bad key!" \
  growers.namespace=Bad_NS growers.namespace=kube-node-lease growers.namespace=kube-system \
  growers.namespace=default; do
  if "$helm" template vpc-cni "$chart" --set "$bad" >/dev/null 2>&1; then
    echo "check-chart: $bad was accepted" >&2; exit 1
  fi
done
# Combinations ipamd refuses.
for bad in "settings.IPAM_SCALER_BATCH_SIZE=16,settings.WARM_IP_TARGET=5" \
  "settings.ENABLE_PREFIX_DELEGATION=true,settings.WARM_PREFIX_TARGET=0" \
  "settings.ENABLE_PREFIX_DELEGATION=true,settings.WARM_PREFIX_TARGET=0,settings.WARM_IP_TARGET=0" \
  "settings.ADAPTIVE_WARM_TARGET=true,settings.WARM_IP_TARGET=5" \
  "settings.ADAPTIVE_WARM_TARGET=true,settings.WARM_ENI_TARGET=1" \
  "settings.ADAPTIVE_WARM_TARGET=true,settings.IPAM_SCALER_MAX_IP_COUNT=100"; do
  if "$helm" template vpc-cni "$chart" --set-string "$bad" >/dev/null 2>&1; then
    echo "check-chart: $bad was accepted" >&2; exit 1
  fi
done
"$helm" template vpc-cni "$chart" --set-string settings.IPAM_SCALER_BATCH_SIZE=16 >/dev/null
"$helm" template vpc-cni "$chart" --set-string settings.ADAPTIVE_WARM_TARGET=true,settings.WARM_IP_TARGET=0,settings.MINIMUM_IP_TARGET=10 >/dev/null
echo "check-chart: the schema and the templates refuse misspelt settings and bad values"

{{- define "vpc-cni.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vpc-cni.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vpc-cni.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vpc-cni.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vpc-cni.labels" -}}
{{ include "vpc-cni.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "vpc-cni.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vpc-cni.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vpc-cni.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Combinations of settings ipamd refuses (exit 64 on every node). */}}
{{- define "vpc-cni.checkSettings" -}}
{{- $s := .Values.settings -}}
{{- $set := dict -}}
{{- range $k, $v := $s }}{{ if ne (toString $v) "" }}{{ $_ := set $set $k (toString $v) }}{{ end }}{{ end -}}
{{- $truthy := list "1" "t" "T" "TRUE" "true" "True" -}}
{{- $scaler := or (hasKey $set "IPAM_SCALER_BATCH_SIZE") (hasKey $set "IPAM_SCALER_REQUEST_THRESHOLD_PERCENT") (hasKey $set "IPAM_SCALER_RELEASE_THRESHOLD_PERCENT") (hasKey $set "IPAM_SCALER_MAX_IP_COUNT") -}}
{{- $pd := has (get $set "ENABLE_PREFIX_DELEGATION") $truthy -}}
{{- if $scaler -}}
{{- range $k := list "WARM_ENI_TARGET" "WARM_IP_TARGET" "MINIMUM_IP_TARGET" "WARM_PREFIX_TARGET" }}
{{- if hasKey $set $k }}{{ fail (printf "settings: IPAM_SCALER_* and %s are two ways to size the pool: set one" $k) }}{{ end }}
{{- end }}
{{- if $pd }}{{ fail "settings: IPAM_SCALER_* with ENABLE_PREFIX_DELEGATION=true: the scaler moves single addresses" }}{{ end }}
{{- end -}}
{{- if has (get $set "ADAPTIVE_WARM_TARGET") $truthy -}}
{{- if $scaler }}{{ fail "settings: ADAPTIVE_WARM_TARGET=true sizes the warm pool itself; unset IPAM_SCALER_*" }}{{ end -}}
{{- range $k := list "WARM_ENI_TARGET" "WARM_PREFIX_TARGET" }}
{{- if hasKey $set $k }}{{ fail (printf "settings: ADAPTIVE_WARM_TARGET=true sizes the warm pool itself; unset %s (MINIMUM_IP_TARGET may stay)" $k) }}{{ end }}
{{- end }}
{{- if ne (get $set "WARM_IP_TARGET" | default "0") "0" }}{{ fail "settings: ADAPTIVE_WARM_TARGET=true sizes the warm pool itself; unset WARM_IP_TARGET (MINIMUM_IP_TARGET may stay)" }}{{ end -}}
{{- end -}}
{{- /* WARM_IP_TARGET and MINIMUM_IP_TARGET of 0 are unset, as ipamd reads them. */ -}}
{{- if and $pd (eq (get $set "WARM_PREFIX_TARGET") "0") (eq (get $set "WARM_IP_TARGET" | default "0") "0") (eq (get $set "MINIMUM_IP_TARGET" | default "0") "0") -}}
{{- fail "settings: ENABLE_PREFIX_DELEGATION=true with WARM_PREFIX_TARGET=0 and no WARM_IP_TARGET/MINIMUM_IP_TARGET: the pool would never keep a prefix ready" -}}
{{- end -}}
{{- end -}}

{{/*
The growers namespace in force: growers.namespace (default, kube-* and
the release's namespace refused), empty when off, on Azure (whose grow calls share one write bucket with releases and ignore
the count), or when a release installed before it has no growers value
(helm upgrade --reuse-values).
*/}}
{{- define "vpc-cni.growersNamespace" -}}
{{- $ns := (.Values.growers).namespace | default "" }}
{{- if and $ns (or (eq $ns "default") (hasPrefix "kube-" $ns) (eq $ns .Release.Namespace)) }}
{{- fail (printf "growers.namespace %q: every Lease in it is counted, so it must hold nothing else (not default, a kube-* namespace or the release's own)" $ns) }}
{{- end }}
{{- if ne .Values.provider "azure" }}{{ $ns }}{{ end }}
{{- end }}

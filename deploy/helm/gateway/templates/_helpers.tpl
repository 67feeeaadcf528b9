{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret that holds the admin token: the existing one, or the one the chart creates. */}}
{{- define "gateway.adminSecretName" -}}
{{- if .Values.adminToken.create }}
{{- printf "%s-admin-token" (include "gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else if .Values.adminToken.existingSecret }}
{{- .Values.adminToken.existingSecret }}
{{- else }}
{{- fail "adminToken: set adminToken.create=true or adminToken.existingSecret. The admin listener binds a non-loopback address (the kubelet probes it) and the gateway refuses to start it without a token." }}
{{- end }}
{{- end }}

{{/* Environment variable that carries the admin token (config admin.token_env). */}}
{{- define "gateway.tokenEnv" -}}
{{- dig "admin" "token_env" "GATEWAY_ADMIN_TOKEN" (.Values.config | default dict) }}
{{- end }}

{{- define "gateway.listenPort" -}}
{{- dig "listen" "port" 8080 (.Values.config | default dict) | int }}
{{- end }}

{{- define "gateway.adminPort" -}}
{{- dig "admin" "port" 9090 (.Values.config | default dict) | int }}
{{- end }}

{{/*
The routes.yaml the pods run: .Values.config with drain.timeout_s taken from
drain.timeoutSeconds and workers from .Values.workers, so the config, the
preStop hook and terminationGracePeriodSeconds cannot disagree.
*/}}
{{- define "gateway.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $timeout := .Values.drain.timeoutSeconds }}
{{- if or (kindIs "invalid" $timeout) (lt (float64 $timeout) 0.0) }}
{{- fail "drain.timeoutSeconds: must be a number >= 0" }}
{{- end }}
{{- $drain := get $cfg "drain" | default dict }}
{{- if and (hasKey $drain "timeout_s") (ne (float64 (get $drain "timeout_s")) (float64 $timeout)) }}
{{- fail (printf "config.drain.timeout_s (%v) disagrees with drain.timeoutSeconds (%v): set drain.timeoutSeconds only, the chart writes it into the config" (get $drain "timeout_s") $timeout) }}
{{- end }}
{{- $_ := set $drain "timeout_s" $timeout }}
{{- $_ = set $cfg "drain" $drain }}
{{- if and (hasKey $cfg "workers") (ne (toString (get $cfg "workers")) (toString .Values.workers)) }}
{{- fail (printf "config.workers (%v) disagrees with workers (%v): set workers only" (get $cfg "workers") .Values.workers) }}
{{- end }}
{{- $_ = set $cfg "workers" .Values.workers }}
{{- $adminHost := dig "admin" "host" "127.0.0.1" $cfg | toString }}
{{- if or (hasPrefix "127." $adminHost) (has $adminHost (list "localhost" "::1")) }}
{{- fail (printf "config.admin.host is %q (loopback): the kubelet's probes could not reach /readyz and /healthz; use 0.0.0.0" $adminHost) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Seconds from the start of termination to SIGKILL. */}}
{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- add (.Values.drain.timeoutSeconds | ceil) .Values.drain.preStopSleepSeconds .Values.drain.graceMarginSeconds | int }}
{{- end }}

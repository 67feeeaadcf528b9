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
The routes.yaml the pods run: .Values.config with drain.timeout_s and
drain.announce_s taken from drain.*, workers from .Values.workers and redis
from .Values.redis, so the config, the preStop hook and
terminationGracePeriodSeconds cannot disagree. watch defaults to true.
*/}}
{{- define "gateway.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $timeout := .Values.drain.timeoutSeconds }}
{{- if or (kindIs "invalid" $timeout) (lt (float64 $timeout) 0.0) }}
{{- fail "drain.timeoutSeconds: must be a number >= 0" }}
{{- end }}
{{- $announce := .Values.drain.announceSeconds | default 0 }}
{{- if and (gt (float64 $announce) 0.0) (ge (float64 $announce) (float64 $timeout)) }}
{{- fail (printf "drain.announceSeconds (%v) must be less than drain.timeoutSeconds (%v)" $announce $timeout) }}
{{- end }}
{{- $drain := get $cfg "drain" | default dict }}
{{- if and (hasKey $drain "timeout_s") (ne (float64 (get $drain "timeout_s")) (float64 $timeout)) }}
{{- fail (printf "config.drain.timeout_s (%v) disagrees with drain.timeoutSeconds (%v): set drain.timeoutSeconds only, the chart writes it into the config" (get $drain "timeout_s") $timeout) }}
{{- end }}
{{- if and (hasKey $drain "announce_s") (ne (float64 (get $drain "announce_s")) (float64 $announce)) }}
{{- fail (printf "config.drain.announce_s (%v) disagrees with drain.announceSeconds (%v): set drain.announceSeconds only, the chart writes it into the config" (get $drain "announce_s") $announce) }}
{{- end }}
{{- $_ := set $drain "timeout_s" $timeout }}
{{- $_ = set $drain "announce_s" $announce }}
{{- $_ = set $cfg "drain" $drain }}
{{- if and (hasKey $cfg "workers") (ne (toString (get $cfg "workers")) (toString .Values.workers)) }}
{{- fail (printf "config.workers (%v) disagrees with workers (%v): set workers only" (get $cfg "workers") .Values.workers) }}
{{- end }}
{{- $_ = set $cfg "workers" .Values.workers }}
{{- if not (hasKey $cfg "watch") }}
{{- $_ = set $cfg "watch" true }}
{{- end }}
{{- $r := .Values.redis | default dict }}
{{- $sentinel := $r.sentinel | default dict }}
{{- if and $r.url $sentinel.master }}
{{- fail "redis: give redis.url or redis.sentinel, not both" }}
{{- end }}
{{- if and $sentinel.master (not $sentinel.addresses) }}
{{- fail "redis.sentinel.addresses: list the sentinels (host:port) of master redis.sentinel.master" }}
{{- end }}
{{- if or $r.url $sentinel.master }}
{{- $rc := get $cfg "redis" | default dict }}
{{- if or (hasKey $rc "url") (hasKey $rc "sentinel") }}
{{- fail "config.redis.url/sentinel: set redis.url or redis.sentinel (the chart values) only, not both there and in config.redis" }}
{{- end }}
{{- if $r.url }}
{{- $_ = set $rc "url" $r.url }}
{{- else }}
{{- $_ = set $rc "sentinel" (dict "master" $sentinel.master "addresses" $sentinel.addresses) }}
{{- end }}
{{- $_ = set $cfg "redis" $rc }}
{{- end }}
{{- $adminHost := dig "admin" "host" "127.0.0.1" $cfg | toString }}
{{- if or (hasPrefix "127." $adminHost) (has $adminHost (list "localhost" "::1")) }}
{{- fail (printf "config.admin.host is %q (loopback): the kubelet's probes could not reach /readyz and /healthz; use 0.0.0.0" $adminHost) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Seconds from the start of termination to SIGKILL: the drain's announce and
timeout plus a margin, or .Values.terminationGracePeriodSeconds when that is
set and long enough.
*/}}
{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- $drainS := add (.Values.drain.timeoutSeconds | ceil) (.Values.drain.announceSeconds | default 0 | ceil) | int }}
{{- $grace := add $drainS .Values.drain.graceMarginSeconds | int }}
{{- with .Values.terminationGracePeriodSeconds }}
{{- if lt (int .) (add $drainS 5 | int) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) is below drain.announceSeconds + drain.timeoutSeconds (%v) + 5: the kubelet would SIGKILL pods in the middle of their drain; raise it, lower drain.timeoutSeconds, or leave it empty to derive it" . $drainS) }}
{{- end }}
{{- $grace = int . }}
{{- end }}
{{- if ge (int .Values.drain.preStopSleepSeconds) $grace }}
{{- fail (printf "drain.preStopSleepSeconds (%v) must be less than terminationGracePeriodSeconds (%v)" .Values.drain.preStopSleepSeconds $grace) }}
{{- end }}
{{- $grace }}
{{- end }}

{{- define "gateway.jwtSecretName" -}}
{{- if .Values.jwt.hmacSecret.create }}
{{- printf "%s-jwt" (include "gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- .Values.jwt.hmacSecret.existingSecret }}
{{- end }}
{{- end }}

{{- define "gateway.jwtKeySecretName" -}}
{{- if .Values.jwt.publicKey.create }}
{{- printf "%s-jwt-key" (include "gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- .Values.jwt.publicKey.existingSecret }}
{{- end }}
{{- end }}

{{/*
One alerting rule of the PrometheusRule, from a dict: root (the chart's
context), name, expr, for, severity, summary, description. Left out when its
name is in prometheusRule.disabled. runbook_url is prometheusRule.runbookBaseUrl
plus "#" and the lower-cased name: the anchor of the alert's heading in
docs/runbook.md.
*/}}
{{- define "gateway.alert" -}}
{{- $v := .root.Values.prometheusRule }}
{{- if not (has .name ($v.disabled | default list)) -}}
- alert: {{ .name }}
  expr: {{ .expr | quote }}
  for: {{ .for }}
  labels:
    severity: {{ .severity }}
    {{- with $v.alertLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    summary: {{ .summary | quote }}
    description: {{ .description | quote }}
    runbook_url: {{ printf "%s#%s" (trimSuffix "/" $v.runbookBaseUrl) (lower .name) | quote }}
{{- end }}
{{- end }}

{{/* Chart name, or nameOverride. */}}
{{- define "hearth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name, with the chart name unless the
release name already contains it; 63 characters at most (DNS labels). */}}
{{- define "hearth.fullname" -}}
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

{{- define "hearth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hearth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hearth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "hearth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hearth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hearth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hearth.priorityClassName" -}}
{{- if .Values.priorityClass.create }}
{{- include "hearth.fullname" . }}
{{- else }}
{{- .Values.priorityClassName }}
{{- end }}
{{- end }}

{{/* The keys the chart writes into config.toml itself. */}}
{{- define "hearth.managedKeys" -}}
metrics-addr otlp-headers-file otlp-ca otlp-client-cert otlp-client-key kubernetes pod-labels
{{- end }}

{{/* config.toml: .Values.config as TOML key = value lines (JSON strings,
numbers, booleans and arrays of them are valid TOML values), plus the keys
the chart manages. */}}
{{- define "hearth.configToml" -}}
# Rendered by the hearth chart from .Values.config; read by `hearth run --config`.
{{- range $key, $value := .Values.config }}
{{- if has $key (include "hearth.managedKeys" $ | splitList " ") }}
{{- fail (printf "config.%s is set by the chart (see values.yaml); remove it from config" $key) }}
{{- end }}
{{- if kindIs "map" $value }}
{{- fail (printf "config.%s: hearth options are strings, numbers, booleans or lists, not maps" $key) }}
{{- end }}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (empty $value))) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
metrics-addr = {{ printf "0.0.0.0:%v" .Values.metrics.port | quote }}
kubernetes = {{ .Values.kubernetes.enabled }}
{{- if and .Values.kubernetes.enabled .Values.kubernetes.podLabels }}
pod-labels = {{ toJson .Values.kubernetes.podLabels }}
{{- end }}
{{- with .Values.otlp.headersSecret.name }}
otlp-headers-file = "/etc/hearth/headers/headers"
{{- end }}
{{- if .Values.otlp.tls.secretName }}
{{- if not (or .Values.otlp.tls.caKey (and .Values.otlp.tls.certKey .Values.otlp.tls.keyKey)) }}
{{- fail "otlp.tls.secretName: set caKey, or certKey and keyKey, to say what the Secret holds" }}
{{- end }}
{{- if .Values.otlp.tls.caKey }}
otlp-ca = "/etc/hearth/tls/ca.pem"
{{- end }}
{{- if and .Values.otlp.tls.certKey .Values.otlp.tls.keyKey }}
otlp-client-cert = "/etc/hearth/tls/client.pem"
otlp-client-key = "/etc/hearth/tls/client-key.pem"
{{- else if or .Values.otlp.tls.certKey .Values.otlp.tls.keyKey }}
{{- fail "otlp.tls: mutual TLS needs both certKey and keyKey" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mirrorlet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mirrorlet.fullname" -}}
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

{{- define "mirrorlet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirrorlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mirrorlet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mirrorlet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mirrorlet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The headless Service whose DNS name resolves to every agent: the DHT bootstrap.
     Its name keeps within 63 characters with its suffix. */}}
{{- define "mirrorlet.peersName" -}}
{{ include "mirrorlet.fullname" . | trunc 57 | trimSuffix "-" }}-peers
{{- end }}

{{- define "mirrorlet.peersHost" -}}
{{ include "mirrorlet.peersName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/* A duration like 90s, 20m or 1h in seconds. */}}
{{- define "mirrorlet.seconds" -}}
{{- $n := regexFind "^[0-9]+" . | int64 -}}
{{- $unit := regexFind "(ms|s|m|h)$" . -}}
{{- if eq $unit "h" }}{{ mul $n 3600 }}{{ else if eq $unit "m" }}{{ mul $n 60 }}{{ else if eq $unit "ms" }}{{ div $n 1000 }}{{ else }}{{ $n }}{{ end -}}
{{- end }}

{{/* Value combinations the schema cannot express, refused with a message naming them. */}}
{{- define "mirrorlet.validate" -}}
{{- $ports := list (int .Values.registry.port) (int .Values.p2p.port) (int .Values.metrics.port) -}}
{{- if ne (len ($ports | uniq)) 3 }}
{{- fail (printf "registry.port (%v), p2p.port (%v) and metrics.port (%v) must all differ" .Values.registry.port .Values.p2p.port .Values.metrics.port) }}
{{- end }}
{{- if le (include "mirrorlet.seconds" .Values.p2p.providerTtl | int64) (include "mirrorlet.seconds" .Values.p2p.republishInterval | int64) }}
{{- fail (printf "p2p.providerTtl (%s) must be longer than p2p.republishInterval (%s)" .Values.p2p.providerTtl .Values.p2p.republishInterval) }}
{{- end }}
{{- end }}

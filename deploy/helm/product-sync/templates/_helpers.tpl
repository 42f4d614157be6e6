{{/* The objects' name: the release name, unless it already says product-sync. */}}
{{- define "product-sync.name" -}}
{{- if contains "product-sync" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-product-sync" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The selector labels, shared by every object that picks the pods. */}}
{{- define "product-sync.selector" -}}
app.kubernetes.io/name: product-sync
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "product-sync.labels" -}}
{{ include "product-sync.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

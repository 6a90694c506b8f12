{{/* Labels on every object of the release. */}}
{{- define "shapeblock-app.labels" -}}
shapeblock.io/app: {{ required "app is required" .Values.app | quote }}
app.kubernetes.io/name: {{ .Values.app | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- range $k, $v := .Values.labels }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* The labels that select the App's pods (never change: a Deployment's selector is immutable). */}}
{{- define "shapeblock-app.selector" -}}
shapeblock.io/app: {{ .Values.app | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

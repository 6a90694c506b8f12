{{- define "shapeblock-hub.labels" -}}
app.kubernetes.io/name: shapeblock-hub
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "shapeblock-hub.selector" -}}
app.kubernetes.io/name: shapeblock-hub
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shapeblock-hub.adminSecret" -}}
{{- if .Values.adminToken.existingSecret -}}{{ .Values.adminToken.existingSecret }}{{- else -}}{{ .Release.Name }}-admin{{- end -}}
{{- end -}}

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

{{- /* The Secret the chart writes: the admin token, unless an existing Secret holds it, and
the viewer tokens and relay API key given as values. */ -}}
{{- define "shapeblock-hub.secretName" -}}
{{ .Release.Name }}
{{- end -}}

{{- define "shapeblock-hub.adminSecret" -}}
{{ .Values.adminToken.existingSecret | default (include "shapeblock-hub.secretName" .) }}
{{- end -}}

{{- /* The admin token the chart stores: the value given, else the one already installed (so
upgrades keep it), else a new one. */ -}}
{{- define "shapeblock-hub.adminToken" -}}
{{- if .Values.adminToken.value -}}
{{ .Values.adminToken.value }}
{{- else -}}
{{- $installed := lookup "v1" "Secret" .Release.Namespace (include "shapeblock-hub.secretName" .) -}}
{{- $previous := dig "data" "admin-token" "" $installed -}}
{{- if $previous -}}{{ $previous | b64dec }}{{- else -}}{{ randAlphaNum 48 }}{{- end -}}
{{- end -}}
{{- end -}}

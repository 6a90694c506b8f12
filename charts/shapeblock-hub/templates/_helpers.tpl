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

{{- /* The local cluster's token (localCluster.enabled): the value given, else the one already
installed (so upgrades keep it), else a new one (256 random bits). Worked out once per render
and kept in .Values, since the hub's Secret, the agent's Secret and the cluster id in the
agent's labels must agree. */ -}}
{{- define "shapeblock-hub.localToken" -}}
{{- if not .Values.localCluster.token -}}
{{- $installed := lookup "v1" "Secret" .Release.Namespace (include "shapeblock-hub.secretName" .) -}}
{{- $previous := dig "data" "local-cluster-token" "" $installed | b64dec -}}
{{- $id := printf "c%s" (substr 0 16 (uuidv4 | replace "-" "")) -}}
{{- $new := printf "sbt_%s_%s%s" $id (uuidv4 | replace "-" "") (uuidv4 | replace "-" "") -}}
{{- $_ := set .Values.localCluster "token" ($previous | default $new) -}}
{{- end -}}
{{- if not (regexMatch "^sbt_c[0-9a-f]{16}_[0-9a-f]{64}$" .Values.localCluster.token) -}}
{{- fail "localCluster.token must be a cluster token: sbt_c<16 hex digits>_<64 hex digits>" -}}
{{- end -}}
{{ .Values.localCluster.token }}
{{- end -}}

{{- /* The local cluster's id: the one its token names. */ -}}
{{- define "shapeblock-hub.localClusterId" -}}
{{ index (splitList "_" (include "shapeblock-hub.localToken" .)) 1 }}
{{- end -}}

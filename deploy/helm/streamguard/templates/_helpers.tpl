{{- define "streamguard.fullname" -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "streamguard.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "streamguard.secretName" -}}{{ .Values.secrets.existingSecret | default (include "streamguard.fullname" .) }}{{- end -}}

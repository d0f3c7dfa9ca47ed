{{/*
Names are fixed rather than derived from the release: the CRDs, the ClusterRole and the
MutatingWebhookConfiguration are cluster-wide, so one release serves the whole cluster, and the
operator's defaults (Lease, webhook Service, Secret and configuration) use the same names.
*/}}

{{- define "sideyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: sideyard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sideyard
{{- end }}

{{- define "sideyard.selectorLabels" -}}
app.kubernetes.io/name: sideyard
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sideyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Whether the operator manages the webhook certificate itself. */}}
{{- define "sideyard.managesCert" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.certManager.enabled) }}true{{ end }}
{{- end }}

{{/*
The budget ledger runs when it is enabled and the webhook is: it serves the webhook's certificate.
Renders "true" or nothing.
*/}}
{{- define "sideyard.ledger" -}}
{{- if and .Values.ledger.enabled .Values.webhook.enabled }}true{{ end }}
{{- end }}

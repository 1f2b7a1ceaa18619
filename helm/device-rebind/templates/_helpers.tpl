{{/*
Expand the name of the chart.
*/}}
{{- define "device-rebind.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, truncated at 63 characters (DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "device-rebind.fullname" -}}
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

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "device-rebind.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "device-rebind.labels" -}}
helm.sh/chart: {{ include "device-rebind.chart" . }}
{{ include "device-rebind.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: device-rebind
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: immutable on a StatefulSet/Deployment, so they hold only name and instance.
*/}}
{{- define "device-rebind.selectorLabels" -}}
app.kubernetes.io/name: {{ include "device-rebind.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the service account to use.
*/}}
{{- define "device-rebind.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "device-rebind.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image: registry/repository, then @digest when set, else :tag (default appVersion).
*/}}
{{- define "device-rebind.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repo = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Headless service that governs the StatefulSet's stable pod names.
*/}}
{{- define "device-rebind.headlessServiceName" -}}
{{- printf "%s-headless" (include "device-rebind.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Render one configuration value as an environment string. Numbers from YAML arrive as float64,
which Go would print as 1e+06: whole numbers are printed as integers.
*/}}
{{- define "device-rebind.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . | toString }}
{{- end }}
{{- end }}

{{/*
Mount directory of one secret-backed file ("platformClientCert" -> /etc/device-rebind/secrets/platform-client-cert).
*/}}
{{- define "device-rebind.secretFileDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.secretFiles.mountRoot) (kebabcase .name) }}
{{- end }}

{{/*
The files taken from existing Secrets: values key, the REBIND_ variable that points at the file.
*/}}
{{- define "device-rebind.secretFileVars" -}}
platformClientCert: REBIND_PLATFORM__CLIENT_CERT
platformClientKey: REBIND_PLATFORM__CLIENT_KEY
platformCaBundle: REBIND_PLATFORM__CA_BUNDLE
kafkaCaFile: REBIND_KAFKA__SSL_CAFILE
{{- end }}

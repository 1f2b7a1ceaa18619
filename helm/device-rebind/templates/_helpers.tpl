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
platformSecretFile: REBIND_PLATFORM__SECRET_FILE
platformClientCert: REBIND_PLATFORM__CLIENT_CERT
platformClientKey: REBIND_PLATFORM__CLIENT_KEY
platformCaBundle: REBIND_PLATFORM__CA_BUNDLE
kafkaCaFile: REBIND_KAFKA__SSL_CAFILE
kafkaCertFile: REBIND_KAFKA__SSL_CERTFILE
kafkaKeyFile: REBIND_KAFKA__SSL_KEYFILE
kafkaOauthToken: REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE
bindTlsCert: REBIND_BIND__TLS_CERT
bindTlsKey: REBIND_BIND__TLS_KEY
bindClientCa: REBIND_BIND__CLIENT_CA
{{- end }}

{{/*
Values the service cannot start without: fail at template time with a message naming the value,
what it is and the variable it sets (values.schema.json requires the keys too).
*/}}
{{- define "device-rebind.validate" -}}
{{- $missing := list }}
{{- if not .Values.config.platform.baseUrl }}
{{- $missing = append $missing "config.platform.baseUrl: the platform's base URL, e.g. https://iot.example.com:8743 (REBIND_PLATFORM__BASE_URL)" }}
{{- end }}
{{- if not .Values.config.platform.appId }}
{{- $missing = append $missing "config.platform.appId: the application's id on the platform (REBIND_PLATFORM__APP_ID)" }}
{{- end }}
{{- if not (or .Values.secrets.platformSecret.existingSecret .Values.secretFiles.platformSecretFile.existingSecret) }}
{{- $missing = append $missing (printf "secrets.platformSecret.existingSecret: the name of a Secret holding the application secret under the key %q, created beforehand, e.g. kubectl create secret generic device-rebind-platform --from-file=%s=./app-secret (REBIND_PLATFORM__SECRET)" .Values.secrets.platformSecret.key .Values.secrets.platformSecret.key) }}
{{- end }}
{{- if $missing }}
{{- fail (printf "required values are not set:\n  - %s" (join "\n  - " $missing)) }}
{{- end }}
{{- end }}

{{/*
The REBIND_ environment of a container: the config sections listed in .sections, the secrets and
the secret-backed files of those sections, then extraEnv. Used by the workload (every section) and
by the topics Job (kafka, topics, log).
*/}}
{{- define "device-rebind.env" -}}
{{- $root := .root }}
{{- $sections := .sections }}
{{- range $section, $fields := $root.Values.config }}
{{- if has $section $sections }}
{{- range $key, $value := $fields }}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) }}
- name: {{ printf "REBIND_%s__%s" (upper $section) (snakecase $key | upper) }}
  value: {{ include "device-rebind.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if has "platform" $sections }}
{{- with $root.Values.secrets.platformSecret }}
{{- if .existingSecret }}
- name: REBIND_PLATFORM__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- if has "kafka" $sections }}
{{- with $root.Values.secrets.kafkaSaslPassword }}
{{- if .existingSecret }}
- name: REBIND_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with $root.Values.secrets.kafkaSslKeyPassword }}
{{- if .existingSecret }}
- name: REBIND_KAFKA__SSL_KEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- if has "bind" $sections }}
{{- with $root.Values.secrets.bindPathSecret }}
{{- if .existingSecret }}
- name: REBIND_BIND__PATH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $var := include "device-rebind.secretFileVars" $root | fromYaml }}
{{- $ref := index $root.Values.secretFiles $name }}
{{- if and $ref.existingSecret (include "device-rebind.inSections" (dict "var" $var "sections" $sections)) }}
- name: {{ $var }}
  value: {{ printf "%s/%s" (include "device-rebind.secretFileDir" (dict "root" $root "name" $name)) $ref.key | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
"true" when the REBIND_<SECTION>__ variable .var belongs to one of .sections, else "".
*/}}
{{- define "device-rebind.inSections" -}}
{{- $var := .var }}
{{- range .sections }}
{{- if hasPrefix (printf "REBIND_%s__" (upper .)) $var }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Volume mounts and volumes of the secret-backed files of .sections.
*/}}
{{- define "device-rebind.secretFileMounts" -}}
{{- $root := .root }}
{{- range $name, $var := include "device-rebind.secretFileVars" $root | fromYaml }}
{{- $ref := index $root.Values.secretFiles $name }}
{{- if and $ref.existingSecret (include "device-rebind.inSections" (dict "var" $var "sections" $.sections)) }}
- name: {{ kebabcase $name }}
  mountPath: {{ include "device-rebind.secretFileDir" (dict "root" $root "name" $name) }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "device-rebind.secretFileVolumes" -}}
{{- $root := .root }}
{{- range $name, $var := include "device-rebind.secretFileVars" $root | fromYaml }}
{{- $ref := index $root.Values.secretFiles $name }}
{{- if and $ref.existingSecret (include "device-rebind.inSections" (dict "var" $var "sections" $.sections)) }}
- name: {{ kebabcase $name }}
  secret:
    secretName: {{ $ref.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $ref.key }}
        path: {{ $ref.key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The topics the service needs, as service/topics.py SPECS has them (a test keeps the two equal):
values key under config.topics, default name, partitions (input: N, coPartitioned: N, one: 1,
any: N) and the configs that matter. Used by the Strimzi KafkaTopic resources.
*/}}
{{- define "device-rebind.topicSpecs" -}}
- {key: deviceSwapped, default: asset.device-swapped.v1, partitions: input, config: {}}
- {key: deviceSwappedUrgent, default: asset.device-swapped.urgent.v1, partitions: coPartitioned, config: {}}
- {key: ledger, default: device-rebind.ledger.v1, partitions: coPartitioned, config: {cleanup.policy: compact}}
- {key: dedupe, default: device-rebind.dedupe.v1, partitions: coPartitioned, config: {cleanup.policy: "compact,delete", retention.ms: "604800000"}}
- {key: token, default: device-rebind.token.v1, partitions: one, config: {cleanup.policy: compact}}
- {key: budget, default: device-rebind.budget.v1, partitions: one, config: {cleanup.policy: compact, segment.ms: "600000"}}
- {key: credentialUpdated, default: iot.credential-updated.v1, partitions: any, config: {}}
- {key: rebindFailed, default: iot.rebind-failed.v1, partitions: any, config: {}}
- {key: deadLetter, default: asset.device-swapped.v1.dlq, partitions: any, config: {}}
- {key: deviceRebound, default: iot.device-rebound.v1, partitions: any, config: {}}
- {key: bindNotify, default: device-rebind.bind-notify.v1, partitions: coPartitioned, config: {}}
{{- end }}

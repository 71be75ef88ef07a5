{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "rtcbus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name. Truncated to 45 characters: the shim's StatefulSet "<fullname>-shim" then
stays within 52, so that its pods' controller-revision-hash label fits in 63.
*/}}
{{- define "rtcbus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rtcbus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rtcbus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rtcbus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rtcbus.callbackSecretName" -}}
{{- default (printf "%s-callback-secrets" (include "rtcbus.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/* Labels: the common set, and the selector of one component (shim, router, topics). ------- */}}

{{- define "rtcbus.labels" -}}
helm.sh/chart: {{ include "rtcbus.chart" . }}
app.kubernetes.io/name: {{ include "rtcbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rtcbus
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "component" "shim"). */}}
{{- define "rtcbus.componentLabels" -}}
{{ include "rtcbus.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rtcbus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rtcbus.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rtcbus.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Kafka client settings ------------------------------------------------------------------ */}}

{{- define "rtcbus.kafkaCaPath" -}}/etc/rtcbus/kafka-ca/ca.crt{{- end }}
{{- define "rtcbus.kafkaClientCertDir" -}}/etc/rtcbus/kafka-client{{- end }}

{{/*
RTCBUS_KAFKA_CONFIG as a dict: kafka.config, then the security settings the chart derives.
The SASL password is "$(KAFKA_SASL_PASSWORD)", which Kubernetes replaces with the env var of
that name (from the Secret, defined before RTCBUS_KAFKA_CONFIG) when it starts the container.
*/}}
{{- define "rtcbus.kafkaConfig" -}}
{{- $kafka := .Values.kafka }}
{{- $config := deepCopy $kafka.config }}
{{- if and $kafka.sasl.enabled $kafka.tls.enabled }}
{{- $_ := set $config "security.protocol" "SASL_SSL" }}
{{- else if $kafka.sasl.enabled }}
{{- $_ := set $config "security.protocol" "SASL_PLAINTEXT" }}
{{- else if $kafka.tls.enabled }}
{{- $_ := set $config "security.protocol" "SSL" }}
{{- end }}
{{- if $kafka.sasl.enabled }}
{{- if not $kafka.sasl.passwordSecret.name }}
{{- fail "kafka.sasl.enabled needs kafka.sasl.passwordSecret.name: an existing Secret with the password" }}
{{- end }}
{{- $_ := set $config "sasl.mechanism" $kafka.sasl.mechanism }}
{{- $_ := set $config "sasl.username" $kafka.sasl.username }}
{{- $_ := set $config "sasl.password" "$(KAFKA_SASL_PASSWORD)" }}
{{- end }}
{{- if and $kafka.tls.enabled $kafka.tls.caSecret.name }}
{{- $_ := set $config "ssl.ca.location" (include "rtcbus.kafkaCaPath" .) }}
{{- end }}
{{- if and $kafka.tls.enabled $kafka.tls.clientCertSecret.name }}
{{- $_ := set $config "ssl.certificate.location" (printf "%s/%s" (include "rtcbus.kafkaClientCertDir" .) $kafka.tls.clientCertSecret.certKey) }}
{{- $_ := set $config "ssl.key.location" (printf "%s/%s" (include "rtcbus.kafkaClientCertDir" .) $kafka.tls.clientCertSecret.keyKey) }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{/* The environment every role gets: Kafka, topics, the shared settings. */}}
{{- define "rtcbus.commonEnv" -}}
{{- $v := .Values }}
{{- if $v.kafka.sasl.enabled }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.kafka.sasl.passwordSecret.name }}
      key: {{ $v.kafka.sasl.passwordSecret.key }}
{{- end }}
- name: RTCBUS_BOOTSTRAP_SERVERS
  value: {{ $v.kafka.bootstrapServers | quote }}
- name: RTCBUS_KAFKA_CONFIG
  value: {{ include "rtcbus.kafkaConfig" . | quote }}
- name: RTCBUS_TOPIC_PREFIX
  value: {{ $v.kafka.topicPrefix | quote }}
- name: RTCBUS_PARTITIONS
  value: {{ $v.kafka.partitions | int64 | quote }}
- name: RTCBUS_REPLICATION_FACTOR
  value: {{ $v.kafka.replicationFactor | int64 | quote }}
- name: RTCBUS_GROUP_ID
  value: {{ $v.kafka.groupId | quote }}
- name: RTCBUS_RAW_RETENTION_MS
  value: {{ $v.topics.retention.rawMs | int64 | quote }}
- name: RTCBUS_EVENTS_RETENTION_MS
  value: {{ $v.topics.retention.eventsMs | int64 | quote }}
- name: RTCBUS_DLQ_RETENTION_MS
  value: {{ $v.topics.retention.dlqMs | int64 | quote }}
- name: RTCBUS_QUARANTINE_RETENTION_MS
  value: {{ $v.topics.retention.quarantineMs | int64 | quote }}
- name: RTCBUS_QUARANTINE_RETENTION_BYTES
  value: {{ $v.topics.retention.quarantineBytes | int64 | quote }}
- name: RTCBUS_DEDUPE_WINDOW_S
  value: {{ $v.config.dedupeWindowS | toString | quote }}
- name: RTCBUS_SIGNATURE_SKEW_S
  value: {{ $v.config.signatureSkewS | toString | quote }}
- name: RTCBUS_MAX_BODY_BYTES
  value: {{ $v.config.maxBodyBytes | int64 | quote }}
- name: RTCBUS_WIRE_FORMAT
  value: {{ $v.config.wireFormat | quote }}
{{- with $v.config.schemaRegistryUrl }}
- name: RTCBUS_SCHEMA_REGISTRY_URL
  value: {{ . | quote }}
{{- end }}
- name: RTCBUS_HOME
  value: /var/lib/rtcbus/home
{{- end }}

{{/* Volumes and mounts for the Kafka CA and client certificate, and the writable scratch dirs. */}}
{{- define "rtcbus.volumes" -}}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret.name }}
    items:
      - key: {{ .Values.kafka.tls.caSecret.key }}
        path: ca.crt
{{- end }}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.clientCertSecret.name }}
- name: kafka-client
  secret:
    secretName: {{ .Values.kafka.tls.clientCertSecret.name }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "rtcbus.volumeMounts" -}}
- name: home
  mountPath: /var/lib/rtcbus/home
- name: tmp
  mountPath: /tmp
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret.name }}
- name: kafka-ca
  mountPath: /etc/rtcbus/kafka-ca
  readOnly: true
{{- end }}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.clientCertSecret.name }}
- name: kafka-client
  mountPath: {{ include "rtcbus.kafkaClientCertDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "component" "shim" "values" .Values.shim). */}}
{{- define "rtcbus.topologySpread" -}}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml .values.topologySpreadConstraints | nindent 2 }}
{{- else if .values.spreadOverNodes }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "rtcbus.selectorLabels" . | nindent 8 }}
{{- end }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "rtcbus.validate" -}}
{{- if gt (int64 .Values.router.replicas) (int64 .Values.kafka.partitions) }}
{{- fail (printf "router.replicas (%d) must be at most kafka.partitions (%d): a consumer group gives each partition to one member, and a router beyond that count gets none; raise the partitions first" (int64 .Values.router.replicas) (int64 .Values.kafka.partitions)) }}
{{- end }}
{{- if gt (mulf 2 .Values.config.signatureSkewS) (float64 .Values.config.dedupeWindowS) }}
{{- fail (printf "config.signatureSkewS (%v) must be at most half of config.dedupeWindowS (%v): a replay can arrive up to twice the skew after the original" .Values.config.signatureSkewS .Values.config.dedupeWindowS) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int64 .Values.autoscaling.minReplicas) (int64 .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must be at most autoscaling.maxReplicas" }}
{{- end }}
{{- if and (eq .Values.topics.mode "strimzi") (not .Values.topics.strimzi.clusterName) }}
{{- fail "topics.mode strimzi needs topics.strimzi.clusterName" }}
{{- end }}
{{- if and (eq .Values.config.wireFormat "confluent") (not .Values.config.schemaRegistryUrl) }}
{{- fail "config.wireFormat confluent needs config.schemaRegistryUrl" }}
{{- end }}
{{- end }}

{{/*
rtcbus's topics, as consumer/kafka/admin.py's topic_specs creates them on a cluster of three
or more brokers: a YAML list of {name, partitions, config}. tests/test_deploy_chart.py compares
the rendered KafkaTopics with that function, so the two cannot drift apart.
The domains are the routing table's (consumer/routing.py: one topic per domain, `unknown`
included); RTCBUS_ROUTES / RTCBUS_TOPICS overrides are not reflected here.
*/}}
{{- define "rtcbus.domains" -}}
{{- list "music" "publicstream" "recording" "relay" "room" "segment" "snapshot" "stream" "transcode" "unknown" "webcast" "whiteboard" | toJson }}
{{- end }}

{{- define "rtcbus.topicSpecs" -}}
{{- $v := .Values }}
{{- $prefix := $v.kafka.topicPrefix }}
{{- $partitions := int64 $v.kafka.partitions }}
{{- $durability := dict }}
{{- if ge (int64 $v.kafka.replicationFactor) 3 }}
{{- $_ := set $durability "min.insync.replicas" "2" }}
{{- end }}
{{- $maxRecord := add (int64 $v.config.maxBodyBytes) 65536 | int64 | toString }}
{{- $dedupeMs := max 86400000 (mulf 2000 $v.config.dedupeWindowS | int64) | int64 }}
{{- $specs := list }}
{{- $raw := merge (dict "retention.ms" ($v.topics.retention.rawMs | int64 | toString) "max.message.bytes" $maxRecord "message.timestamp.type" "LogAppendTime") $durability }}
{{- $specs = append $specs (dict "name" (printf "%s.callbacks.raw" $prefix) "partitions" $partitions "config" $raw) }}
{{- range (include "rtcbus.domains" . | fromJsonArray) }}
{{- $config := merge (dict "retention.ms" ($v.topics.retention.eventsMs | int64 | toString) "max.message.bytes" $maxRecord) $durability }}
{{- $specs = append $specs (dict "name" (printf "%s.events.%s" $prefix .) "partitions" $partitions "config" $config) }}
{{- end }}
{{- $dlq := merge (dict "retention.ms" ($v.topics.retention.dlqMs | int64 | toString) "max.message.bytes" $maxRecord) $durability }}
{{- $specs = append $specs (dict "name" (printf "%s.callbacks.dlq" $prefix) "partitions" $partitions "config" $dlq) }}
{{- $qbytes := int64 $v.topics.retention.quarantineBytes }}
{{- $quarantine := merge (dict "retention.ms" ($v.topics.retention.quarantineMs | int64 | toString) "max.message.bytes" $maxRecord "retention.bytes" ($qbytes | toString) "segment.bytes" (max 1048576 (div $qbytes 16) | int64 | toString)) $durability }}
{{- $specs = append $specs (dict "name" (printf "%s.callbacks.quarantine" $prefix) "partitions" 1 "config" $quarantine) }}
{{- $dedupe := merge (dict "retention.ms" ($dedupeMs | toString) "cleanup.policy" "delete") $durability }}
{{- $specs = append $specs (dict "name" (printf "%s.router.dedupe" $prefix) "partitions" $partitions "config" $dedupe) }}
{{- toYaml $specs }}
{{- end }}

{{/*
The callback secrets of the Secret the chart manages, comma-separated: secrets.callbackSecrets,
else the value already in the cluster's Secret (kept across upgrades), else a new random one.
Computed once per render and kept in .Values, so the Secret and the pods' checksum agree.
*/}}
{{- define "rtcbus.callbackSecretsValue" -}}
{{- if not (hasKey .Values "_callbackSecrets") }}
{{- $value := "" }}
{{- if .Values.secrets.callbackSecrets }}
{{- $value = join "," .Values.secrets.callbackSecrets }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "rtcbus.callbackSecretName" .) }}
{{- if and $existing (hasKey (default dict $existing.data) .Values.secrets.existingSecretKey) }}
{{- $value = index $existing.data .Values.secrets.existingSecretKey | b64dec }}
{{- else }}
{{- $value = randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- $_ := set .Values "_callbackSecrets" $value }}
{{- end }}
{{- .Values._callbackSecrets }}
{{- end }}

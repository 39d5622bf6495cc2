{{/*
Names, labels, GPU accounting and the one Ray pod template shared by the head and the GPU workers.
*/}}

{{- define "epserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix; kept short because KubeRay appends cluster and pod suffixes to it. */}}
{{- define "epserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "epserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "epserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "epserve.labels" -}}
helm.sh/chart: {{ include "epserve.chart" . }}
{{ include "epserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The gateway Service (declared in the RayService as spec.serveService; KubeRay owns its selector). */}}
{{- define "epserve.gatewayServiceName" -}}
{{- printf "%s-gateway" (include "epserve.fullname" .) }}
{{- end }}

{{- define "epserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "epserve.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "epserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Fixed mount path of the checkpoint in every Ray pod (head and workers); it is also the app's `model` argument. */}}
{{- define "epserve.modelMountPath" -}}
/model
{{- end }}

{{/* Fixed ports: Serve HTTP (gateway) and the Ray dashboard (KubeRay's default). The metrics port is a value. */}}
{{- define "epserve.servePort" -}}
8000
{{- end }}

{{- define "epserve.dashboardPort" -}}
8265
{{- end }}

{{/*
GPU accounting. One Serve replica is one EP group of epSize GPUs; a worker pod has gpusPerNode GPUs.
pods(r) = ceil(r x epSize / gpusPerNode); _validate.tpl makes the division exact for numReplicas and
autoscaling.maxReplicas, so the rendered worker group requests exactly replicas x epSize GPUs.
Call with (dict "root" $ "replicas" N).
*/}}
{{- define "epserve.podsFor" -}}
{{- $ep := int .root.Values.expertParallel.epSize }}
{{- $gpn := int .root.Values.worker.gpusPerNode }}
{{- div (add (mul (int .replicas) $ep) (sub $gpn 1)) $gpn }}
{{- end }}

{{/* Serve replicas the cluster starts with, and the most Serve may ask for. */}}
{{- define "epserve.initialReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.numReplicas }}{{ end }}
{{- end }}

{{- define "epserve.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.maxReplicas }}{{ else }}{{ int .Values.numReplicas }}{{ end }}
{{- end }}

{{- define "epserve.workerPods" -}}
{{- include "epserve.podsFor" (dict "root" . "replicas" (include "epserve.initialReplicas" .)) }}
{{- end }}

{{- define "epserve.maxWorkerPods" -}}
{{- max (int (include "epserve.podsFor" (dict "root" . "replicas" (include "epserve.maxReplicas" .)))) (int .Values.rayAutoscaler.maxWorkerPods) }}
{{- end }}

{{/* A value as a string; whole numbers without exponent (values arrive as float64: 1e9 -> "1000000000"). */}}
{{- define "epserve.str" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/*
`ray start` parameters: the chart's own win over the user's extras (the schema rejects overriding them).
dashboard-host is 0.0.0.0 on purpose: without it KubeRay sets the same, and it cannot be 127.0.0.1 in a RayService,
because the KubeRay operator deploys and polls the Serve application through the dashboard port of the head Service
(PUT/GET /api/serve/applications/). The NetworkPolicy limits who reaches that port; rayAuth adds a token.
*/}}
{{- define "epserve.rayStartParams" -}}
{{- $root := .root }}
{{- $own := dict "metrics-export-port" (include "epserve.str" $root.Values.metrics.port) }}
{{- if eq .role "head" }}
{{- $_ := set $own "dashboard-host" "0.0.0.0" }}
{{- $_ := set $own "num-cpus" "0" }}
{{- end }}
{{- $params := merge $own (deepCopy (default dict .group.rayStartParams)) }}
{{- range $k, $v := $params }}
{{ $k }}: {{ include "epserve.str" $v | quote }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: API keys, NCCL (workers), then the user's extras. */}}
{{- define "epserve.env" -}}
{{- $v := .root.Values }}
{{- if $v.apiKeys.enabled }}
- name: {{ $v.apiKeys.envName }}
  valueFrom:
    secretKeyRef:
      name: {{ include "epserve.apiKeysSecretName" .root }}
      key: {{ $v.apiKeys.secretKey }}
{{- end }}
{{- if eq .role "worker" }}
- name: NCCL_DEBUG
  value: {{ $v.nccl.debug | quote }}
- name: NCCL_IB_DISABLE
  value: {{ ternary "1" "0" $v.nccl.ibDisable | quote }}
{{- with $v.nccl.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := $v.nccl.extraEnv }}
- name: {{ $name }}
  value: {{ include "epserve.str" $value | quote }}
{{- end }}
{{- end }}
{{- with $v.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Container ports: every pod exports metrics and may run a Serve proxy; the head adds GCS, client and dashboard. */}}
{{- define "epserve.ports" -}}
- name: serve
  containerPort: {{ include "epserve.servePort" . }}
- name: metrics
  containerPort: {{ .root.Values.metrics.port }}
{{- if eq .role "head" }}
- name: gcs-server
  containerPort: 6379
- name: dashboard
  containerPort: {{ include "epserve.dashboardPort" . }}
- name: client
  containerPort: 10001
{{- end }}
{{- end }}

{{/* Container resources; workers get nvidia.com/gpu = worker.gpusPerNode in requests and limits. */}}
{{- define "epserve.resources" -}}
{{- $res := deepCopy (default dict .group.resources) }}
{{- if eq .role "worker" }}
{{- $gpus := dict "nvidia.com/gpu" (int .root.Values.worker.gpusPerNode) }}
{{- $_ := set $res "requests" (merge $gpus (default dict $res.requests)) }}
{{- $_ := set $res "limits" (merge (deepCopy $gpus) (default dict $res.limits)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
The pod template of a Ray node group. Call with (dict "root" $ "role" "head"|"worker" "group" .Values.head|.Values.worker).
Both mount the checkpoint read-only at /model: Serve's build task and 0-CPU Gateway replicas may run on the head.
Head: GCS + Serve controller + proxy + dashboard, no GPUs. Worker: gpusPerNode GPUs, NCCL env.
*/}}
{{- define "epserve.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
metadata:
  labels:
    {{- include "epserve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "epserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "epserve.env" . | trim }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      ports:
        {{- include "epserve.ports" . | nindent 8 }}
      resources:
        {{- include "epserve.resources" . | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: model
          mountPath: {{ include "epserve.modelMountPath" $root }}
          readOnly: true
          {{- with and $v.model.pvc.claimName $v.model.pvc.subPath }}
          subPath: {{ . }}
          {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .group.shmSizeLimit }}
    - name: model
      {{- if $v.model.pvc.claimName }}
      persistentVolumeClaim:
        claimName: {{ $v.model.pvc.claimName }}
        readOnly: true
      {{- else }}
      hostPath:
        path: {{ $v.model.hostPath.path }}
        type: Directory
      {{- end }}
{{- end }}

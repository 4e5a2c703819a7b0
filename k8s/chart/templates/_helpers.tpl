{{/*
Names, labels and the pieces shared by the pod templates. The stral container is
started with the image's entrypoint (`tini -- stral`) and only `args` set, so the
rendered args are exactly a `stral` command line (checked against the binary's
parser by k8s/test.sh).
*/}}

{{- define "stral.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stral.fullname" -}}
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

{{/* Prefix of per-group names (topology=statefulset), short enough for pod names and the
StatefulSet's controller-revision-hash label. */}}
{{- define "stral.groupPrefix" -}}
{{- include "stral.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "stral.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stral.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stral.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stral.labels" -}}
helm.sh/chart: {{ include "stral.chart" . }}
{{ include "stral.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stral
{{- end }}

{{- define "stral.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stral.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stral.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cpu" "" (eq .Values.engine.device "cpu"))) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "stral.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "stral.fullname" .)) }}
{{- end }}

{{- define "stral.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{- define "stral.modelPvcName" -}}
{{- if .Values.model.pvc.create }}
{{- printf "%s-model" (include "stral.fullname" .) }}
{{- else }}
{{- .Values.model.pvc.claimName }}
{{- end }}
{{- end }}

{{/* True when the model lives on a volume the chart mounts. */}}
{{- define "stral.modelVolumeEnabled" -}}
{{- if has .Values.model.source (list "pvc" "hostPath" "emptyDir") }}true{{ end }}
{{- end }}

{{- define "stral.modelDir" -}}
{{- if .Values.model.dir }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.dir) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* The --model value; empty for the embedded model. */}}
{{- define "stral.modelArg" -}}
{{- if eq .Values.model.source "synthetic" }}
{{- printf "synthetic:%s" .Values.model.synthetic }}
{{- else if include "stral.modelVolumeEnabled" . }}
{{- include "stral.modelDir" . }}
{{- end }}
{{- end }}

{{- define "stral.gpuCount" -}}
{{- if not (kindIs "invalid" .Values.gpu.count) }}
{{- .Values.gpu.count | int }}
{{- else if eq .Values.topology "statefulset" }}
{{- 1 }}
{{- else }}
{{- .Values.engine.tensorParallelSize | int }}
{{- end }}
{{- end }}

{{/* Fails the render on values that cannot work. */}}
{{- define "stral.validate" -}}
{{- $tp := .Values.engine.tensorParallelSize | int }}
{{- if not (has $tp (list 1 2 4 8)) }}
{{- fail (printf "engine.tensorParallelSize must be 1, 2, 4 or 8 (it must divide Codestral's 8 KV heads), got %v" .Values.engine.tensorParallelSize) }}
{{- end }}
{{- if and (eq .Values.model.source "synthetic") (ne .Values.engine.device "cuda") }}
{{- fail "model.source=synthetic fills the weights on the GPU: it needs engine.device=cuda" }}
{{- end }}
{{- if and (eq .Values.model.source "embedded") (eq .Values.topology "statefulset") }}
{{- fail "model.source=embedded builds the tiny model inside the pod: it needs topology=pod" }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.create) (not .Values.model.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName (an existing claim) or model.pvc.create=true" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.model.source "emptyDir") (not .Values.model.download.enabled) }}
{{- fail "model.source=emptyDir starts empty: enable model.download with a command that fills it" }}
{{- end }}
{{- if and .Values.model.download.enabled (not (include "stral.modelVolumeEnabled" .)) }}
{{- fail "model.download needs a volume to fill: model.source pvc, hostPath or emptyDir" }}
{{- end }}
{{- if and .Values.model.download.enabled (not .Values.model.download.command) (not .Values.model.download.args) }}
{{- fail "model.download.enabled needs model.download.command (and/or args): the download is yours to define" }}
{{- end }}
{{- if and (eq .Values.engine.device "cuda") (eq .Values.topology "pod") (lt (include "stral.gpuCount" . | int) $tp) }}
{{- fail (printf "gpu.count (%s) is smaller than engine.tensorParallelSize (%d): topology=pod gives every rank its own GPU" (include "stral.gpuCount" .) $tp) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (eq .Values.topology "statefulset") }}
{{- fail "autoscaling scales the Deployment of topology=pod; with topology=statefulset set replicas instead" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (eq .Values.autoscaling.kind "hpa") (lt (.Values.autoscaling.minReplicas | int) 1) }}
{{- fail "autoscaling.minReplicas must be at least 1 with kind=hpa (scale to zero needs kind=keda)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (.Values.autoscaling.minReplicas | int) (.Values.autoscaling.maxReplicas | int)) }}
{{- fail "autoscaling.minReplicas is larger than autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* `stral serve` arguments. Pass a dict: root (the chart context), workers (a list of
host:port, empty for local workers). */}}
{{- define "stral.serveArgs" -}}
{{- $v := .root.Values -}}
- serve
- --host
- 0.0.0.0
- --port
- {{ $v.engine.port | int | quote }}
{{- with include "stral.modelArg" .root }}
- --model
- {{ . | quote }}
{{- end }}
- --tp
- {{ $v.engine.tensorParallelSize | int | quote }}
- --device
- {{ $v.engine.device | quote }}
{{- with .workers }}
- --workers
- {{ join "," . | quote }}
{{- end }}
{{- if eq $v.engine.device "cuda" }}
- --gpu-memory-utilization
- {{ $v.engine.gpuMemoryUtilization | toString | quote }}
{{- end }}
- --max-num-seqs
- {{ $v.engine.maxNumSeqs | int | quote }}
- --max-num-batched-tokens
- {{ $v.engine.maxNumBatchedTokens | int | quote }}
- --block-size
- {{ $v.engine.blockSize | int | quote }}
{{- range $v.engine.servedModelNames }}
- --served-model-name
- {{ . | quote }}
{{- end }}
{{- range $v.engine.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Environment of a stral container. Pass a dict: root, apiKeys (bool: it serves the
API), nccl (bool: it runs TP ranks). */}}
{{- define "stral.env" -}}
{{- $v := .root.Values -}}
- name: RUST_LOG
  value: {{ $v.engine.logLevel | quote }}
- name: STRAL_CACHE_DIR
  value: /var/cache/stral
{{- if and .apiKeys (include "stral.apiKeysEnabled" .root) }}
- name: STRAL_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "stral.apiKeysSecretName" .root }}
      key: {{ $v.apiKeys.secretKey }}
{{- end }}
{{- if .workerToken }}
- name: STRAL_WORKER_TOKEN_FILE
  value: /etc/stral/worker-token/{{ $v.workerToken.secretKey }}
{{- end }}
{{- if .nccl }}
{{- range $name, $value := $v.nccl.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of a stral container. Pass a dict: root, model (bool), shm (bool). */}}
{{- define "stral.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: cache
  mountPath: /var/cache/stral
- name: tmp
  mountPath: /tmp
{{- if and .model (include "stral.modelVolumeEnabled" .root) }}
- name: model
  mountPath: {{ $v.model.mountPath }}
  readOnly: true
{{- end }}
{{- if and .shm $v.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if .workerToken }}
- name: worker-token
  mountPath: /etc/stral/worker-token
  readOnly: true
{{- end }}
{{- with $v.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of a stral pod. Pass a dict: root, model (bool), shm (bool). */}}
{{- define "stral.volumes" -}}
{{- $v := .root.Values -}}
- name: cache
  emptyDir:
    sizeLimit: {{ $v.cache.sizeLimit }}
- name: tmp
  emptyDir: {}
{{- if and .model (include "stral.modelVolumeEnabled" .root) }}
- name: model
{{- if eq $v.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "stral.modelPvcName" .root }}
{{- else if eq $v.model.source "hostPath" }}
  hostPath:
    path: {{ $v.model.hostPath.path }}
    type: {{ $v.model.hostPath.type }}
{{- else }}
  emptyDir:
    {{- with $v.model.emptyDir.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ $v.model.emptyDir.sizeLimit }}
{{- end }}
{{- end }}
{{- if and .shm $v.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.shm.sizeLimit }}
{{- end }}
{{- if .workerToken }}
- name: worker-token
  secret:
    secretName: {{ include "stral.workerTokenSecretName" .root }}
    defaultMode: 0400
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Init containers of a pod that mounts the model. Pass the chart context. */}}
{{- define "stral.initContainers" -}}
{{- $v := .Values -}}
{{- if $v.model.download.enabled }}
- name: model-download
  image: {{ printf "%s:%s" $v.model.download.image.repository $v.model.download.image.tag | quote }}
  imagePullPolicy: {{ $v.model.download.image.pullPolicy }}
  {{- with $v.model.download.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.model.download.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: MODEL_DIR
      value: {{ include "stral.modelDir" . | quote }}
    - name: HOME
      value: /tmp
    {{- with $v.model.download.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.model.download.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.model.download.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.model.download.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ $v.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- with $v.extraInitContainers }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Resources of a GPU-holding container: values.resources plus the GPU count. */}}
{{- define "stral.gpuResources" -}}
{{- $v := .Values -}}
{{- $res := deepCopy ($v.resources | default dict) }}
{{- if eq $v.engine.device "cuda" }}
{{- $gpus := include "stral.gpuCount" . | int }}
{{- $limits := $res.limits | default dict }}
{{- $requests := $res.requests | default dict }}
{{- $_ := set $limits $v.gpu.resourceName $gpus }}
{{- $_ := set $requests $v.gpu.resourceName $gpus }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod-level settings shared by every stral pod. Pass a dict: root, scheduling (the
nodeSelector/tolerations/affinity source: .Values or .Values.coordinator). */}}
{{- define "stral.podSpecCommon" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ include "stral.serviceAccountName" .root }}
automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | int }}
{{- with .scheduling.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .scheduling.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .scheduling.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Annotations of a stral pod. Pass a dict: root, api (bool: the pod serves the API and
/metrics). */}}
{{- define "stral.podAnnotations" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $ann := dict -}}
{{- if and .api $v.apiKeys.keys (not $v.apiKeys.existingSecret) }}
{{- $_ := set $ann "checksum/api-keys" (include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum) }}
{{- end }}
{{- if and .api $v.metrics.scrapeAnnotations }}
{{- $_ := set $ann "prometheus.io/scrape" "true" }}
{{- $_ := set $ann "prometheus.io/port" ($v.engine.port | int | toString) }}
{{- $_ := set $ann "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $ann = mergeOverwrite $ann ($v.podAnnotations | default dict) }}
{{- if $ann }}
{{- toYaml $ann }}
{{- end }}
{{- end }}

{{/* The coordinator container's ports, probes and lifecycle. Pass the chart context. */}}
{{- define "stral.coordinatorProbes" -}}
ports:
  - name: http
    containerPort: {{ .Values.engine.port | int }}
    protocol: TCP
{{- with .Values.startupProbe }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.lifecycle }}
lifecycle:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Secret holding the coordinator–worker token (topology: statefulset). */}}
{{- define "stral.workerTokenSecretName" -}}
{{- .Values.workerToken.existingSecret | default (printf "%s-worker-token" (include "stral.fullname" .)) -}}
{{- end }}

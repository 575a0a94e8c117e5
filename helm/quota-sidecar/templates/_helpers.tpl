{{/*
Every helper takes a context dict, so a worker chart can call the public templates from its own
pod spec (where `.` is the worker chart and .Chart/.Files are not ours):

  {{- $qs := dict "root" . "values" (index .Values "quota-sidecar") }}

  root:   the caller's top-level context (.Release is what matters)
  values: this chart's values (the parent sees them, defaults merged, under its dependency name)

Names therefore never use .Chart.Name: "<release>-quota-sidecar" is the same whichever chart
renders it, so the worker pod finds the Secret and ConfigMap this chart creates.
*/}}

{{- define "quota-sidecar.fullname" -}}
{{- if .values.fullnameOverride -}}
{{- .values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains "quota-sidecar" .root.Release.Name -}}
{{- .root.Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-quota-sidecar" .root.Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "quota-sidecar.selectorLabels" -}}
app.kubernetes.io/name: quota-sidecar
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Labels of the objects this chart renders itself (.root is this chart there). */}}
{{- define "quota-sidecar.labels" -}}
{{ include "quota-sidecar.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "quota-sidecar.adminSelectorLabels" -}}
{{ include "quota-sidecar.selectorLabels" . }}
app.kubernetes.io/component: admin
{{- end -}}

{{- define "quota-sidecar.adminLabels" -}}
{{ include "quota-sidecar.labels" . }}
app.kubernetes.io/component: admin
{{- end -}}

{{- define "quota-sidecar.image" -}}
{{- printf "%s:%s" .values.image.repository (.values.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "quota-sidecar.redisSecretName" -}}
{{- .values.redis.existingSecret | default (include "quota-sidecar.fullname" .) -}}
{{- end -}}

{{- define "quota-sidecar.redisSecretKey" -}}
{{- if .values.redis.existingSecret -}}{{ .values.redis.existingSecretKey }}{{- else -}}redis-url{{- end -}}
{{- end -}}

{{/* The books (PostgreSQL): "true" when a URL or an existing Secret is given, else empty. */}}
{{- define "quota-sidecar.booksConfigured" -}}
{{- if or .values.books.url .values.books.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The shipper Deployment is rendered: books configured and books.enabled. */}}
{{- define "quota-sidecar.shipperEnabled" -}}
{{- if and .values.books.enabled (include "quota-sidecar.booksConfigured" .) -}}true{{- end -}}
{{- end -}}

{{- define "quota-sidecar.booksSecretName" -}}
{{- .values.books.existingSecret | default (printf "%s-books" (include "quota-sidecar.fullname" .)) -}}
{{- end -}}

{{- define "quota-sidecar.booksSecretKey" -}}
{{- if .values.books.existingSecret -}}{{ .values.books.existingSecretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* QUOTA_BOOKS_URL, from a Secret only (it carries the password); a list item. */}}
{{- define "quota-sidecar.booksEnv" -}}
- name: QUOTA_BOOKS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "quota-sidecar.booksSecretName" . }}
      key: {{ include "quota-sidecar.booksSecretKey" . }}
{{- end -}}

{{- define "quota-sidecar.shipperSelectorLabels" -}}
{{ include "quota-sidecar.selectorLabels" . }}
app.kubernetes.io/component: books-shipper
{{- end -}}

{{- define "quota-sidecar.shipperLabels" -}}
{{ include "quota-sidecar.labels" . }}
app.kubernetes.io/component: books-shipper
{{- end -}}

{{- define "quota-sidecar.adminSecretName" -}}
{{- .values.admin.auth.existingSecret | default (printf "%s-admin" (include "quota-sidecar.fullname" .)) -}}
{{- end -}}

{{- define "quota-sidecar.adminSecretKey" -}}
{{- if .values.admin.auth.existingSecret -}}{{ .values.admin.auth.existingSecretKey }}{{- else -}}admin-tokens{{- end -}}
{{- end -}}

{{- define "quota-sidecar.plansConfigMapName" -}}
{{- .values.plans.existingConfigMap | default (printf "%s-plans" (include "quota-sidecar.fullname" .)) -}}
{{- end -}}

{{- define "quota-sidecar.plansKey" -}}
{{- if .values.plans.existingConfigMap -}}{{ .values.plans.existingConfigMapKey }}{{- else -}}plans.yaml{{- end -}}
{{- end -}}

{{/* Fixed paths inside the containers; the volumes below are mounted there. */}}
{{- define "quota-sidecar.plansDir" -}}/etc/quota-sidecar/plans{{- end -}}
{{- define "quota-sidecar.stateDir" -}}/var/lib/quota-sidecar{{- end -}}
{{- define "quota-sidecar.adminTokenDir" -}}/etc/quota-sidecar/admin-token{{- end -}}
{{- define "quota-sidecar.adminTlsDir" -}}/etc/quota-sidecar/admin-tls{{- end -}}

{{- define "quota-sidecar.socketAddress" -}}
{{- printf "unix:%s/%s" (.values.sidecar.socketDir | trimSuffix "/") .values.sidecar.socketName -}}
{{- end -}}

{{/*
Settings refused at render time that the schema cannot express (they compare two values or
need the Redis URL, which the sidecar itself would otherwise refuse by starting a dev Redis).
*/}}
{{- define "quota-sidecar.validate" -}}
{{- $v := .values -}}
{{- if and (not $v.redis.url) (not $v.redis.existingSecret) -}}
{{- fail "quota-sidecar: redis.url or redis.existingSecret is required (without a Redis URL the sidecar would start a throw-away embedded Redis)" -}}
{{- end -}}
{{- if and $v.redis.url $v.redis.existingSecret -}}
{{- fail "quota-sidecar: set redis.url or redis.existingSecret, not both" -}}
{{- end -}}
{{- if and $v.books.url $v.books.existingSecret -}}
{{- fail "quota-sidecar: set books.url or books.existingSecret, not both" -}}
{{- end -}}
{{- if $v.admin.enabled -}}
{{- if and (not $v.admin.auth.tokens) (not $v.admin.auth.existingSecret) -}}
{{- fail "quota-sidecar: admin.auth.tokens or admin.auth.existingSecret is required when admin.enabled (QuotaAdmin grants credits; it never listens on the pod network without a token)" -}}
{{- end -}}
{{- if and $v.admin.auth.tokens $v.admin.auth.existingSecret -}}
{{- fail "quota-sidecar: set admin.auth.tokens or admin.auth.existingSecret, not both" -}}
{{- end -}}
{{- if and $v.admin.tls.enabled (not $v.admin.tls.secretName) -}}
{{- fail "quota-sidecar: admin.tls.secretName is required when admin.tls.enabled" -}}
{{- end -}}
{{- if and $v.admin.tls.requireClientCert (not $v.admin.tls.enabled) -}}
{{- fail "quota-sidecar: admin.tls.requireClientCert needs admin.tls.enabled" -}}
{{- end -}}
{{- if le (float64 $v.admin.terminationGracePeriodSeconds) (float64 $v.config.shutdownGraceSeconds) -}}
{{- fail "quota-sidecar: admin.terminationGracePeriodSeconds must exceed config.shutdownGraceSeconds" -}}
{{- end -}}
{{- end -}}
{{- if and $v.exampleWorker.enabled (le (float64 $v.exampleWorker.terminationGracePeriodSeconds) (float64 $v.config.shutdownGraceSeconds)) -}}
{{- fail "quota-sidecar: exampleWorker.terminationGracePeriodSeconds must exceed config.shutdownGraceSeconds" -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled $v.admin.enabled (not $v.networkPolicy.adminClientNamespaces) -}}
{{- fail "quota-sidecar: networkPolicy.adminClientNamespaces must name at least one namespace when networkPolicy.enabled" -}}
{{- end -}}
{{- if and $v.serviceMonitor.enabled (or (not $v.admin.enabled) (eq (int $v.admin.metricsPort) 0)) -}}
{{- fail "quota-sidecar: serviceMonitor.enabled needs admin.enabled and admin.metricsPort > 0" -}}
{{- end -}}
{{- end -}}

{{/* Arguments of every quota-sidecar container after `serve`, as a list. */}}
{{- define "quota-sidecar.commonArgs" -}}
{{- $v := .values -}}
{{- $args := list
  "--plans" (printf "%s/%s" (include "quota-sidecar.plansDir" .) (include "quota-sidecar.plansKey" .))
  "--plans-reload-interval-seconds" (toString $v.config.plansReloadIntervalSeconds)
  "--degraded-journal" (printf "%s/degraded-journal.jsonl" (include "quota-sidecar.stateDir" .))
  "--redis-mode" $v.redis.mode
  "--redis-timeout-ms" (toString $v.redis.timeoutMs)
  "--redis-unhealthy-after-seconds" (toString $v.config.redisUnhealthyAfterSeconds)
  "--shutdown-grace-seconds" (toString $v.config.shutdownGraceSeconds)
  "--key-prefix" $v.config.keyPrefix
  "--key-buckets" (toString $v.config.keyBuckets)
  "--log-level" $v.config.logLevel
  "--log-format" $v.config.logFormat
-}}
{{- toYaml (concat $args $v.config.extraArgs) -}}
{{- end -}}

{{/* Environment of every quota-sidecar container: the Redis URL comes from a Secret only. */}}
{{- define "quota-sidecar.env" -}}
- name: QUOTA_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "quota-sidecar.redisSecretName" . }}
      key: {{ include "quota-sidecar.redisSecretKey" . }}
# Compiled bytecode cannot be written on a read-only root filesystem; do not try.
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- with .values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "quota-sidecar.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ .values.runAsUser }}
runAsGroup: {{ .values.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Probes on the health port; .port is that port, .service the health service name startup and
readiness ask (it follows Redis). */}}
{{- define "quota-sidecar.probes" -}}
{{- $p := .values.probes -}}
startupProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
livenessProbe:
  grpc:
    port: {{ .port }}
    # Not .service: that one follows Redis (readiness); "liveness" only says the process answers.
    service: liveness
  periodSeconds: {{ $p.liveness.periodSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
{{- end -}}

{{/* Mounts every quota-sidecar container has: socket dir, plans (a directory: no subPath, or
ConfigMap updates would never arrive), state (degraded journal) and /tmp. */}}
{{- define "quota-sidecar.mounts" -}}
- name: quota-sidecar-socket
  mountPath: {{ .values.sidecar.socketDir }}
- name: quota-sidecar-plans
  mountPath: {{ include "quota-sidecar.plansDir" . }}
  readOnly: true
- name: quota-sidecar-state
  mountPath: {{ include "quota-sidecar.stateDir" . }}
- name: quota-sidecar-tmp
  mountPath: /tmp
{{- end -}}

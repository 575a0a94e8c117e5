{{/*
Public templates a worker chart includes in its own pod spec (see the chart's README.md, "Add
the sidecar to a worker chart", and examples/helm-worker). Each takes
(dict "root" . "values" <this chart's values>) and renders YAML list items, to be indented with
nindent:

  quota-sidecar.container           the sidecar container (under containers, or under
                                    initContainers when sidecar.native is true)
  quota-sidecar.volumes             its volumes: the socket emptyDir shared with the worker, the
                                    plans ConfigMap, and emptyDirs for its journal and /tmp
  quota-sidecar.workerVolumeMounts  the socket emptyDir, for the worker container
  quota-sidecar.workerEnv           QUOTA_TARGET=unix:<socket> for the worker container (the
                                    address quota-sidecar's client and CLI read)
*/}}

{{- /* --unix-socket-mode 0666: the socket's emptyDir is private to the pod, and the worker
container may run as any user. */ -}}
{{- define "quota-sidecar.container" -}}
{{- include "quota-sidecar.validate" . -}}
{{- $v := .values -}}
{{- $args := list "serve"
  "--listen" (include "quota-sidecar.socketAddress" .)
  "--health-listen" (printf "0.0.0.0:%d" (int $v.sidecar.healthPort))
  "--sweep-interval-seconds" "0"
  "--unix-socket-mode" "0666"
-}}
{{- if $v.sidecar.metricsPort -}}
{{- $args = concat $args (list "--metrics-listen" (printf "0.0.0.0:%d" (int $v.sidecar.metricsPort))) -}}
{{- end -}}
- name: {{ $v.sidecar.containerName }}
  image: {{ include "quota-sidecar.image" . }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $v.sidecar.native }}
  # A native sidecar: started before, and stopped after, the pod's regular containers.
  restartPolicy: Always
  {{- end }}
  command: ["quota-sidecar"]
  args:
    {{- concat $args (include "quota-sidecar.commonArgs" . | fromYamlArray) | toYaml | nindent 4 }}
  env:
    {{- include "quota-sidecar.env" . | nindent 4 }}
  ports:
    - name: qs-health
      containerPort: {{ $v.sidecar.healthPort }}
      protocol: TCP
    {{- if $v.sidecar.metricsPort }}
    - name: qs-metrics
      containerPort: {{ $v.sidecar.metricsPort }}
      protocol: TCP
    {{- end }}
  {{- include "quota-sidecar.probes" (dict "root" .root "values" $v "port" $v.sidecar.healthPort "service" "quota.v1.QuotaService") | nindent 2 }}
  resources:
    {{- toYaml $v.sidecar.resources | nindent 4 }}
  securityContext:
    {{- include "quota-sidecar.securityContext" . | nindent 4 }}
  volumeMounts:
    {{- include "quota-sidecar.mounts" . | nindent 4 }}
{{- end -}}

{{- define "quota-sidecar.volumes" -}}
- name: quota-sidecar-socket
  emptyDir: {}
- name: quota-sidecar-plans
  configMap:
    name: {{ include "quota-sidecar.plansConfigMapName" . }}
- name: quota-sidecar-state
  emptyDir: {}
- name: quota-sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "quota-sidecar.workerVolumeMounts" -}}
- name: quota-sidecar-socket
  mountPath: {{ .values.sidecar.socketDir }}
{{- end -}}

{{- define "quota-sidecar.workerEnv" -}}
- name: QUOTA_TARGET
  value: {{ include "quota-sidecar.socketAddress" . | quote }}
{{- end -}}

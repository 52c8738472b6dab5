{{/* Labels of every object; extra labels are added where an object needs them. */}}
{{- define "launcher-job.labels" -}}
app.kubernetes.io/managed-by: launcher
app.kubernetes.io/name: {{ .Values.name }}
launcher/run-id: {{ .Values.runId }}
{{- end }}

{{/* Every object but the ConfigMap is owned by it, so deleting the ConfigMap deletes the job. */}}
{{- define "launcher-job.owner" -}}
ownerReferences:
  - apiVersion: v1
    kind: ConfigMap
    name: {{ .Values.name }}-plan
    uid: {{ .Values.ownerUid }}
{{- end }}

{{/* Mounts shared by the rank and scheduler containers. */}}
{{- define "launcher-job.mounts" -}}
volumeMounts:
  - {name: plan, mountPath: {{ .Values.planMount }}, readOnly: true}
  - {name: work, mountPath: {{ .Values.workDir }}}
  - {name: dshm, mountPath: /dev/shm}
  {{- if .Values.outputPvc }}
  {{- /* each run in its own folder on the claim, runs/<run id> (the pod's run-id label) */}}
  - {name: output, mountPath: {{ .Values.workDir }}/output, subPathExpr: runs/$(LAUNCHER_RUN_ID)}
  {{- if .Values.preparedData }}
  - {name: output, mountPath: {{ .Values.workDir }}/output/data, subPath: data, readOnly: true}
  {{- end }}
  {{- end }}
  {{- if .Values.ascend }}
  - {name: ascend-driver, mountPath: /usr/local/Ascend/driver, readOnly: true}
  - {name: npu-smi, mountPath: /usr/local/bin/npu-smi, readOnly: true}
  - {name: ascend-install-info, mountPath: /etc/ascend_install.info, readOnly: true}
  {{- end }}
{{- end }}

{{/* Environment of MindSpore's dynamic cluster that every process of the job shares. */}}
{{- define "launcher-job.schedEnv" -}}
- {name: MS_SCHED_PORT, value: {{ .Values.schedPort | quote }}}
- {name: MS_WORKER_NUM, value: {{ len .Values.ranks | quote }}}
- {name: MS_TOPO_TIMEOUT, value: {{ .Values.topoTimeout | quote }}}
{{- end }}

{{/* The job's secret_env, as references to Secrets: never a value. */}}
{{- define "launcher-job.secretEnv" -}}
{{- range .Values.secretEnv }}
- name: {{ .name }}
  valueFrom: {secretKeyRef: {name: {{ .secret }}, key: {{ .key }}}}
{{- end }}
{{- end }}

{{/* The run id, for the claim's per-run folder: from the pod's label, which the launcher sets per run. */}}
{{- define "launcher-job.runIdEnv" -}}
{{- if .Values.outputPvc }}
- name: LAUNCHER_RUN_ID
  valueFrom: {fieldRef: {fieldPath: "metadata.labels['launcher/run-id']"}}
{{- end }}
{{- end }}

{{- define "launcher-job.hostIP" -}}
{{- if .Values.hostNetwork }}
- name: HCCL_IF_IP
  valueFrom: {fieldRef: {fieldPath: status.hostIP}}
{{- end }}
{{- end }}

{{/* The pod spec fields after restartPolicy and before containers. */}}
{{- define "launcher-job.placement" -}}
{{- if .Values.volcano }}
schedulerName: volcano
{{- end }}
{{- with .Values.serviceAccount }}
serviceAccountName: {{ . }}
{{- end }}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.antiAffinity }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - labelSelector:
          matchLabels: {app.kubernetes.io/name: {{ .Values.name }}}
        topologyKey: kubernetes.io/hostname
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "launcher-job.volumes" -}}
volumes:
  - name: plan
    configMap:
      name: {{ .Values.name }}-plan
      items:
        {{- range .Values.files }}
        {{- if .mount }}
        - {key: {{ .key }}, path: {{ .path }}}
        {{- end }}
        {{- end }}
  - {name: work, emptyDir: {}}
  - {name: dshm, emptyDir: {medium: Memory}}
  {{- with .Values.outputPvc }}
  - {name: output, persistentVolumeClaim: {claimName: {{ . }}}}
  {{- end }}
  {{- if .Values.ascend }}
  - {name: ascend-driver, hostPath: {path: /usr/local/Ascend/driver, type: Directory}}
  - {name: npu-smi, hostPath: {path: /usr/local/bin/npu-smi, type: File}}
  - {name: ascend-install-info, hostPath: {path: /etc/ascend_install.info, type: File}}
  {{- end }}
{{- end }}

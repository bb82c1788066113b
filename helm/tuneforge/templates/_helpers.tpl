{{- define "tuneforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tuneforge.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tuneforge.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tuneforge.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "tuneforge.publicUrl" -}}
{{- if .Values.api.publicUrl -}}
{{ .Values.api.publicUrl }}
{{- else -}}
http://{{ include "tuneforge.fullname" . }}-api.{{ .Release.Namespace }}.svc:{{ .Values.api.service.port }}
{{- end -}}
{{- end -}}

{{/* Environment shared by the API and the scheduler: secrets by reference only. */}}
{{- define "tuneforge.env" -}}
- name: TUNEFORGE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- if .Values.redis.existingSecret }}
- name: TUNEFORGE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.secretKey }}
{{- end }}
{{- if .Values.apiKey.existingSecret }}
- name: TUNEFORGE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret }}
      key: api-key
{{- end }}
{{- if .Values.console.existingSecret }}
- name: TUNEFORGE_UI_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.console.existingSecret }}
      key: ui-secret
{{- end }}
{{- end -}}

{{- define "tuneforge.volumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if .Values.models.volumeClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.volumeClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "tuneforge.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/tuneforge/.tuneforge
{{- if .Values.models.volumeClaim }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tuneforge.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

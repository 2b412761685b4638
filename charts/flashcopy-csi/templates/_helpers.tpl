{{/* The CSI driver name is a protocol fact of the binary, not a setting. */}}
{{- define "flashcopy-csi.driverName" -}}flashcopy.csi.io{{- end }}

{{- define "flashcopy-csi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped prefix for every object name. */}}
{{- define "flashcopy-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "flashcopy-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flashcopy-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "controller"). */}}
{{- define "flashcopy-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flashcopy-csi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flashcopy-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* https (mutual TLS) unless node.agent.insecurePlaintext. */}}
{{- define "flashcopy-csi.agentTemplate" -}}
{{- $scheme := ternary "http" "https" .Values.node.agent.insecurePlaintext }}
{{- default (printf "%s://{node}:%d" $scheme (int .Values.node.agent.port)) .Values.controller.agentTemplate }}
{{- end }}

{{/* Secrets of `certs ensure` and the sidecar's Service. */}}
{{- define "flashcopy-csi.caSecret" -}}{{ include "flashcopy-csi.fullname" . }}-ca{{- end }}
{{- define "flashcopy-csi.agentSecret" -}}{{ include "flashcopy-csi.fullname" . }}-agent-tls{{- end }}
{{- define "flashcopy-csi.controllerSecret" -}}{{ include "flashcopy-csi.fullname" . }}-controller-tls{{- end }}
{{- define "flashcopy-csi.snapshotMetadataSecret" -}}{{ include "flashcopy-csi.fullname" . }}-snapshot-metadata-tls{{- end }}
{{- define "flashcopy-csi.snapshotMetadataService" -}}{{ include "flashcopy-csi.fullname" . }}-snapshot-metadata{{- end }}
{{/* Whether the controller pod runs `certs ensure`. */}}
{{- define "flashcopy-csi.certs" -}}
{{- if or (not .Values.node.agent.insecurePlaintext) .Values.snapshotMetadata.enabled }}true{{ end }}
{{- end }}

{{/* The kubelet's plugin directory of this driver, where the node plugin's socket lives. */}}
{{- define "flashcopy-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.node.kubeletDir) (include "flashcopy-csi.driverName" .) }}
{{- end }}

{{/*
The API token, mounted only into the containers that talk to the API server (the pods set
automountServiceAccountToken: false): the same three files the kubelet would mount.
*/}}
{{- define "flashcopy-csi.apiTokenVolume" -}}
- name: api-token
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}

{{- define "flashcopy-csi.apiTokenMount" -}}
- name: api-token
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}

{{/* Containers that need no privilege at all. */}}
{{- define "flashcopy-csi.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "flashcopy-csi.podEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

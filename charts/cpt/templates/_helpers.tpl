{{/*
Chart name, overridable with nameOverride.
Truncated to 63 characters because Kubernetes label values and most object names must fit
in one DNS label.
*/}}
{{- define "cpt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else "<release>-<chart>", else just the
release name when it already contains the chart name (so `helm install cpt` gives "cpt", not
"cpt-cpt"). Truncated to 63 characters for the same reason as above.
*/}}
{{- define "cpt.fullname" -}}
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
"<chart>-<version>" for the helm.sh/chart label; "+" is not allowed in label values.
*/}}
{{- define "cpt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: only name, instance and component. A Deployment's selector is immutable, so
it must never contain anything that changes on upgrade (version, chart).
*/}}
{{- define "cpt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cpt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels on every object the chart renders: the recommended app.kubernetes.io set, helm.sh/chart
and the user's commonLabels (which cannot override the selector labels).
*/}}
{{- define "cpt.labels" -}}
helm.sh/chart: {{ include "cpt.chart" . }}
{{ include "cpt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cpt
{{- with omit .Values.commonLabels "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The operator's ServiceAccount name: the given name, else the full name when the chart creates
it, else "default".
*/}}
{{- define "cpt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cpt.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference; a digest, when given, pins the image and wins over the tag.
*/}}
{{- define "cpt.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Name of the cluster-scoped RBAC objects. Prefixed with the release namespace so that two
releases of the same name (one per team namespace) never share a ClusterRole.
*/}}
{{- define "cpt.clusterRbacName" -}}
{{- printf "%s-%s" .Release.Namespace (include "cpt.fullname" .) }}
{{- end }}

{{/*
Rules on namespaced resources: everything the operator reads, creates or deletes for a run.
docs/security.md explains each line. No Secrets: credentials reach the stage pods by
reference (secretKeyRef / IRSA), the operator never reads them.
*/}}
{{- define "cpt.namespacedRules" -}}
# Read verbs come as a set (list already discloses what get does); write verbs are exactly
# the ones the operator's code and kopf use.
# kopf watches runs; the operator re-reads a run before each reconcile.
- apiGroups: ["cpt.dev"]
  resources: ["continualpretrains"]
  verbs: ["get", "list", "watch"]
# Phase, conditions, attempt, progress: a JSON merge patch on the status subresource.
- apiGroups: ["cpt.dev"]
  resources: ["continualpretrains/status"]
  verbs: ["get", "patch"]
# Children carry ownerReferences with blockOwnerDeletion; clusters that enable the
# OwnerReferencesPermissionEnforcement admission plugin require this to create them.
- apiGroups: ["cpt.dev"]
  resources: ["continualpretrains/finalizers"]
  verbs: ["update"]
# Tokenize, weights and export stages (watched by kopf for fast reaction).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Preflight and training attempts (watched by kopf for fast reaction).
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Read Kueue's Workloads of suspended training jobs: their reason goes into condition Queued.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list"]
# Read the children's pods for failure reasons; delete pods stuck on a NotReady node.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
# Events on the ContinualPretrain, posted by kopf and by the operator (core/v1 only).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
Rules on cluster-scoped resources (Roles cannot grant them).
*/}}
{{- define "cpt.clusterRules" -}}
# Node readiness, to tell a dead node from a failed pod.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
# kopf watches CRDs to notice when the ContinualPretrain CRD is (re)installed or changed.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# Namespaces, metadata only: the run namespace's Pod Security label
# (pod-security.kubernetes.io/enforce) lets a run whose pods that level would reject fail
# before any child exists. Serving named namespaces, kopf also lists and watches them to
# resolve them (cluster-wide it never asks); without that it retries each refusal for about a
# minute, logging errors, then falls back to the name it was given.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: {{ if .Values.watchNamespace }}["get", "list", "watch"]{{ else }}["get"]{{ end }}
{{- end }}

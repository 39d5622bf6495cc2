{{/*
Rules that span several values (values.schema.json checks each value on its own). Each failure names the
values involved and what to change; `helm install`, `helm template` and `helm lint` all stop on it.
*/}}
{{- define "epserve.validate" -}}
{{- $v := .Values }}

{{- /* 1. Exactly one model source. */}}
{{- if and (not $v.model.pvc.claimName) (not $v.model.hostPath.path) }}
{{- fail "epserve: no model source: set model.pvc.claimName (a PersistentVolumeClaim holding the checkpoint) or model.hostPath.path (the checkpoint directory on every GPU node)" }}
{{- end }}
{{- if and $v.model.pvc.claimName $v.model.hostPath.path }}
{{- fail (printf "epserve: two model sources: set only one of model.pvc.claimName (%q) and model.hostPath.path (%q)" $v.model.pvc.claimName $v.model.hostPath.path) }}
{{- end }}

{{- /* 2. An EP group fits the worker pods: it packs into one pod or spans whole pods. */}}
{{- $ep := int $v.expertParallel.epSize }}
{{- $gpn := int $v.worker.gpusPerNode }}
{{- $packs := and (le $ep $gpn) (eq (mod $gpn $ep) 0) }}
{{- $spans := eq (mod $ep $gpn) 0 }}
{{- if not (or $packs $spans) }}
{{- fail (printf "epserve: expertParallel.epSize=%d does not fit worker pods of worker.gpusPerNode=%d GPUs: an EP group must either pack into one pod (epSize divides gpusPerNode: %s) or span whole pods (epSize is a multiple of gpusPerNode: %d, %d, ...)" $ep $gpn (include "epserve.divisors" $gpn) $gpn (mul 2 $gpn)) }}
{{- end }}

{{- /* 3. GPU accounting: the replicas fill whole pods, so the worker group requests exactly replicas x epSize GPUs. */}}
{{- $replicasKey := ternary "autoscaling.maxReplicas" "numReplicas" $v.autoscaling.enabled }}
{{- $replicas := int (include "epserve.maxReplicas" .) }}
{{- if ne (mod (mul $replicas $ep) $gpn) 0 }}
{{- fail (printf "epserve: %s=%d x expertParallel.epSize=%d = %d GPUs is not a whole number of worker pods of worker.gpusPerNode=%d GPUs; choose %s so that %s x epSize is a multiple of %d, or set worker.gpusPerNode to %d" $replicasKey $replicas $ep (mul $replicas $ep) $gpn $replicasKey $replicasKey $gpn $ep) }}
{{- end }}

{{- /* 4. Autoscaling bounds and the autoscaler's pod ceiling. */}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "epserve: autoscaling.minReplicas=%d exceeds autoscaling.maxReplicas=%d" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- $needed := int (include "epserve.podsFor" (dict "root" . "replicas" $replicas)) }}
{{- $ceiling := int $v.rayAutoscaler.maxWorkerPods }}
{{- if and (gt $ceiling 0) (lt $ceiling $needed) }}
{{- fail (printf "epserve: rayAutoscaler.maxWorkerPods=%d is below the %d worker pods that %s=%d x epSize=%d needs; raise it or set it to 0" $ceiling $needed $replicasKey $replicas $ep) }}
{{- end }}

{{- /* 5. Engine limits AppArgs checks together. */}}
{{- if lt (int64 $v.engine.maxNumBatchedTokens) (int64 $v.engine.maxNumSeqs) }}
{{- fail (printf "epserve: engine.maxNumBatchedTokens=%d must be >= engine.maxNumSeqs=%d (every running sequence needs a token per step)" (int64 $v.engine.maxNumBatchedTokens) (int64 $v.engine.maxNumSeqs)) }}
{{- end }}

{{- /* 6. API keys come from exactly one place. */}}
{{- if $v.apiKeys.enabled }}
{{- if and (not $v.apiKeys.keys) (not $v.apiKeys.existingSecret) }}
{{- fail "epserve: apiKeys.enabled is true but no keys are given: set apiKeys.keys (the chart creates the Secret) or apiKeys.existingSecret (a Secret you manage)" }}
{{- end }}
{{- if and $v.apiKeys.keys $v.apiKeys.existingSecret }}
{{- fail "epserve: set only one of apiKeys.keys and apiKeys.existingSecret" }}
{{- end }}
{{- end }}

{{- /* 7. Ray token auth only through rayAuth: the KubeRay operator needs the token too (it deploys the Serve app). */}}
{{- range $v.env }}
{{- if has .name (list "RAY_AUTH_MODE" "RAY_AUTH_TOKEN" "RAY_AUTH_TOKEN_PATH") }}
{{- fail (printf "epserve: env sets %s: use rayAuth.enabled (and rayAuth.existingSecret for your own token) instead; KubeRay then gives the token to every Ray container and to its own calls that deploy the Serve app" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* "1, 2, 4, 8" for 8: the epSize values that pack into one pod. */}}
{{- define "epserve.divisors" -}}
{{- $n := int . }}
{{- $out := list }}
{{- range $i := untilStep 1 (int (add $n 1)) 1 }}
{{- if eq (mod $n $i) 0 }}{{ $out = append $out (toString $i) }}{{ end }}
{{- end }}
{{- join ", " $out }}
{{- end }}

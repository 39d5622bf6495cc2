{{/*
The Serve config embedded in the RayService (serveConfigV2): the same document `serve run deploy/serve_config.yaml`
takes. Its `args` are deploy.app_config.AppArgs: values are camelCase, args snake_case with the same names
(expertParallel.epSize -> ep_size, engine.maxModelLen -> max_model_len, ...). This is the only place values become
app arguments. API keys never appear here: only the name of the env var that carries them (api_keys_env).

Replica counts are not app arguments here (AppArgs num_replicas, autoscaling, gateway_replicas): they go into the
application's `deployments:` overrides of the ModelServer and Gateway deployments (epserve.scalingOverride,
epserve.gatewayReplicas). Serve rebuilds and redeploys an application whose import_path or args change,
restarting every replica; a change confined to that override is applied to the running replicas (num_replicas:
replicas are added or removed, the others keep serving; autoscaling_config bounds: reconfigured in place).
*/}}
{{- define "epserve.serveArgs" -}}
{{- $v := .Values }}
{{- $args := dict "model" (include "epserve.modelMountPath" .) "device" "cuda" "dtype" $v.model.dtype }}
{{- with $v.model.servedModelName }}
{{- $_ := set $args "served_model_name" . }}
{{- end }}
{{- /* expertParallel, engine and gateway hold only AppArgs fields (values.schema.json lists them): copy by name. */}}
{{- range $section := list $v.expertParallel $v.engine $v.gateway }}
{{- range $key, $value := $section }}
{{- $_ := set $args (snakecase $key) $value }}
{{- end }}
{{- end }}
{{- if $v.apiKeys.enabled }}
{{- $_ := set $args "api_keys_env" $v.apiKeys.envName }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{- /* The names deploy/app.py's build_app gives its deployments (`.options(name=...)`). */}}
{{- define "epserve.modelServerDeployment" -}}
ModelServer
{{- end }}

{{- define "epserve.gatewayDeployment" -}}
Gateway
{{- end }}

{{- /* Gateway replicas: gatewayReplicas, else one per ModelServer replica (the most Serve may run), at least one. */}}
{{- define "epserve.gatewayReplicas" -}}
{{- if kindIs "invalid" .Values.gatewayReplicas }}{{ max 1 (int (include "epserve.maxReplicas" .)) }}{{ else }}{{ int .Values.gatewayReplicas }}{{ end }}
{{- end }}

{{- /* The ModelServer replicas, in Serve's per-deployment override: num_replicas, or autoscaling_config (never both). */}}
{{- define "epserve.scalingOverride" -}}
{{- $v := .Values }}
{{- $override := dict }}
{{- if $v.autoscaling.enabled }}
{{- $_ := set $override "autoscaling_config" (dict
      "min_replicas" $v.autoscaling.minReplicas
      "max_replicas" $v.autoscaling.maxReplicas
      "target_ongoing_requests" $v.autoscaling.targetOngoingRequests) }}
{{- else }}
{{- $_ := set $override "num_replicas" $v.numReplicas }}
{{- end }}
{{- toYaml $override }}
{{- end }}

{{- define "epserve.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ include "epserve.servePort" . }}
applications:
  - name: epserve
    route_prefix: /
    import_path: deploy.app:build_app
    args:
      {{- include "epserve.serveArgs" . | nindent 6 }}
    deployments:
      - name: {{ include "epserve.modelServerDeployment" . }}
        {{- include "epserve.scalingOverride" . | nindent 8 }}
      - name: {{ include "epserve.gatewayDeployment" . }}
        num_replicas: {{ include "epserve.gatewayReplicas" . }}
{{- end }}

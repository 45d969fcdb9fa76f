#!/usr/bin/env bash
# Container entrypoint. With no arguments, or options only, it serves the API on all interfaces:
#   docker run streamllm                        -> streamllm serve --host 0.0.0.0 --port 8000
#   docker run streamllm --log-level debug      -> the same, with those options added
#   docker run streamllm serve --config X.yaml  -> streamllm serve ... --config X.yaml
# Any other command runs as given (docker run -it streamllm bash, docker run streamllm streamllm eval ppl).
# Settings come from STREAMLLM_* / REDIS_URL and the YAML file named by STREAMLLM_CONFIG.
set -euo pipefail

if [[ $# -gt 0 && $1 == serve ]]; then
    shift
elif [[ $# -gt 0 && $1 != -* ]]; then
    exec "$@"
fi

# exec, so that docker stop's SIGTERM reaches the server itself: it drains in-flight streams for up to
# server.shutdown_grace_seconds (keep docker's stop timeout, 10 s by default, above that).
exec streamllm serve --host "${STREAMLLM_HOST:-0.0.0.0}" --port "${STREAMLLM_PORT:-8000}" "$@"

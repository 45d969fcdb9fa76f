"""Model-quality evaluations behind `streamllm eval ...`."""

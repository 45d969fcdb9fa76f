"""Benchmarks behind `streamllm bench ...`: each module prints a table, a JSON line and draws a PNG."""

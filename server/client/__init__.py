"""Clients of the HTTP API: the terminal chat and the HTTP benchmarks (they speak only OpenAI's wire format)."""

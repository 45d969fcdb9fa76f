"""Prometheus metrics in vLLM's naming style (`streamllm:` prefix), one registry per app.

Request timings (TTFT, inter-token latency, end to end) are measured where the client sees them, in the
request's own coroutine; engine state (queues, KV slot use, offloads, token counts) is sampled by the
engine's `on_step` hook on its loop thread, KV tiers included (`StepStats.tiers`).
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streaming_core.engine import StepStats
from streaming_core.engine_api import EngineAPI
from streaming_core.kv_tiers import TierCounts

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_E2E = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class Metrics:
    """The app's metric families; `render()` is the /metrics body."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "streamllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "streamllm:inter_token_latency_seconds",
            "Time between consecutive tokens.",
            labels,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "streamllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_E2E,
            registry=r,
        )
        self.running = Gauge(
            "streamllm:num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.waiting = Gauge(
            "streamllm:num_requests_waiting", "Requests waiting for a slot.", labels, registry=r
        )
        self.slots = Gauge(
            "streamllm:kv_slot_usage_perc", "Fraction of KV pool slots in use.", labels, registry=r
        )
        self.sessions = Gauge("streamllm:num_sessions", "Sessions the engine holds.", labels, registry=r)
        self.offloads = Counter("streamllm:kv_offloads", "Session KV offloads to host.", labels, registry=r)
        tiered = ["model_name", "tier"]
        self.tier_sessions = Gauge(
            "streamllm:kv_tier_sessions", "Sessions whose KV is held in each tier.", tiered, registry=r
        )
        self.tier_bytes = Gauge(
            "streamllm:kv_tier_bytes", "Bytes of session KV held in each tier.", tiered, registry=r
        )
        self.demotions = Counter(
            "streamllm:kv_tier_demotions",
            "Session KV moved down, by the tier it went to (none: dropped, rebuilt on its next turn).",
            tiered,
            registry=r,
        )
        self.promotions = Counter(
            "streamllm:kv_tier_promotions",
            "Session KV taken back to a slot, by the tier it came from.",
            tiered,
            registry=r,
        )
        self.tier_errors = Counter(
            "streamllm:kv_tier_disk_errors",
            "Disk tier failures (write: full or unwritable; read: corrupt or mismatched); the KV is dropped.",
            ["model_name", "kind"],
            registry=r,
        )
        self.rebuilds = Counter(
            "streamllm:session_rebuilds", "Sessions rebuilt from Redis.", labels, registry=r
        )
        self.moves = Counter(
            "streamllm:session_moves",
            "Sessions continued on this replica after another held them (migration: its lease was alive; "
            "takeover: it had expired).",
            ["model_name", "kind"],
            registry=r,
        )
        self.prompt_tokens = Counter("streamllm:prompt_tokens", "Prefilled tokens.", labels, registry=r)
        self.reused_tokens = Counter(
            "streamllm:prefix_reused_tokens",
            "Prompt tokens whose KV was copied from a slot holding the same head (a shared system prompt) "
            "instead of prefilled.",
            labels,
            registry=r,
        )
        self.generation_tokens = Counter(
            "streamllm:generation_tokens", "Generated tokens.", labels, registry=r
        )
        self.finished = Counter(
            "streamllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "streamllm:redis_errors",
            "Redis commands that failed for want of Redis (connection refused or lost, timeout), by where: "
            "request (answered 503), commit (a turn's stream ended with an error), heartbeat, health.",
            ["model_name", "where"],
            registry=r,
        )
        for where in ("request", "commit", "heartbeat", "health"):
            self.redis_errors.labels(model_name, where)
        self._offloads_seen = 0
        self._tier_seen: dict[tuple[str, str], int] = {}
        families: list[Histogram | Gauge | Counter] = [
            *(self.ttft, self.itl, self.e2e, self.running, self.waiting, self.slots, self.sessions),
            *(self.offloads, self.rebuilds, self.prompt_tokens, self.generation_tokens),
        ]
        for family in families:
            family.labels(model_name)  # every series exists from the first scrape, at zero
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(model_name, reason)
        for kind in ("migration", "takeover"):
            self.moves.labels(model_name, kind)
        for tier in ("slot", "host", "disk"):
            self.tier_sessions.labels(model_name, tier)
            self.tier_bytes.labels(model_name, tier)
        for tier in ("host", "disk", "none"):
            self.demotions.labels(model_name, tier)
        for tier in ("host", "disk"):
            self.promotions.labels(model_name, tier)
        for kind in ("write", "read"):
            self.tier_errors.labels(model_name, kind)

    def on_step(self, step: StepStats) -> None:
        """Engine hook (its loop thread): queue sizes, slot use, token counts and tiers after each step."""
        name = self.model_name
        self.running.labels(name).set(step.running)
        self.waiting.labels(name).set(step.waiting)
        self.slots.labels(name).set(step.busy_slots / step.num_slots)
        self.sessions.labels(name).set(step.sessions)
        if step.offloads > self._offloads_seen:
            self.offloads.labels(name).inc(step.offloads - self._offloads_seen)
            self._offloads_seen = step.offloads
        self.prompt_tokens.labels(name).inc(step.prefilled)
        self.generation_tokens.labels(name).inc(step.generated)
        self._tiers(step.tiers)

    async def sample_tiers(self, engine: EngineAPI) -> None:
        """Tiers change between steps too (a copy finishing on the worker): sample them on every scrape,
        between steps, where the engine owns the sessions."""
        with contextlib.suppress(Exception):  # a stopped or failing engine leaves the last values
            self._tiers(await asyncio.wrap_future(engine.read_tier_counts()))

    def _tiers(self, c: TierCounts) -> None:
        """Tier gauges as they are now; the engine's monotonic tier counters as Prometheus counters."""
        name = self.model_name
        for tier, n, size in (
            ("slot", c.slot_sessions, c.slot_bytes),
            ("host", c.host_sessions, c.host_bytes),
            ("disk", c.disk_sessions, c.disk_bytes),
        ):
            self.tier_sessions.labels(name, tier).set(n)
            self.tier_bytes.labels(name, tier).set(size)
        for family, key, counts in (
            (self.demotions, "demotions", c.demotions),
            (self.promotions, "promotions", c.promotions),
            (self.tier_errors, "errors", c.errors),
        ):
            for label, total in counts.items():
                seen = self._tier_seen.get((key, label), 0)
                if total > seen:
                    family.labels(name, label).inc(total - seen)
                    self._tier_seen[key, label] = total

    def request_done(self, reason: str, e2e: float) -> None:
        self.finished.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Batched token sampling: penalties, temperature, top-k, top-p, per-request seeds and logprobs.

Every step works on the whole [B, V] logits at once; only the uniform of each row's inverse-CDF draw
comes from that row's own generator, so a seeded request samples the same tokens whatever shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; ranges follow the OpenAI API."""

    max_tokens: int = 256
    """Tokens generated at most."""
    temperature: float = 1.0
    """Softmax temperature in [0, 2]; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus: keep the most likely tokens until their mass reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the top_k most likely tokens; 0 disables."""
    seed: int | None = None
    """Seeds the request's own generator: the same tokens whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings, checked by the engine on decoded text."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token generated so far, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style, > 0: positive logits of prompt and generated tokens divided by it, negative multiplied."""
    logprobs: bool = False
    """Return the chosen token's log-probability."""
    top_logprobs: int = 0
    """Also return the most likely tokens with their log-probabilities, 0..20; needs logprobs."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must hold at most {MAX_STOP} non-empty strings, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def counts_penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestSampler:
    """Sampling state of one request: its params, its generator and the tokens its penalties look at."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_tokens: Sequence[int],
        vocab_size: int,
        fallback: torch.Generator | None = None,
    ) -> None:
        if any(not 0 <= t < vocab_size for t in prompt_tokens):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        self.params = params
        self.vocab_size = vocab_size
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        elif fallback is not None:
            self.generator = fallback
        else:  # OS entropy: restarts and replicas must not replay one "random" stream
            self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.counts: dict[int, int] = {}
        """Times each token was generated (presence and frequency penalties)."""
        self.seen: set[int] = set(prompt_tokens)
        """Prompt and generated tokens (repetition penalty)."""

    def record(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1
        self.seen.add(token)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.generator.device))


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None
    """log_softmax of the raw logits (before penalties and temperature) at token, when params.logprobs."""
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    """(token, logprob) of the params.top_logprobs most likely tokens, highest first."""


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """logits, counts (generated) [B, V], seen [B, V] bool, penalties [B, 1] -> penalized logits [B, V]."""
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)  # [B, V]
    logits = torch.where(seen, repeated, logits)  # [B, V]
    return logits - counts * frequency - (counts > 0).float() * presence  # [B, V]


def _padded(rows: list[list[int]], fill: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Ragged rows -> [B, L] tensor, short rows filled with fill."""
    width = max([1, *map(len, rows)])
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=dtype, device=device)  # [B, L]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [B, 1]


def _penalize(logits: torch.Tensor, requests: Sequence[RequestSampler]) -> torch.Tensor:
    """logits [B, V] -> penalized logits [B, V]; the input itself when no row has a penalty."""
    params = [r.params for r in requests]
    if not any(p.counts_penalized or p.repetition_penalty != 1.0 for p in params):
        return logits
    b, v = logits.shape
    dev = logits.device
    count_ids = [list(r.counts) if r.params.counts_penalized else [] for r in requests]
    count_vals = [list(r.counts.values()) if r.params.counts_penalized else [] for r in requests]
    seen_ids = [list(r.seen) if r.params.repetition_penalty != 1.0 else [] for r in requests]
    # Column v swallows the padding of the ragged token lists and is dropped afterwards.
    counts = torch.zeros(b, v + 1, device=dev)  # [B, V+1]
    counts.scatter_(1, _padded(count_ids, v, torch.long, dev), _padded(count_vals, 0, torch.float32, dev))
    seen = torch.zeros(b, v + 1, dtype=torch.bool, device=dev)  # [B, V+1]
    seen.scatter_(1, _padded(seen_ids, v, torch.long, dev), True)
    return apply_penalties(
        logits,
        counts[:, :v],
        seen[:, :v],
        _column([p.presence_penalty for p in params], dev),
        _column([p.frequency_penalty for p in params], dev),
        _column([p.repetition_penalty for p in params], dev),
    )


def _draw(logits: torch.Tensor, requests: Sequence[RequestSampler]) -> torch.Tensor:
    """Penalized logits [B, V] -> sampled token ids [B] after temperature, top-k and top-p.

    Rows without top-k/top-p draw by inverse CDF over the vocabulary as it is; rows with a filter
    sort their row first. Which way a row goes depends only on its own parameters, so a seeded row
    draws the same token whatever else is in the batch, and the common case skips a [B, V] sort.
    """
    v, dev = logits.shape[1], logits.device
    uniforms = _column([0.0 if r.params.greedy else r.uniform() for r in requests], dev)  # [B, 1]
    filtered = [(0 < r.params.top_k < v) or r.params.top_p < 1.0 for r in requests]
    out = torch.empty(len(requests), dtype=torch.long, device=dev)  # [B]
    for use_filters in (False, True):
        rows = [i for i, f in enumerate(filtered) if f == use_filters]
        if rows:
            draw = _draw_sorted if use_filters else _draw_plain
            idx = torch.tensor(rows, device=dev)
            out[idx] = draw(logits[idx], [requests[i] for i in rows], uniforms[idx])
    return out


def _draw_plain(logits: torch.Tensor, requests: Sequence[RequestSampler], u: torch.Tensor) -> torch.Tensor:
    temperature = _column([r.params.temperature or 1.0 for r in requests], logits.device)  # [B, 1]
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    return _inverse_cdf(probs, u).squeeze(1)  # [B]


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column [B, 1] where each row's uniform u falls in its (unnormalised) probabilities [B, V]."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [B, 1]
    rank = torch.arange(probs.shape[1], device=probs.device)  # [V]
    last_kept = torch.where(probs > 0, rank, 0).amax(dim=-1, keepdim=True)  # [B, 1]
    return torch.minimum(picked, last_kept)  # rounding can put the target at cdf[-1]


def _draw_sorted(logits: torch.Tensor, requests: Sequence[RequestSampler], u: torch.Tensor) -> torch.Tensor:
    params = [r.params for r in requests]
    v = logits.shape[1]
    dev = logits.device
    temperature = _column([p.temperature or 1.0 for p in params], dev)  # [B, 1]
    top_k = _column([p.top_k or v for p in params], dev)  # [B, 1]
    top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], dev)  # [B, 1]
    scaled, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)  # [B, V]
    rank = torch.arange(v, device=dev)  # [V]
    scaled = scaled.masked_fill(rank >= top_k, float("-inf"))  # [B, V]
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    probs = probs.masked_fill(mass_before >= top_p, 0.0)  # [B, V], the first token always stays
    return order.gather(1, _inverse_cdf(probs, u)).squeeze(1)  # [B]


def sample(
    logits: torch.Tensor,
    requests: Sequence[RequestSampler],
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[SampledToken]:
    """logits [B, V], one row per request -> one token per row, recorded in each request. `argmax`, where
    given, replaces `torch.argmax(dim=-1)` on CPU rows (the compiled kernels' `argmax_rows`: same indices)."""
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(f"logits must be [{len(requests)}, V], got {tuple(logits.shape)}")
    if any(r.vocab_size != logits.shape[1] for r in requests):
        raise ValueError(f"logits have {logits.shape[1]} columns, a request expects another vocab size")
    params = [r.params for r in requests]
    raw = logits.float()  # [B, V]
    penalized = _penalize(raw, requests)  # [B, V]
    if argmax is not None and penalized.device.type == "cpu":
        tokens = argmax(penalized.contiguous())  # [B]
    else:
        tokens = penalized.argmax(dim=-1)  # [B]
    if not all(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)  # [B]
        tokens = torch.where(greedy, tokens, _draw(penalized, requests))  # [B]
    out = [SampledToken(t) for t in tokens.tolist()]
    if any(p.logprobs for p in params):
        logprobs = torch.log_softmax(raw, dim=-1)  # [B, V]
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()  # [B]
        top_vals, top_ids = logprobs.topk(max(p.top_logprobs for p in params), dim=-1)  # [B, k]
        top_vals_rows, top_ids_rows = top_vals.tolist(), top_ids.tolist()
        for i, p in enumerate(params):
            if p.logprobs:
                out[i].logprob = chosen[i]
                k = p.top_logprobs
                out[i].top_logprobs = list(zip(top_ids_rows[i][:k], top_vals_rows[i][:k], strict=True))
    for r, s in zip(requests, out, strict=True):
        r.record(s.token)
    return out

"""Engine and cache configuration: frozen, validated at construction with clear messages."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheConfig:
    """Shape of one sink+window KV slot and of the slot pool."""

    sink_tokens: int = 4
    """Initial tokens of the stream kept forever (the attention sinks)."""
    window: int = 1020
    """Most recent tokens kept, the current one included; older ones are evicted token by token."""
    num_slots: int = 16
    """Slots preallocated in the device pool: sessions whose KV is resident at once."""
    prefill_chunk: int = 256
    """Largest prompt chunk prefilled in one forward; bounds activation memory for any prompt length."""
    host_budget_bytes: int = 2 << 30
    """Host memory for offloaded sessions' KV (least recently used go to disk beyond it); 0: none."""
    disk_budget_bytes: int = 20 << 30
    """Disk under the data directory for sessions demoted from host (oldest dropped, then rebuilt,
    beyond it); 0, or an engine given no directory: no disk tier."""
    prefix_reuse: bool = True
    """A new session whose prompt starts with tokens another slot holds from its stream's start (a shared
    system prompt, the previous stateless request's head) copies their KV instead of recomputing it."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {self.host_budget_bytes}")
        if self.disk_budget_bytes < 0:
            raise ValueError(f"disk_budget_bytes must be >= 0, got {self.disk_budget_bytes}")

    @property
    def capacity(self) -> int:
        """Tokens one slot holds: sinks plus window."""
        return self.sink_tokens + self.window

    def check_context(self, max_position_embeddings: int | None) -> None:
        """Refuse a cache the model was not pre-trained to attend over (the window does not extend context)."""
        if max_position_embeddings is not None and self.capacity > max_position_embeddings:
            raise ValueError(
                f"cache capacity {self.capacity} (sink_tokens {self.sink_tokens} + window {self.window}) exceeds "
                f"the model's pre-training context of {max_position_embeddings} tokens"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the model weights."""

    model: str = "default"
    """'default' (embedded SmolLM2-135M-Instruct), a transformers directory, or a .gguf file."""
    device: str = "auto"
    """'auto' picks CUDA when present, else CPU; or an explicit torch device string."""
    dtype: str = "auto"
    """'auto' is bf16 on CUDA and fp32 on CPU; or one of float32, bfloat16, float16."""
    kv_dtype: str = "auto"
    """KV pool storage: 'auto' or one of float32, bfloat16, float16; attention still computes in the
    activations' dtype, so bf16 KV halves the bytes read and offloaded, at bf16 rounding. 'auto' is bf16 for
    quantized weights on the CPU and the dtype above otherwise (`DecoderModel.default_kv_dtype`)."""
    weights: str = "auto"
    """Matmul weight precision: 'dense' (the dtype above, exact), 'int8' (per-channel weight-only),
    'int4' (per group of 32, the GGUF Q4 block; the LM head at int8), or 'auto' (on CPU int4 for a GGUF whose
    layers are 4-bit, which keeps their codes, else int8; dense elsewhere). Kernels per
    batch size are measured at load whichever is chosen (see streaming_core/linear.py)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Sink+window slot shape and pool size."""
    max_batch_tokens: int = 512
    """Token budget of one engine step: decode tokens plus admitted prefill chunk tokens."""
    max_waiting: int = 256
    """Requests queued beyond the running ones before new ones are refused."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"kv_dtype must be auto, float32, bfloat16 or float16, got {self.kv_dtype!r}")
        if self.weights not in ("auto", "dense", "int8", "int4"):
            raise ValueError(f"weights must be auto, dense, int8 or int4, got {self.weights!r}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")

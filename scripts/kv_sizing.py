"""KV-cache sizing of the example configs: bytes per session and sessions that fit on one 80 GB GPU.

    python scripts/kv_sizing.py          # prints the markdown table that docs/deploy.md carries

One session holds `capacity` tokens of keys and values in every layer, so
    bytes per session = capacity x layers x 2 (K and V) x kv_heads x head_dim x dtype bytes.
The model dimensions are those of the released checkpoints' config.json (checked against transformers'
config classes: parameter counts built on the meta device match the published ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

GIB = 1 << 30
GPU_BYTES = 80 * GIB
"""An 80 GB accelerator (H100 / A100 80GB)."""
RESERVE_BYTES = 8 * GIB
"""Left for the CUDA context, a step's activations and allocator slack."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ModelDims:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    params: int
    """Parameter count: the weights take params x dtype bytes."""


MODELS: dict[str, ModelDims] = {
    "gpu.yaml": ModelDims("SmolLM2-135M-Instruct", 30, 3, 64, 134_515_008),
    "llama2-7b-chat.yaml": ModelDims("Llama-2-7B-chat", 32, 32, 128, 6_738_415_616),
    "mistral-7b-instruct.yaml": ModelDims("Mistral-7B-Instruct-v0.1", 32, 8, 128, 7_241_732_096),
    "pythia-6.9b.yaml": ModelDims("Pythia-6.9B", 32, 32, 128, 6_857_302_016),
    "falcon-7b-instruct.yaml": ModelDims("Falcon-7B-instruct", 32, 1, 64, 6_921_720_704),
    "mpt-7b-chat.yaml": ModelDims("MPT-7B-chat", 32, 32, 128, 6_649_286_656),
}
"""Each example config (GPU, bf16) and the model it serves."""


def kv_bytes_per_session(dims: ModelDims, capacity: int, dtype_bytes: int) -> int:
    return capacity * dims.layers * 2 * dims.kv_heads * dims.head_dim * dtype_bytes


def sessions_per_gpu(dims: ModelDims, per_session: int, dtype_bytes: int) -> int:
    """Sessions whose KV fits beside the weights and the reserve: the largest sensible num_slots."""
    return (GPU_BYTES - dims.params * dtype_bytes - RESERVE_BYTES) // per_session


@dataclass(frozen=True)
class Row:
    config: str
    dims: ModelDims
    capacity: int
    dtype_bytes: int
    num_slots: int

    @property
    def per_session(self) -> int:
        return kv_bytes_per_session(self.dims, self.capacity, self.dtype_bytes)

    @property
    def fit(self) -> int:
        return sessions_per_gpu(self.dims, self.per_session, self.dtype_bytes)


def rows(configs: Path = CONFIGS) -> list[Row]:
    out = []
    for name, dims in MODELS.items():
        engine = yaml.safe_load((configs / name).read_text())["engine"]
        cache = engine["cache"]
        out.append(
            Row(
                name,
                dims,
                cache["sink_tokens"] + cache["window"],
                DTYPE_BYTES[engine["dtype"]],
                cache["num_slots"],
            )
        )
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def markdown(table: list[Row]) -> str:
    lines = [
        "| config | model | layers x kv heads x head dim | capacity | KV per session | "
        "weights | sessions per 80 GB | num_slots |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        d = r.dims
        lines.append(
            f"| `{r.config}` | {d.name} | {d.layers} x {d.kv_heads} x {d.head_dim} | {r.capacity} | "
            f"{_mib(r.per_session)} | {d.params * r.dtype_bytes / GIB:.2f} GiB | {r.fit:,} | {r.num_slots:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows()))

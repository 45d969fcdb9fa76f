"""Helpers for the HTTP API tests: real uvicorn servers on free ports around the real default model, each
with its own embedded Redis, and the official OpenAI spec as a JSON-schema validator.

The model comes from the `default_model` fixture of tests/server/conftest.py, loaded once per session and
shared by every test engine (each engine has its own KV pool and loop thread). The shared server
`api_server()` starts on first use and stops when the test session ends.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from server.app import create_app
from server.cli_serve import GracefulServer, make_server
from server.settings import ServerLimits, Settings
from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine
from streaming_core.loader import LoadedModel, eos_token_ids

SPEC = Path(__file__).resolve().parents[3] / "shared" / "data" / "openai" / "openapi.json"
KEY_A, KEY_B = "sk-test-alpha", "sk-test-beta"
MODEL = "SmolLM2-135M-Instruct"


def make_engine(loaded: LoadedModel, num_slots: int = 4, window: int = 508, max_waiting: int = 64) -> Engine:
    """An engine of its own (KV pool, loop thread) around the shared model (`default_model` fixture)."""
    cache_cfg = CacheConfig(sink_tokens=4, window=window, num_slots=num_slots, prefill_chunk=256)
    config = EngineConfig(cache=cache_cfg, max_waiting=max_waiting)
    return Engine(loaded.model, loaded.tokenizer, config, eos_token_ids(loaded.tokenizer, loaded.hf_config))


def make_settings(data_dir: Path, keys: tuple[str, ...] = (), **limits: Any) -> Settings:
    """Settings of a test server; `data_dir` holds its own embedded Redis."""
    return Settings(api_keys=list(keys), data_dir=data_dir, server=ServerLimits(**limits))


class LiveServer:
    """One app under uvicorn in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, settings: Settings, engine: Engine | None = None, wait_ready: bool = True) -> None:
        self.app = create_app(settings, engine)
        self.lifecycle = self.app.state.lifecycle
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: GracefulServer = make_server(self.app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self._wait(lambda: self.server.started, "uvicorn did not start")
        if wait_ready:
            self._wait(lambda: httpx.get(f"{self.url}/health").status_code == 200, "server not ready")

    @property
    def engine(self) -> Engine:
        assert self.lifecycle.serving is not None
        return self.lifecycle.serving.engine

    def _wait(self, done: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lifecycle.failed:
                raise RuntimeError(f"startup failed: {self.lifecycle.failed}")
            if done():
                return
            time.sleep(0.02)
        raise TimeoutError(what)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


_shared: dict[str, LiveServer] = {}


def api_server(config: pytest.Config, loaded: LoadedModel) -> LiveServer:
    """The shared server: API keys KEY_A and KEY_B, 4 KV slots, a 64 KiB body limit, small caps; stopped
    when the test session ends."""
    if "api" not in _shared:
        data_dir = Path(tempfile.mkdtemp(prefix="streamllm-api-"))
        limits = {
            "max_body_bytes": 64 * 1024,
            "max_tokens_cap": 512,
            "max_messages": 64,
            "max_prompt_tokens": 4096,
        }
        _shared["api"] = LiveServer(make_settings(data_dir, (KEY_A, KEY_B), **limits), make_engine(loaded))

        def stop() -> None:
            _shared.pop("api").stop()
            shutil.rmtree(data_dir, ignore_errors=True)

        config.add_cleanup(stop)
    return _shared["api"]


def _null_for_nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (still found in the 3.1 spec) as JSON Schema's anyOf [..., null]."""
    if isinstance(node, list):
        return [_null_for_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _null_for_nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _spec() -> tuple[dict[str, Any], Registry]:
    spec = _null_for_nullable(json.loads(SPEC.read_text()))
    registry = Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    return spec, registry


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless `instance` is a valid components.schemas[schema_name]."""
    spec, registry = _spec()
    schema = copy.deepcopy(spec["components"]["schemas"][schema_name])
    schema = json.loads(json.dumps(schema).replace('"$ref": "#/', '"$ref": "urn:openai#/'))
    Draft202012Validator(schema, registry=registry).validate(instance)


def sse_events(lines: list[str]) -> list[Any]:
    """`data:` payloads of an SSE body, parsed (the final '[DONE]' kept as the string)."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out

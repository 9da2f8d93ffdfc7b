"""Start a real `conserve serve` on a free loopback port for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, data_dir: str, api_key: str | None = None, script: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        """script: a test script to run instead of `python -m conserve.cli` (it takes the same
        arguments, e.g. faulty_serve.py); env: extra environment variables for the server."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        os.makedirs(data_dir, exist_ok=True)
        if "--latency-model" not in args:
            # Tests do not wait for a profile of this machine: a latency model of the right magnitude.
            from conftest import rough_latency_model

            path = os.path.join(data_dir, "latency.json")
            rough_latency_model().save(Path(path))
            args = (*args, "--latency-model", path)
        launcher = [sys.executable, script] if script else [sys.executable, "-m", "conserve.cli"]
        cmd = [*launcher, "serve", "--port", str(self.port), "--data-dir", data_dir,
               *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log_path = os.path.join(data_dir, "server.log")
        os.makedirs(data_dir, exist_ok=True)
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)

    def wait_ready(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {open(self.log_path).read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(open(self.log_path).read())

    def stop(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def metric(url: str, sample: str, **labels: str) -> float:
    """The value of one sample (e.g. `conserve_routed_requests_total`) of a server's /metrics whose
    labels include these; 0 when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0

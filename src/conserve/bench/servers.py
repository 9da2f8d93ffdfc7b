"""Server subprocesses for `conserve bench coserve`: start one with its log in a file, wait until GET
/health answers 200, stop it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field

import httpx

from conserve.errors import ConserveError

POLL_S = 0.5
STOP_GRACE_S = 30.0  # a server drains and closes its store on SIGTERM; vLLM also stops its engine process


class ServerError(ConserveError):
    """The server exited or never became ready; the message ends with the tail of its log."""


@dataclass
class ServerSpec:
    argv: list[str]
    port: int
    log_path: str
    ready_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


class ServerProcess:
    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        os.makedirs(os.path.dirname(os.path.abspath(spec.log_path)), exist_ok=True)
        self._log = open(spec.log_path, "w")  # noqa: SIM115 - the server writes it until stop() closes it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        try:
            # Its own session (process group): Ctrl-C reaches only us, and we stop the server and any
            # worker processes it spawned together.
            self.proc = subprocess.Popen(spec.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as e:
            self._log.close()
            raise ServerError(f"cannot start {spec.argv[0]}: {e}") from None

    def exited(self) -> int | None:
        return self.proc.poll()

    def _fail(self, what: str) -> ServerError:
        # first line: what happened and the log's last line (a traceback's exception); then more context
        tail = log_tail(self.spec.log_path)
        last = tail.splitlines()[-1].strip() if tail else "(empty log)"
        return ServerError(f"{what}: {last}\n--- last lines of {self.spec.log_path} ---\n{tail}")

    def wait_ready(self) -> float:
        """Seconds until GET /health gave 200; ServerError if the server exits or the timeout passes."""
        t0 = time.monotonic()
        deadline = t0 + self.spec.ready_timeout_s
        url = f"{self.spec.base_url}/health"
        with httpx.Client(timeout=5.0) as http:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    raise self._fail(f"server exited with code {rc} before it was ready")
                try:
                    if http.get(url).status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() >= deadline:
                    raise self._fail(f"server not ready after {self.spec.ready_timeout_s:.0f} s")
                time.sleep(POLL_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # not reaped yet, so its group id is still its own: workers it spawned go too
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group id is the server's pid (start_new_session)
        except ProcessLookupError:
            pass

"""Rendering the chat templates that requests bring along, in worker processes with limits.

A request's template is code from the client. The jinja sandbox keeps it away from Python internals,
but not from looping 10^10 times, building a 10 GB string or computing 10**10**10 -- and a Python
thread running such a template cannot be stopped. A process can: each worker runs under an
address-space limit (RLIMIT_AS: a huge string fails with MemoryError inside the worker) and a CPU-time
limit per render (RLIMIT_CPU: the kernel ends a runaway worker even if this server died meanwhile),
and is killed when a render runs past the time limit; a fresh worker replaces it. Workers start on
first use and are reused, so a render costs one pipe round trip, not a process start.

Run as a module, this file is the worker: it reads one JSON job per line on stdin and answers one JSON
line on stdout ({"text": ...} or {"error": ...}).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

_READY = b"ready\n"


class TemplateSandbox:
    """Renders untrusted templates in up to `workers` processes at once. `render` raises ValueError
    (with a message fit for a 400) for template errors and for templates that exceed a limit."""

    def __init__(self, timeout_s: float = 5.0, memory_bytes: int = 1 << 30, max_chars: int = 16 << 20,
                 workers: int = 2) -> None:
        if timeout_s <= 0:
            raise ValueError("the chat template time limit must be > 0 seconds")
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_chars = max_chars
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[asyncio.subprocess.Process] = []

    async def render(self, source: str, context: dict[str, Any]) -> str:
        job = (json.dumps({"source": source, "context": context}) + "\n").encode()
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start_worker()
            try:
                worker.stdin.write(job)
                await worker.stdin.drain()
                line = await asyncio.wait_for(worker.stdout.readline(), self.timeout_s)
            except asyncio.TimeoutError:
                await _kill(worker)
                raise ValueError(f"the chat template did not finish within {self.timeout_s:g} s") from None
            except BaseException:  # cancelled or a broken pipe: the worker may be mid-render, never reuse it
                await _kill(worker)
                raise
            if not line.endswith(b"\n"):  # the worker died: killed by a limit, or out of memory
                await _kill(worker)
                raise ValueError("the chat template exceeded the sandbox's CPU or memory limit")
            self._idle.append(worker)
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["text"]

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for worker in idle:
            await _kill(worker)

    async def _start_worker(self) -> asyncio.subprocess.Process:
        # The worker must import this very copy of conserve, whatever put it on our sys.path.
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                        os.environ.get("PYTHONPATH")]))}
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conserve.server.template_sandbox", str(self.memory_bytes),
            str(self.timeout_s), str(self.max_chars), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=8 * self.max_chars + 4096)
        try:  # start-up (interpreter, jinja import) does not count against a render's time limit
            ready = await asyncio.wait_for(worker.stdout.readline(), 60)
        except BaseException:
            await _kill(worker)
            raise
        if ready != _READY:
            await _kill(worker)
            raise RuntimeError("the chat template sandbox process did not start")
        return worker


async def _kill(worker: asyncio.subprocess.Process) -> None:
    if worker.returncode is None:
        worker.kill()
    await worker.wait()


# -- the worker process --------------------------------------------------------------------------------
def _worker_main(memory_bytes: int, timeout_s: float, max_chars: int) -> None:
    import resource

    from conserve.chat_template import render

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    out = sys.stdout.buffer
    out.write(_READY)
    out.flush()
    for line in sys.stdin.buffer:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(used.ru_utime + used.ru_stime + timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft if cpu_hard == resource.RLIM_INFINITY
                                                 else min(soft, cpu_hard), cpu_hard))
        try:
            job = json.loads(line)
            text = render(job["source"], job["context"])
            reply = ({"text": text} if len(text) <= max_chars else
                     {"error": f"the chat template rendered {len(text)} characters; the limit is {max_chars}"})
        except ValueError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": "the chat template exceeded the sandbox's memory limit"}
        except Exception as e:  # noqa: BLE001 - anything a template can provoke is the template's error
            reply = {"error": f"chat template error: {type(e).__name__}: {e}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))

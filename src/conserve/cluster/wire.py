"""What crosses from an engine replica to the ingress besides stats. Pure Python (the ingress has no
torch): a request's answer is Accepted (it reached the replica), then a Head, then, when it streams,
its SSE lines as strings."""

from __future__ import annotations

from dataclasses import dataclass

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Accepted:
    """The request reached the replica. Until then it may be sent to another one: it has not begun."""


@dataclass
class Head:
    status: int
    body: dict | None = None  # the whole JSON answer (None: SSE lines follow)
    headers: dict[str, str] | None = None  # e.g. Retry-After on 429 and 503

    @property
    def streams(self) -> bool:
        return self.body is None


@dataclass
class EngineFault:
    """A batch line's answer when the replica's engine failed under it: no answer, run it again."""

    message: str

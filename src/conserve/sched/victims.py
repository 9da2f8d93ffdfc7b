"""Which running request gives up its KV blocks when a request needs blocks and none are free.

Only requests not yet scheduled in the current iteration are candidates (the requester itself
included): what is already in the plan stays in it. Among offline requests the latest deadline gives
way first (requests without a deadline before any with one), so that preemption keeps the earliest
deadline first order the queues follow. Pure Python.
"""

from __future__ import annotations

from collections.abc import Collection

from conserve.request import Request, RequestStatus


def choose_victim(policy: str, requester: Request, running: list[Request], scheduled: Collection[str]
                  ) -> Request | None:
    candidates = [r for r in running if r.request_id not in scheduled]
    admitting = requester.status is not RequestStatus.RUNNING
    if policy == "fcfs":
        # vLLM's default: the most recently admitted request recomputes later; arrivals never preempt.
        return None if admitting or not candidates else candidates[-1]
    if policy in ("priority", "sarathi"):
        # vLLM's priority policy: the lowest class, latest arrival; arrivals never preempt.
        if admitting or not candidates:
            return None
        return max(candidates, key=lambda r: (not r.is_online, r.deadline_key, r.arrival_seq))
    # conserve: online requests take blocks from offline ones, least progress (least work lost) first;
    # online requests are never preempted for offline ones.
    offline = [r for r in candidates if not r.is_online]
    if requester.is_online:
        if offline:
            return min(offline, key=_offline_victim_key)
        online = [r for r in candidates if r.is_online]
        return None if admitting or not online else max(online, key=lambda r: r.arrival_seq)
    if admitting or not offline:
        return None
    return min(offline, key=_offline_victim_key)


def _offline_victim_key(r: Request) -> tuple[float, int, int]:
    # Latest deadline first; then least progress (least work lost), latest arrival.
    return -r.deadline_key, r.num_computed_tokens, -r.arrival_seq

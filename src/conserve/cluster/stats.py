"""What an engine replica reports to the ingress a few times a second, and when its online objectives
are at risk. Pure Python: the ingress never imports torch.

The report carries the replica's latency model (its current fit, correction folded in), so the ingress
predicts a newcomer's prefill there exactly as the replica's own admission control would.
"""

from __future__ import annotations

from dataclasses import dataclass

from conserve.sched.latency_model import LatencyModel

# Online objectives are at risk, and a replica takes no offline work, when the online prompts already
# waiting there are predicted to take this share of the TTFT objective to prefill...
RISK_TTFT_SHARE = 0.5
# ...or one step of the online decodes running there is predicted to take this share of the TBT
# objective (the scheduler plans online iterations to the objective minus 10%: nothing is left over).
RISK_TBT_SHARE = 0.9


@dataclass
class ReplicaStats:
    name: str  # the replica's deployment, e.g. engine-0
    pid: int
    node: str  # IP address of its machine
    started_at: float  # when its process started (unix seconds): a new value means Ray restarted it
    serving: bool  # its engine takes requests (not restarting after a fault, not dead)
    slo_ttft_s: float
    slo_tbt_s: float
    chunk_tokens: int  # --max-num-batched-tokens: prompts prefill in chunks of this size
    latency_model: LatencyModel | None = None
    online_waiting: int = 0  # online requests waiting for their first token
    online_queue_s: float = 0.0  # their predicted prefill time (admission control's sum)
    online_running: int = 0
    online_step_s: float = 0.0  # predicted time of one step of the online decodes running now
    offline_capacity: float = 0.0  # offline tokens/s it could harvest now (predicted, whatever runs)
    offline_requests: int = 0  # offline requests in its engine, running or waiting

    @property
    def at_risk(self) -> str | None:
        """Why its online objectives are at risk ("ttft" or "tbt"), None when they are not."""
        return online_risk(self.online_queue_s, self.online_step_s, self.slo_ttft_s, self.slo_tbt_s)


def online_risk(queue_s: float, step_s: float, slo_ttft_s: float, slo_tbt_s: float) -> str | None:
    if queue_s > RISK_TTFT_SHARE * slo_ttft_s:
        return "ttft"
    if step_s > RISK_TBT_SHARE * slo_tbt_s:
        return "tbt"
    return None

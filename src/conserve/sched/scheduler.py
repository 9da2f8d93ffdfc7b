"""The iteration scheduler: which requests run this iteration, and how many tokens each. Pure Python.

Every iteration is planned in phases:
1. running online requests: decodes first, then unfinished prefill chunks;
2. waiting online requests (new arrivals, preempted ones);
3. running offline requests, then waiting offline ones, each earliest deadline first (EDF: a batch
   line's deadline is its batch's created_at + completion_window; flex requests have none and go last),
   arrival order among equal deadlines.
With `fcfs` there are no classes: one pass over everything in arrival order. `priority` and
`sarathi` keep the phases under a fixed token budget. `conserve` sizes every step with the latency
model: online decodes always run; online prefill is chunked so the running online decodes keep their
TBT; offline work is added only while the predicted iteration time stays under the TBT objective
over the measured tail of the model's error (error_tail.py; a fixed margin until measured), or, with
no online work in the iteration, while it raises the predicted throughput
and stays under max_iteration_s. A starvation guard runs some offline work at least every few
iterations. When KV blocks run out, victims are chosen by `victims.choose_victim`.
"""

from __future__ import annotations

import bisect
import itertools

from conserve.errors import RequestError
from conserve.kv.kv_manager import KVCacheManager
from conserve.request import Request, RequestStatus
from conserve.sched.config import SchedulerConfig
from conserve.sched.error_tail import ErrorTail
from conserve.sched.latency_model import LatencyModel, decode_batch
from conserve.sched.output import SchedulerOutput
from conserve.sched.plan import IterationPlan, best_throughput_chunk, largest_fitting
from conserve.sched.victims import choose_victim


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 latency_model: LatencyModel | None = None, offload=None) -> None:
        if config.policy == "conserve" and latency_model is None:
            raise ValueError("the conserve scheduler needs a latency model (conserve profile)")
        self.config = config
        self.kv = kv
        self.latency_model = latency_model
        # Host KV tier (kv/offload.py), or None: preempted requests recompute.
        self.offload = offload
        self.num_preemptions = 0
        self.num_tokens_recomputed = 0  # committed tokens lost at preemption, computed again later
        self.waiting: list[Request] = []  # sorted by _queue_key
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._iterations_without_offline = 0
        # Requests of an iteration stopped between layers (Engine keeps its state): they are not
        # scheduled until it resumes, and leave it only by breaking it (preemption, abort).
        self.frozen: set[str] = set()
        self.suspension_broken = False
        # Set by the engine: online requests came lately, so more may come while an offline-only
        # iteration runs; stopped, its layers then have to fit beside online iterations.
        self.online_recently = False
        # How far iterations that carried offline work beside online work ran over their prediction.
        self.fill_tail = ErrorTail(config.tbt_quantile) if config.tbt_quantile is not None else None

    # -- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        if request.max_len - 1 > capacity:
            # It would preempt itself when it outgrew the cache, and wait forever at the queue's head.
            raise RequestError(f"request {request.request_id!r} may grow to {request.max_len} tokens, more than "
                               f"the whole KV cache holds ({capacity}); lower max_tokens or raise --kv-cache-gb")
        self.requests[request.request_id] = request
        request.arrival_seq = next(self._arrivals)
        self._enqueue(request)

    def _queue_key(self, request: Request) -> tuple[int, float, int]:
        if not self.config.has_classes or request.is_online:
            return 0, 0.0, request.arrival_seq
        return 1, request.deadline_key, request.arrival_seq

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self._queue_key)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish a request from outside (abort, stop string). Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._leave_suspension(request)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self._release(request)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_online_work(self) -> bool:
        return any(r.is_online for r in self.requests.values())

    # -- a suspended iteration -----------------------------------------------------------------
    def freeze(self, requests: list[Request]) -> None:
        """Hold these requests out of scheduling while their stopped iteration is suspended."""
        self.frozen = {r.request_id for r in requests}
        self.suspension_broken = False

    def thaw(self) -> None:
        self.frozen = set()
        self.suspension_broken = False

    def _leave_suspension(self, request: Request) -> None:
        # Its blocks may be handed to others: the suspended iteration must not write into them.
        if request.request_id in self.frozen:
            self.frozen = set()
            self.suspension_broken = True

    # -- one iteration -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        plan = IterationPlan(out, self.config.max_num_batched_tokens)
        if not self.config.has_classes:
            self._schedule_running(plan, list(self.running))  # copies: both lists change as we go
            self._admit(plan, list(self.waiting))
            return out
        online_running = [r for r in self.running if r.is_online]
        self._schedule_running(plan, sorted(online_running, key=_remaining_tokens))  # decodes first
        self._admit(plan, [r for r in self.waiting if r.is_online])
        if self.frozen and plan.has_online:
            # An offline iteration is suspended: the room online work leaves goes to its remaining
            # layers (Engine._resume_in_slack), not to more offline work that would starve it.
            return out
        if self.config.policy == "conserve":
            if plan.has_online:
                plan.fill_limit_s = self._fill_limit(plan)
            else:
                plan.max_tokens = max(plan.max_tokens, self.config.max_offline_batched_tokens)
        offline_running = [r for r in self.running if not r.is_online]
        self._schedule_running(plan, sorted(offline_running, key=_deadline_then_decodes))
        # Admit offline work only when memory is not tight: nothing was preempted and no online
        # request is left waiting (the blocks would be taken back from it next iteration).
        if not out.preempted and not any(r.is_online for r in self.waiting):
            self._admit(plan, [r for r in self.waiting if not r.is_online])
        if self.config.policy == "conserve":
            self._guard_starvation(plan)
            out.filled = plan.has_online and plan.num_offline > 0
        return out

    def _schedule_running(self, plan: IterationPlan, requests: list[Request]) -> None:
        for request in requests:
            if (request.status is not RequestStatus.RUNNING or request.prefetch_job is not None
                    or request.request_id in self.frozen):
                continue  # preempted earlier in this iteration, KV still coming back, or suspended
            n = self._num_tokens(plan, request)
            if n == 0:
                if self.config.policy == "conserve":
                    continue  # a smaller step (a decode) may still fit
                break
            if self._allocate(plan, request, n):
                plan.add(request, n, self.kv.block_table(request))

    def _admit(self, plan: IterationPlan, candidates: list[Request]) -> None:
        for request in candidates:
            if len(self.running) >= self.config.max_num_seqs:
                return
            if self._resumable(request):
                if not self._resume(plan, request):
                    return
                continue
            n = self._num_tokens(plan, request)
            if n == 0:
                return
            if not self._allocate(plan, request, n):
                return  # memory: later arrivals wait behind this one
            self._start_running(request)
            plan.add(request, n, self.kv.block_table(request))

    def _resumable(self, request: Request) -> int:
        if self.offload is None or request.num_computed_tokens:
            return 0
        return self.offload.resumable_tokens(request)

    def _resume(self, plan: IterationPlan, request: Request) -> bool:
        """Bring a checkpointed request back: device blocks for its checkpoint, filled by a prefetch;
        it computes from the next iteration on, once the copy is in."""
        num_tokens = self._resumable(request)
        if not self._allocate(plan, request, num_tokens):
            return False
        self._start_running(request)
        plan.out.prefetch.append((request, num_tokens))
        return True

    def _start_running(self, request: Request) -> None:
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # -- how many tokens -----------------------------------------------------------------------
    def _num_tokens(self, plan: IterationPlan, request: Request) -> int:
        remaining = min(request.num_tokens - request.num_computed_tokens, plan.tokens_left)
        if remaining <= 0:
            return 0
        config = self.config
        if config.policy != "conserve":
            return min(remaining, config.fixed_budget - plan.shape.tokens)
        model, start = self.latency_model, request.num_computed_tokens
        is_decode = remaining == 1 and start + 1 == request.num_tokens
        if request.is_online:
            if is_decode:
                return 1  # online decodes always run
            limit = config.tbt_limit_s if plan.has_online_decode else config.max_iteration_s
            n = largest_fitting(model, plan.shape, start, remaining, limit)
            if plan.num_online_prefills == 0:  # the first online prefill always progresses
                n = max(n, min(remaining, config.min_chunk))
            return n
        if plan.has_online:
            return largest_fitting(model, plan.shape, start, remaining, plan.fill_limit_s)
        # No online work: the size the latency model says runs most efficiently, within the
        # offline iteration bound (see SchedulerConfig.offline_iteration_s).
        limit = config.offline_iteration_s or config.max_iteration_s
        if config.offline_iteration_s and self.online_recently:
            limit = self._recent_online_limit(limit)
        largest = largest_fitting(model, plan.shape, start, remaining, limit)
        if plan.shape.tokens == 0 and largest == 0:
            return min(remaining, config.min_chunk)  # an iteration always makes progress
        if is_decode:
            return largest  # one more row of a batch raises its throughput whenever it fits
        n = best_throughput_chunk(model, plan.shape, start, largest)
        if start == 0 and n < request.num_tokens and plan.shape.tokens:
            # Splitting a fresh prompt where the bound falls makes its tail attend through a mask
            # later (~1.7x a causal prompt's attention): it starts whole in the next iteration.
            return 0
        return n

    def tbt_fill_limit_s(self) -> float:
        """The predicted time offline work may raise an iteration with online work to: the TBT
        objective over the tbt_quantile of measured/predicted on such iterations (so that quantile of
        them stays under the objective), or the objective less the fixed margin until enough were seen."""
        factor = self.fill_tail.factor() if self.fill_tail is not None else None
        return self.config.tbt_limit_s if factor is None else self.config.slo_tbt_s / factor

    def _fill_limit(self, plan: IterationPlan) -> float:
        """How long offline work may make an iteration whose online part is planned: tbt_fill_limit_s,
        and with max_online_slowdown, that multiple of the online part."""
        limit = self.tbt_fill_limit_s()
        slowdown = self.config.max_online_slowdown
        if slowdown is not None:
            limit = min(limit, slowdown * self.latency_model.predict(plan.shape))
        return limit

    def _recent_online_limit(self, limit: float) -> float:
        """Offline-only iterations while online requests came lately: if one is stopped, its layers
        run in the room online iterations leave (Engine._resume_in_slack). Without a slowdown bound
        that room is about half the TBT objective; with one, it is the slowdown's share of the
        cheapest online iteration (one short decode), and one safepoint interval must fit it."""
        slowdown = self.config.max_online_slowdown
        if slowdown is None:
            return limit / 2
        room = (slowdown - 1) * self.latency_model.predict(decode_batch(1, 1))
        return min(limit, room * self.config.num_layer_groups)

    def _guard_starvation(self, plan: IterationPlan) -> None:
        """If offline work was left out starvation_iterations times in a row, run a little of it: as
        much as fits the TBT objective itself (the margin is what it spends), or else one token (the
        one iteration in starvation_iterations that may overshoot, by one token's cost)."""
        offline = [r for r in self.running if not r.is_online and r.prefetch_job is None
                   and r.request_id not in self.frozen]
        offline += [r for r in self.waiting if not r.is_online and not self._resumable(r)]
        if plan.num_offline or plan.out.prefetch or not offline:
            self._iterations_without_offline = 0
            return
        self._iterations_without_offline += 1
        if self._iterations_without_offline < self.config.starvation_iterations:
            return
        request = min(offline, key=lambda r: r.deadline_key)  # the first of the earliest deadline
        waiting = request.status is not RequestStatus.RUNNING
        if waiting and len(self.running) >= self.config.max_num_seqs:
            return
        if not plan.has_online:
            limit = self.config.max_iteration_s
        elif self.config.max_online_slowdown is None:
            limit = self.config.slo_tbt_s  # the objective itself: its margin is what the guard spends
        else:
            limit = plan.fill_limit_s
        remaining = min(request.num_tokens - request.num_computed_tokens, self.config.min_chunk)
        n = largest_fitting(self.latency_model, plan.shape, request.num_computed_tokens, remaining, limit)
        n = max(n, 1)
        if self._allocate(plan, request, n):
            if waiting:
                self._start_running(request)
            plan.add(request, n, self.kv.block_table(request))
            self._iterations_without_offline = 0

    # -- memory --------------------------------------------------------------------------------
    def _allocate(self, plan: IterationPlan, request: Request, n: int) -> bool:
        """Give the request blocks for n more tokens, preempting victims if the policy allows."""
        while not self.kv.allocate(request, n):
            # A suspended iteration's requests are the last resort: taking one discards its work.
            victim = choose_victim(self.config.policy, request, self.running, plan.ids | self.frozen)
            if victim is None and self.frozen:
                victim = choose_victim(self.config.policy, request, self.running, plan.ids)
            if victim is None:
                return False
            self._preempt(victim, plan.out)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self._leave_suspension(request)
        kept = 0
        if self.offload is not None and not request.is_online:
            self.offload.on_preempt(request, self.evictable)
            kept = self.offload.resumable_tokens(request)
        self.kv.free(request)  # copies still in flight hold their own references to these blocks
        self.num_preemptions += 1
        self.num_tokens_recomputed += max(0, request.num_computed_tokens - kept)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._enqueue(request)
        out.preempted.append(request)

    def evictable(self) -> list[Request]:
        """Requests whose host checkpoints may be dropped for space: the preempted offline ones."""
        return [r for r in self.waiting if not r.is_online]

    def _release(self, request: Request) -> None:
        self.kv.free(request)
        if self.offload is not None:
            self.offload.drop(request)

    # -- after the iteration -------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Commit an executed iteration: advance computed tokens, append sampled tokens, finish.

        Returns the requests that finished on a token-level condition (EOS, stop id, length).
        """
        finished = []
        for s in out.scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_token(token)
            if request.check_stop():
                self.running.remove(request)
                self.requests.pop(request.request_id, None)
                self._release(request)
                finished.append(request)
        return finished


def _remaining_tokens(request: Request) -> bool:
    """Sort key: decodes (one token to compute) before prefill chunks, stable otherwise."""
    return request.num_tokens - request.num_computed_tokens != 1


def _deadline_then_decodes(request: Request) -> tuple[float, bool]:
    """Sort key of running offline work: earliest deadline first, then decodes before prefill chunks."""
    return request.deadline_key, _remaining_tokens(request)

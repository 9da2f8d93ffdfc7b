"""The co-serving (conserve) scheduler, driven by a fake runner and a fake latency model: no torch.

The fake latency model is T = 10 ms + 1 ms per token + 1 us per decode read; with a 100 ms TBT
objective and a 10% margin, iterations with online work must be predicted at <= 90 ms.
"""

import random

import pytest

from conserve.kv.kv_manager import KVCacheManager
from conserve.request import Request, RequestClass, RequestStatus
from conserve.sampling_params import SamplingParams
from conserve.sched.config import SchedulerConfig
from conserve.sched.latency_model import LatencyModel
from conserve.sched.scheduler import Scheduler

MODEL = LatencyModel([0.010, 0.001, 0.0, 1e-6, 0.0, 0.0])  # 1, P, P², D, R, P·D
ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE


def make(policy="conserve", blocks=4096, block_size=4, **kw):
    kv = KVCacheManager(blocks, block_size)
    config = SchedulerConfig(policy=policy, max_model_len=100_000, **kw)
    return Scheduler(config, kv, MODEL), kv


def req(rid, prompt_len, max_tokens, cls=ONLINE):
    return Request(rid, [(7 * i + len(rid)) % 97 + 1 for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_class=cls)


def next_token(request):
    """The fake model: the next token is a function of the whole sequence so far, as with greedy decoding."""
    return (sum(request.token_ids) * 31 + request.num_tokens) % 1000 + 1


def step(sched):
    out = sched.schedule()
    sampled = {s.request.request_id: next_token(s.request) for s in out.scheduled if s.samples}
    finished = sched.update(out, sampled)
    return out, finished


def alone(prompt_len, max_tokens, rid):
    """The output a request gets when it runs by itself."""
    sched, _ = make()
    r = req(rid, prompt_len, max_tokens)
    sched.add_request(r)
    while sched.has_unfinished():
        step(sched)
    return r.output_token_ids


def online_part(out):
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled if s.request.is_online]


def test_the_conserve_policy_needs_a_latency_model():
    with pytest.raises(ValueError, match="latency model"):
        Scheduler(SchedulerConfig(), KVCacheManager(16, 4))


def test_online_decodes_always_run_even_beyond_the_objective():
    sched, _ = make()
    reqs = [req(f"on{i}", 4, 50) for i in range(150)]  # 150 decodes: ~160 ms predicted, over the TBT
    for r in reqs:
        sched.add_request(r)
    while any(r.num_output_tokens == 0 for r in reqs):
        step(sched)
    out, _ = step(sched)
    assert {s.request.request_id for s in out.scheduled} == {r.request_id for r in reqs}
    assert all(s.num_new_tokens == 1 for s in out.scheduled)


def test_online_prefill_is_chunked_to_keep_running_decodes_within_the_objective():
    sched, _ = make()
    decoding = req("dec", 4, 100)
    sched.add_request(decoding)
    step(sched)
    long = req("long", 400, 2)
    sched.add_request(long)
    while long.num_output_tokens == 0:
        out, _ = step(sched)
        assert MODEL.predict(out.shape) <= sched.config.tbt_limit_s + 1e-9
        assert ("dec", 1) in online_part(out)
    # Without running decodes, an online prefill is not held to the TBT objective.
    sched2, _ = make()
    sched2.add_request(req("long", 400, 2))
    out, _ = step(sched2)
    assert out.num_tokens == 400


def random_workload(seed, n_online=12, n_offline=20):
    """Online arrivals at given iterations, offline requests all present from the start."""
    rng = random.Random(seed)
    online = [(rng.randrange(0, 60), req(f"on{i}", rng.randrange(2, 200), rng.randrange(1, 30)))
              for i in range(n_online)]
    offline = [req(f"off{i}", rng.randrange(2, 300), rng.randrange(1, 40), OFFLINE) for i in range(n_offline)]
    return online, offline


def drive(sched, online, offline, check=None, limit=5000):
    """Run to completion; return each iteration's online part."""
    for r in offline:
        sched.add_request(r)
    schedule = []
    it = 0
    while sched.has_unfinished() or any(at >= it for at, _ in online):
        for at, r in online:
            if at == it:
                sched.add_request(r)
        out, _ = step(sched)
        if check:
            check(out)
        schedule.append(online_part(out))
        it += 1
        assert it < limit, "the workload did not finish"
    return schedule


@pytest.mark.parametrize("seed", range(5))
def test_offline_never_pushes_an_online_iteration_over_the_objective(seed):
    sched, kv = make()
    online, offline = random_workload(seed)
    limit = sched.config.tbt_limit_s
    stats = {"online_iters_with_offline": 0}

    def check(out):
        has_online = any(s.request.is_online for s in out.scheduled)
        offline_tokens = sum(s.num_new_tokens for s in out.scheduled if not s.request.is_online)
        if not has_online or not offline_tokens:
            return
        stats["online_iters_with_offline"] += 1
        predicted = MODEL.predict(out.shape)
        # Offline work joins an online iteration only under the limit; the starvation guard may add
        # one token beyond the objective, once in starvation_iterations.
        assert predicted <= limit + 1e-9 or offline_tokens == 1 or predicted <= sched.config.slo_tbt_s + 1e-9

    drive(sched, online, offline, check)
    assert stats["online_iters_with_offline"] > 0  # co-serving did happen
    assert kv.num_free_blocks == 4096


@pytest.mark.parametrize("seed", range(5))
def test_offline_load_does_not_change_the_online_schedule(seed):
    """The online requests' tokens per iteration are the same with and without offline work."""
    online, offline = random_workload(seed)
    sched, _ = make()
    with_offline = drive(sched, online, offline)
    online2, _ = random_workload(seed)
    sched2, _ = make()
    alone_schedule = drive(sched2, online2, [])
    n = len(alone_schedule)
    assert with_offline[:n] == alone_schedule
    assert all(not part for part in with_offline[n:])
    # And every request's output is what it gets running alone.
    for (_, r), (_, r2) in zip(online, online2):
        assert r.output_token_ids == r2.output_token_ids


def test_offline_fills_idle_iterations_up_to_the_iteration_bound():
    sched, _ = make(max_num_batched_tokens=4096)
    offline = [req(f"off{i}", 20, 50, OFFLINE) for i in range(300)]
    for r in offline:
        sched.add_request(r)
    sizes = []
    for _ in range(30):
        out, _ = step(sched)
        assert MODEL.predict(out.shape) <= sched.config.max_iteration_s + 1e-9
        sizes.append(out.num_tokens)
    # With only a fixed cost and a linear per-token cost, bigger is always better: batches grow to the bound.
    assert max(sizes) >= 0.9 * (sched.config.max_iteration_s - 0.010) / 0.001


def test_offline_prefill_is_sized_for_throughput_without_online_work():
    # A strongly superlinear cost (P² term): the best-throughput chunk is near sqrt(a/d) = 100 tokens.
    model = LatencyModel([0.010, 0.0, 1e-6, 0.0, 0.0, 0.0])
    kv = KVCacheManager(4096, 4)
    sched = Scheduler(SchedulerConfig(policy="conserve", max_model_len=100_000), kv, model)
    sched.add_request(req("off", 1000, 1, OFFLINE))
    out, _ = step(sched)
    assert 50 <= out.num_tokens <= 200


def test_offline_progress_never_stops_for_good():
    sched, _ = make(starvation_iterations=4)
    online = [req(f"on{i}", 4, 10_000) for i in range(100)]  # ~110 ms of decodes: no room at all
    off = req("off", 8, 3, OFFLINE)
    for r in online:
        sched.add_request(r)
    sched.add_request(off)
    for _ in range(200):
        step(sched)
        if off.is_finished:
            break
    assert off.is_finished
    assert off.output_token_ids == alone(8, 3, "off")


def test_memory_pressure_preempts_offline_least_progress_first_and_they_resume():
    # 40 blocks of 4 tokens = 160 token slots. Two offline requests hold most of them.
    sched, kv = make(blocks=40)
    big = req("off-big", 60, 30, OFFLINE)
    small = req("off-small", 40, 30, OFFLINE)
    sched.add_request(big)
    sched.add_request(small)
    for _ in range(3):
        step(sched)
    assert big.num_computed_tokens > small.num_computed_tokens > 0
    on = req("on", 60, 20)
    sched.add_request(on)
    out, _ = step(sched)
    assert [r.request_id for r in out.preempted][0] == "off-small"  # least progress first
    assert all(not r.is_online for r in out.preempted)
    assert ("on", 60) in online_part(out)
    while sched.has_unfinished():
        out, _ = step(sched)
        assert all(not r.is_online for r in out.preempted)  # online is never preempted for offline
    assert small.num_preemptions >= 1
    assert on.output_token_ids == alone(60, 20, "on")
    assert big.output_token_ids == alone(60, 30, "off-big")
    assert small.output_token_ids == alone(40, 30, "off-small")
    assert kv.num_free_blocks == 40


def test_offline_never_takes_blocks_from_online():
    # 20 blocks of 4: the online request grows to 60 tokens (15 blocks), the offline one to 50 (13).
    sched, kv = make(blocks=20)
    on = req("on", 30, 30)
    sched.add_request(on)
    step(sched)
    off = req("off", 20, 30, OFFLINE)
    sched.add_request(off)
    while not on.is_finished:
        out, _ = step(sched)
        assert on.status is not RequestStatus.PREEMPTED
        assert on not in out.preempted
    while sched.has_unfinished():
        step(sched)
    assert off.num_preemptions >= 1
    assert off.output_token_ids == alone(20, 30, "off")


def test_sarathi_uses_a_fixed_token_budget_and_fcfs_ignores_classes():
    sched, _ = make(policy="sarathi", token_budget=32)
    sched.add_request(req("off", 100, 2, OFFLINE))
    sched.add_request(req("on", 100, 2))
    out, _ = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("on", 32)]
    fcfs, _ = make(policy="fcfs", max_num_batched_tokens=32)
    fcfs.add_request(req("off", 100, 2, OFFLINE))
    fcfs.add_request(req("on", 100, 2))
    out, _ = step(fcfs)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("off", 32)]


def test_priority_preempts_the_lowest_class_latest_arrival():
    sched, _ = make(policy="priority", blocks=30, max_num_batched_tokens=256)
    off1, off2 = req("off1", 40, 30, OFFLINE), req("off2", 30, 30, OFFLINE)
    on = req("on", 30, 30)
    for r in (off1, off2):
        sched.add_request(r)
    step(sched)
    sched.add_request(on)
    preempted = []
    while sched.has_unfinished():
        out, _ = step(sched)
        preempted += [r.request_id for r in out.preempted]
    assert preempted and "on" not in preempted
    assert on.output_token_ids == alone(30, 30, "on")


def test_offline_only_iterations_grow_past_the_online_budget_to_the_offline_bounds():
    # Linear cost: bigger is always more efficient. With layer-wise stops an arrival waits one
    # safepoint interval, not the iteration, so offline-only iterations grow to offline_iteration_s
    # (here 3 s: ~2990 tokens) or the offline token cap, far past max_num_batched_tokens, in whole
    # prompts: a fresh prompt is not split where the bound falls unless it is the first.
    for cap, expected in ((2048, 2000), (8192, 2000), (600, 600)):
        sched, _ = make(max_num_batched_tokens=512, max_offline_batched_tokens=cap, offline_iteration_s=3.0)
        for i in range(8):
            sched.add_request(req(f"off{i}", 1000, 4, OFFLINE))
        out, _ = step(sched)
        assert out.num_tokens == expected
        assert MODEL.predict(out.shape) <= 3.0
    # Online requests came lately: a stopped iteration would have to resume beside them, layer by
    # layer in their iterations' room, so offline-only iterations take half the time.
    sched, _ = make(max_num_batched_tokens=512, offline_iteration_s=3.0)
    sched.online_recently = True
    for i in range(8):
        sched.add_request(req(f"off{i}", 1000, 4, OFFLINE))
    out, _ = step(sched)
    assert out.num_tokens == 1000
    sched, _ = make(max_num_batched_tokens=512)
    sched.add_request(req("on", 1000, 4))
    for i in range(8):
        sched.add_request(req(f"off{i}", 1000, 4, OFFLINE))
    out, _ = step(sched)
    assert out.num_tokens <= 512  # with online work, the ordinary budget holds


def test_frozen_requests_are_not_scheduled_and_leaving_breaks_the_suspension():
    sched, _ = make(offline_iteration_s=3.0)
    a, b = req("a", 40, 5, OFFLINE), req("b", 40, 5, OFFLINE)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert {s.request.request_id for s in out.scheduled} == {"a", "b"}
    sched.freeze([a])
    out = sched.schedule()  # planned, not committed: b runs alone while a's iteration is suspended
    assert [s.request.request_id for s in out.scheduled] == ["b"]
    sched.update(out, {})
    sched.add_request(req("on", 8, 2))
    out = sched.schedule()  # beside online work, the suspended iteration's layers take the room left
    assert [s.request.request_id for s in out.scheduled] == ["on"]
    sched.update(out, {})
    assert not sched.suspension_broken
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.suspension_broken and not sched.frozen


def test_memory_victims_spare_a_suspended_iteration_while_others_can_give_blocks():
    sched, kv = make(blocks=40, block_size=4)
    frozen, other = req("frozen", 60, 50, OFFLINE), req("other", 20, 50, OFFLINE)
    sched.add_request(frozen)
    sched.add_request(other)
    step(sched)
    sched.freeze([frozen])
    sched.add_request(req("on", 90, 2))  # 23 blocks: the 20 free ones and some of other's 5
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["other"]
    assert not sched.suspension_broken


@pytest.mark.parametrize("slowdown", [None, 1.2])
@pytest.mark.parametrize("seed", range(6))
def test_admitted_offline_work_finishes_within_a_bound_under_any_online_load_below_capacity(seed, slowdown):
    """The progress guarantee: whatever the online arrivals, an admitted offline request advances at
    least one token every starvation_iterations iterations, so W tokens of work finish within
    W * starvation_iterations iterations. Online load here ranges from light to nearly saturating
    bursts, with idle gaps of random length."""
    rng = random.Random(seed)
    k = 4
    sched, _ = make(starvation_iterations=k, offline_iteration_s=3.0, max_online_slowdown=slowdown)
    off = req("off", 30, 20, OFFLINE)
    sched.add_request(off)
    bound = (30 + 20) * k
    n_online = 0
    for iteration in range(bound):
        if rng.random() < rng.choice((0.05, 0.3, 0.9)):  # arrivals: a few decoders or a burst of them
            for _ in range(rng.randint(1, 60)):
                sched.add_request(req(f"on{n_online}", rng.randint(4, 200), rng.randint(1, 40)))
                n_online += 1
        step(sched)
        if off.is_finished:
            break
    assert off.is_finished, f"offline request not done after {bound} iterations"
    assert off.output_token_ids == alone(30, 20, "off")


@pytest.mark.parametrize("seed", range(5))
def test_a_slowdown_bound_keeps_online_iterations_near_their_online_only_time(seed):
    """--max-online-slowdown 1.2: offline work joins an iteration with online work only while the
    prediction stays within 1.2x its online part (and the TBT objective); the starvation guard may add
    one token. The online schedule itself is the one it gets without offline work."""
    sched, _ = make(max_online_slowdown=1.2)
    online, offline = random_workload(seed)
    stats = {"filled": 0}

    def check(out):
        online_shape = type(out)(scheduled=[s for s in out.scheduled if s.request.is_online]).shape
        offline_tokens = sum(s.num_new_tokens for s in out.scheduled if not s.request.is_online)
        if not online_shape.tokens or not offline_tokens:
            return
        stats["filled"] += 1
        assert MODEL.predict(out.shape) <= 1.2 * MODEL.predict(online_shape) + 1e-9 or offline_tokens == 1

    with_offline = drive(sched, online, offline, check)
    online2, _ = random_workload(seed)
    alone_schedule = drive(make(max_online_slowdown=1.2)[0], online2, [])
    assert with_offline[:len(alone_schedule)] == alone_schedule
    assert stats["filled"] > 0  # offline work did ride along in online iterations


def test_with_a_slowdown_bound_recent_online_traffic_shrinks_offline_only_iterations():
    # One safepoint interval of an offline-only iteration must fit the room a short online step
    # leaves: 0.2 x 11 ms (one decode: 10 ms + 1 ms) per interval, 30 intervals -> ~66 ms, ~56 tokens.
    sched, _ = make(max_num_batched_tokens=512, offline_iteration_s=3.0, max_online_slowdown=1.2,
                    num_layer_groups=30)
    sched.online_recently = True
    sched.add_request(req("off", 1000, 4, OFFLINE))
    out, _ = step(sched)
    assert MODEL.predict(out.shape) <= 0.2 * 0.011 * 30 + 1e-9
    assert out.num_tokens >= 50
    sched.online_recently = False  # no online traffic lately: full-size offline iterations again
    out, _ = step(sched)
    assert out.num_tokens > 500


def test_the_slowdown_bound_must_allow_online_work_itself():
    with pytest.raises(ValueError, match="max_online_slowdown"):
        SchedulerConfig(max_online_slowdown=0.9)


def noisy_seconds(out, index):
    """A fake runner whose iterations run at the prediction, except every 10th (a tenth of them) at 1.4x."""
    return MODEL.predict(out.shape) * (1.4 if index % 10 == 9 else 1.0)


@pytest.mark.parametrize("quantile, most_over", [(0.99, 0.0), (None, 0.05)])
@pytest.mark.parametrize("seed", range(3))
def test_offline_fill_is_planned_against_the_measured_error_tail(seed, quantile, most_over):
    """With --tbt-quantile, iterations that carry offline work beside online work feed their measured /
    predicted time back, and the fill limit becomes the objective over that quantile: here 100 ms / 1.4,
    so no filled iteration runs over the objective even at 1.4x its prediction. With the fixed 10%
    margin (off), a tenth of them would (90 ms x 1.4 = 126 ms)."""
    sched, _ = make(tbt_quantile=quantile)
    rng = random.Random(seed)
    # A steady online stream (an arrival every 8 iterations, 20-30 tokens out: online decodes in most
    # iterations) beside long offline requests.
    online = [(8 * i, req(f"on{i}", rng.randrange(2, 60), rng.randrange(20, 30))) for i in range(120)]
    offline = [req(f"off{i}", rng.randrange(200, 400), 100, OFFLINE) for i in range(30)]
    stats = {"filled": 0, "over": 0, "index": 0}

    def run(out):
        seconds = noisy_seconds(out, stats["index"])
        stats["index"] += 1
        online_tokens = any(s.request.is_online for s in out.scheduled)
        offline_tokens = sum(s.num_new_tokens for s in out.scheduled if not s.request.is_online)
        assert out.filled == (online_tokens and offline_tokens > 0)
        if not out.filled:
            return
        if sched.fill_tail is not None:
            sched.fill_tail.observe(seconds, MODEL.predict(out.shape))
        stats["filled"] += 1
        # Count the co-served iterations over the objective once the tail has been measured.
        stats["over"] += stats["filled"] > 64 and seconds > sched.config.slo_tbt_s + 1e-9

    drive(sched, online, offline, run, limit=20000)
    assert stats["filled"] > 200
    assert stats["over"] <= most_over * stats["filled"]
    if quantile is None:
        assert sched.tbt_fill_limit_s() == pytest.approx(0.09)
        assert stats["over"] > 0  # the fixed margin does not cover this machine's tail
    else:
        assert sched.tbt_fill_limit_s() == pytest.approx(0.1 / 1.4)


def test_the_fill_limit_keeps_the_fixed_margin_until_enough_iterations_were_measured():
    sched, _ = make()
    assert sched.tbt_fill_limit_s() == pytest.approx(0.09)
    for _ in range(64):
        sched.fill_tail.observe(0.08, 0.1)  # this machine runs co-served iterations faster than predicted
    assert sched.tbt_fill_limit_s() == pytest.approx(0.1 / 0.8)
    with pytest.raises(ValueError, match="tbt_quantile"):
        SchedulerConfig(tbt_quantile=1.0)

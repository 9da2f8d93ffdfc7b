"""Continuous batching basics (fcfs and priority policies) driven by a fake runner: no torch, milliseconds."""

from conserve.kv.kv_manager import KVCacheManager
from conserve.request import Request, RequestStatus
from conserve.sampling_params import SamplingParams
from conserve.sched.config import SchedulerConfig
from conserve.sched.output import SchedulerOutput
from conserve.sched.scheduler import Scheduler

EOS = 0


def make(budget=64, blocks=64, block_size=4, max_seqs=16, policy="fcfs"):
    kv = KVCacheManager(blocks, block_size)
    config = SchedulerConfig(policy=policy, max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=4096)
    return Scheduler(config, kv), kv


def req(rid, prompt_len, max_tokens=4, **kw):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=(EOS,))


def run_step(sched, token_of=lambda r: 7):
    """One iteration with a fake runner that samples token_of(request) where a chunk reaches the end."""
    out = sched.schedule()
    sampled = {s.request.request_id: token_of(s.request) for s in out.scheduled if s.samples}
    finished = sched.update(out, sampled)
    return out, finished


def test_long_prompt_is_prefilled_in_chunks_within_budget():
    sched, _ = make(budget=32)
    r = req("a", 100, max_tokens=2)
    sched.add_request(r)
    chunks = []
    while r.num_output_tokens == 0:
        out, _ = run_step(sched)
        chunks.append([(s.num_new_tokens, s.samples) for s in out.scheduled])
    assert chunks == [[(32, False)], [(32, False)], [(32, False)], [(4, True)]]
    assert r.num_computed_tokens == 100 and r.num_tokens == 101


def test_decodes_and_prefill_chunks_share_an_iteration():
    sched, _ = make(budget=16)
    a = req("a", 4, max_tokens=10)
    sched.add_request(a)
    run_step(sched)  # a prefilled, one token out
    b = req("b", 40, max_tokens=2)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 15)]
    assert out.num_tokens <= 16


def test_finishes_on_max_tokens_and_eos_and_frees_blocks():
    sched, kv = make()
    a = req("a", 5, max_tokens=3)
    b = req("b", 5, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    done = {}

    def token_of(r):
        return EOS if r.request_id == "b" and r.num_output_tokens == 1 else 7

    while sched.has_unfinished():
        _, finished = run_step(sched, token_of)
        done.update({r.request_id: r for r in finished})
    assert done["a"].status is RequestStatus.FINISHED_LENGTH and done["a"].output_token_ids == [7, 7, 7]
    assert done["b"].status is RequestStatus.FINISHED_STOPPED and done["b"].output_token_ids == [7, EOS]
    assert kv.num_free_blocks == 64


def test_ignore_eos_and_stop_token_ids_and_min_tokens():
    sched, _ = make()
    a = req("a", 3, max_tokens=3, ignore_eos=True)
    b = req("b", 3, max_tokens=5, stop_token_ids=[9])
    c = req("c", 3, max_tokens=5, min_tokens=2)
    for r in (a, b, c):
        sched.add_request(r)
    tokens = {"a": [EOS, EOS, EOS], "b": [7, 9, 7], "c": [EOS, EOS, 7]}
    while sched.has_unfinished():
        run_step(sched, token_of=lambda r: tokens[r.request_id][r.num_output_tokens])
    assert a.status is RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 3
    assert b.status is RequestStatus.FINISHED_STOPPED and b.stop_reason == 9
    # min_tokens: the first EOS does not end it, the second (at 2 outputs) does.
    assert c.status is RequestStatus.FINISHED_STOPPED and c.output_token_ids == [EOS, EOS]


def test_max_num_seqs_caps_running_requests():
    sched, _ = make(max_seqs=2)
    for i in range(4):
        sched.add_request(req(str(i), 3, max_tokens=5))
    out, _ = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_memory_pressure_preempts_newest_and_it_resumes_by_recompute():
    # 6 blocks of 4 tokens: two requests of 8-token prompts growing to 14 tokens cannot both fit.
    sched, kv = make(blocks=6, block_size=4)
    a, b = req("a", 8, max_tokens=6), req("b", 8, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    steps = 0
    while sched.has_unfinished():
        out, _ = run_step(sched, token_of=lambda r: 10 + r.num_output_tokens)
        preempted += [r.request_id for r in out.preempted]
        assert sum(len(kv.block_table(r)) for r in (a, b)) <= 6
        steps += 1
        assert steps < 100
    assert preempted and set(preempted) == {"b"}  # the newer request yields, the older runs on
    assert b.num_preemptions >= 1
    # Recompute keeps every token already generated; both finish with the full sequence.
    assert a.output_token_ids == b.output_token_ids == [10, 11, 12, 13, 14, 15]
    assert kv.num_free_blocks == 6


def test_abort_removes_request_and_frees_blocks():
    sched, kv = make()
    a = req("a", 10, max_tokens=50)
    sched.add_request(a)
    run_step(sched)
    assert kv.num_free_blocks < 64
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished() and kv.num_free_blocks == 64
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    out = sched.schedule()
    assert out.is_empty


def test_recompute_after_preemption_schedules_whole_sequence_again():
    sched, _ = make(blocks=4, block_size=4, budget=64)
    a = req("a", 6, max_tokens=8)
    sched.add_request(a)
    run_step(sched)
    run_step(sched)
    assert a.num_computed_tokens == 7 and a.num_tokens == 8
    sched._preempt(a, SchedulerOutput())
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled] == [("a", 8, True)]


def test_online_requests_wait_ahead_of_offline_ones():
    from conserve.request import RequestClass

    sched, _ = make(max_seqs=1, policy="priority")
    offline = [Request(f"off{i}", [1, 2], SamplingParams(max_tokens=1), request_class=RequestClass.OFFLINE)
               for i in range(2)]
    for r in offline:
        sched.add_request(r)
    sched.add_request(req("on", 2, max_tokens=1))
    assert [r.request_id for r in sched.waiting] == ["on", "off0", "off1"]


def test_fcfs_admits_every_waiting_request_that_fits_in_one_iteration():
    sched, _ = make(budget=64)
    for i in range(5):
        sched.add_request(req(str(i), 4, max_tokens=2))
    out, _ = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["0", "1", "2", "3", "4"]
    assert not sched.waiting


def test_request_that_could_outgrow_the_whole_kv_cache_is_refused_not_queued_forever():
    import pytest

    from conserve.errors import RequestError

    sched, _ = make(blocks=4, block_size=4)  # 16 tokens in all
    with pytest.raises(RequestError, match="whole KV cache"):
        sched.add_request(req("big", 10, max_tokens=8))  # may grow to 18
    assert not sched.has_unfinished()
    fits = req("fits", 10, max_tokens=7, ignore_eos=True)  # 17 tokens: the last one is never computed
    sched.add_request(fits)
    while sched.has_unfinished():
        run_step(sched)
    assert fits.num_tokens == 17

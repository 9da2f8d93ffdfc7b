"""Host-tier checkpointing, swap and prefetch with the co-serving scheduler, on a fake KV store: no torch.

The fake device and host caches hold, per slot, which (request, position, token) was written there.
The fake runner checks every context slot it reads before it "computes", so a block handed to
another request before its host copy completed, a prefetch that did not land, a prefetch that read a
checkpoint before it landed, or a stale checkpoint all show up as a wrong read. The fake copier copies
only when it completes, `lag` polls after the job was submitted or later: a slow copier. With
`shuffled`, jobs complete in random order and at random times after their lag, as copies on a GPU do
(a prefetch still completes after the checkpoints it was told to wait for, as a device queue orders it).
"""

import random

import pytest

from conserve.kv.copy_job import CopyJob
from conserve.kv.host_kv_manager import HostKVManager
from conserve.kv.kv_manager import KVCacheManager
from conserve.kv.offload import Offloader
from conserve.request import Request, RequestClass
from conserve.sampling_params import SamplingParams
from conserve.sched.config import SchedulerConfig
from conserve.sched.latency_model import LatencyModel
from conserve.sched.scheduler import Scheduler

MODEL = LatencyModel([0.010, 0.001, 0.0, 1e-6, 0.0, 0.0])
BS = 4


class FakeCopier:
    def __init__(self, device, host, lag, shuffled=False, whole_blocks=False):
        self.device, self.host, self.lag = device, host, lag
        self.whole_blocks = whole_blocks  # copy every slot of the blocks touched, as the block copier does
        self.rng = random.Random(11) if shuffled else None
        self.queue = []  # [job, polls seen]

    def submit(self, job):
        self.queue.append([job, 0])

    def _complete(self, job):
        for dep in job.after:  # the device queue runs these first
            if not dep.done.is_set():
                self._complete(dep)
        self.queue = [e for e in self.queue if e[0] is not job]
        for seg in job.segments:
            span = seg.block_span(BS)
            for p in range(span.start * BS, span.stop * BS) if self.whole_blocks else range(seg.start, seg.end):
                d = seg.device_blocks[p // BS] * BS + p % BS
                h = seg.host_blocks[p // BS] * BS + p % BS
                if job.kind == "checkpoint":
                    self.host[h] = self.device.get(d)
                else:
                    self.device[d] = self.host.get(h)
        job.done.set()

    def poll(self):
        for entry in self.queue:
            entry[1] += 1
        if self.rng is None:
            while self.queue and self.queue[0][1] >= self.lag:
                self._complete(self.queue.pop(0)[0])
            return
        due = [e[0] for e in self.queue if e[1] >= self.lag and self.rng.random() < 0.5]
        self.rng.shuffle(due)
        for job in due:
            if not job.done.is_set():
                self._complete(job)

    def wait(self, job):
        if not job.done.is_set():
            self._complete(job)


def token_after(request):
    return (sum(request.token_ids) * 31 + request.num_tokens) % 1000 + 1


class Harness:
    def __init__(self, mode, device_blocks=40, host_blocks=400, lag=3, shuffled=False, whole_blocks=False):
        self.device, self.host = {}, {}
        self.kv = KVCacheManager(device_blocks, BS)
        self.copier = FakeCopier(self.device, self.host, lag, shuffled, whole_blocks)
        self.offload = None
        if mode != "recompute":
            self.offload = Offloader(mode, HostKVManager(host_blocks, BS), self.kv, self.copier, bytes_per_token=10,
                                     whole_blocks=whole_blocks)
        self.sched = Scheduler(SchedulerConfig(max_model_len=10_000), self.kv, MODEL, self.offload)

    def step(self):
        if self.offload:
            self.offload.poll()
        out = self.sched.schedule()
        for request, n in out.prefetch:
            self.offload.prefetch(request, n)
        sampled = {}
        for s in out.scheduled:
            r, table = s.request, s.block_table
            for p in range(s.start):  # the context this chunk attends to
                got = self.device.get(table[p // BS] * BS + p % BS)
                assert got == (r.request_id, p, r.token_ids[p]), f"{r.request_id} read {got} at position {p}"
            for p in range(s.start, s.start + s.num_new_tokens):
                self.device[table[p // BS] * BS + p % BS] = (r.request_id, p, r.token_ids[p])
            if s.samples:
                sampled[r.request_id] = token_after(r)
        self.sched.update(out, sampled)
        if self.offload:
            self.offload.checkpoint([r for r in self.sched.running if not r.is_online], self.sched.evictable)
        return out


def req(rid, prompt_len, max_tokens, cls):
    return Request(rid, [(13 * i + len(rid) * 7) % 500 + 1 for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_class=cls)


def expected(prompt_len, max_tokens, rid):
    h = Harness("recompute", device_blocks=1000)
    r = req(rid, prompt_len, max_tokens, RequestClass.OFFLINE)
    h.sched.add_request(r)
    while h.sched.has_unfinished():
        h.step()
    return r.output_token_ids


CHURN_CASES = [(mode, lag, False, False) for mode in ("checkpoint", "swap", "recompute") for lag in (0, 3)]
# Copies completing late and out of order, token by token and in whole blocks (the GPU's copier).
CHURN_CASES += [(mode, lag, True, whole) for mode in ("checkpoint", "swap") for lag in (1, 4) for whole in (False, True)]


@pytest.mark.parametrize("mode,lag,shuffled,whole_blocks", CHURN_CASES)
def test_churn_keeps_every_output_exact_and_never_reads_a_reused_block(mode, lag, shuffled, whole_blocks):
    rng = random.Random(7)
    h = Harness(mode, lag=lag, shuffled=shuffled, whole_blocks=whole_blocks)
    offline = [req(f"off{i}", rng.randrange(10, 60), rng.randrange(5, 40), RequestClass.OFFLINE) for i in range(8)]
    specs = {r.request_id: (r.num_prompt_tokens, r.sampling_params.max_tokens) for r in offline}
    for r in offline:
        h.sched.add_request(r)
    online = []
    for it in range(3000):
        if it % 4 == 0 and len(online) < 30:  # an online arrival every few iterations
            r = req(f"on{len(online)}", rng.randrange(20, 70), rng.randrange(2, 12), RequestClass.ONLINE)
            online.append(r)
            specs[r.request_id] = (r.num_prompt_tokens, r.sampling_params.max_tokens)
            h.sched.add_request(r)
        h.step()
        if not h.sched.has_unfinished() and len(online) == 30:
            break
    assert not h.sched.has_unfinished()
    assert sum(r.num_preemptions for r in offline) >= 5  # there was churn
    for r in offline + online:
        assert r.output_token_ids == expected(*specs[r.request_id], r.request_id), r.request_id
    if h.offload:
        h.offload.wait_all()
        assert h.offload.host.pool.num_free == h.offload.host.pool.num_blocks
    assert h.kv.num_free_blocks == h.kv.pool.num_blocks
    if mode == "checkpoint":
        # Resumes came from the host: less recomputed than committed-then-lost.
        assert h.offload.stats.bytes_prefetched > 0
        if not shuffled:  # copies that land late leave more to recompute
            assert h.sched.num_tokens_recomputed < sum(r.num_prompt_tokens for r in offline)


def test_a_block_with_a_copy_in_flight_is_not_handed_out_until_the_copy_lands():
    h = Harness("checkpoint", device_blocks=6, lag=10**9)  # the copier never finishes on its own
    off = req("off", 12, 8, RequestClass.OFFLINE)  # 3 blocks after prefill, 5 at the end
    h.sched.add_request(off)
    h.step()  # prefill; its checkpoint is now in flight
    blocks = list(h.kv.block_table(off))
    job = h.offload._in_flight[0]
    on = req("on", 16, 4, RequestClass.ONLINE)  # needs 4 blocks, 3 are free: off must be preempted
    h.sched.add_request(on)
    for _ in range(3):
        out = h.step()
        # Off's blocks are still referenced by the copy: nobody gets them, the online request waits.
        assert off.num_preemptions == 1 and not h.kv.block_table(on)
        assert all(h.kv.pool.ref_count(b) == 1 for b in blocks)
    h.copier.wait(job)
    out = h.step()
    assert ("on", 16) in [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
    h.copier.lag = 0
    while h.sched.has_unfinished():
        h.step()
    assert on.output_token_ids == expected(16, 4, "on")
    assert off.output_token_ids == expected(12, 8, "off")


def test_host_full_drops_oldest_checkpoints_and_those_requests_recompute():
    h = Harness("checkpoint", device_blocks=30, host_blocks=12, lag=0)
    offline = [req(f"off{i}", 30, 20, RequestClass.OFFLINE) for i in range(4)]
    for r in offline:
        h.sched.add_request(r)
    for it in range(400):
        if it in (3, 6, 9):
            h.sched.add_request(req(f"on{it}", 50, 10, RequestClass.ONLINE))
        h.step()
        if not h.sched.has_unfinished():
            break
    assert not h.sched.has_unfinished()
    assert h.sched.num_tokens_recomputed > 0
    for r in offline:
        assert r.output_token_ids == expected(30, 20, r.request_id)


def decode_until(h, request, num_computed):
    while request.num_computed_tokens < num_computed:
        h.step()


def test_only_a_landed_contiguous_prefix_of_the_checkpoint_is_resumable():
    h = Harness("checkpoint", lag=10**9, shuffled=True)  # nothing lands unless the test says so
    off = req("off", 12, 8, RequestClass.OFFLINE)
    h.sched.add_request(off)
    decode_until(h, off, 12)
    first = h.offload._in_flight[0]  # [0, 12)
    assert h.offload.resumable_tokens(off) == 0  # issued is not landed
    h.copier.wait(first)
    h.offload.poll()
    assert h.offload.resumable_tokens(off) == 12
    decode_until(h, off, 17)
    *block3, last = h.offload._in_flight  # [12, 13) ... [15, 16) in host block 3, [16, 17) in block 4
    assert last.after == []  # a different block: nothing orders it
    h.copier.wait(last)  # the later one lands first
    h.offload.poll()
    assert h.offload.resumable_tokens(off) == 12  # positions 12-15 are not on the host yet
    h.copier.wait(block3[-1])
    h.offload.poll()
    assert h.offload.resumable_tokens(off) == 17


def test_a_copy_is_ordered_after_copies_in_flight_on_the_same_host_blocks():
    h = Harness("checkpoint", lag=10**9, shuffled=True)
    off = req("off", 10, 8, RequestClass.OFFLINE)
    h.sched.add_request(off)
    decode_until(h, off, 10)
    first = h.offload._in_flight[0]  # [0, 10): host blocks 0-2, the last one partly
    decode_until(h, off, 11)
    tail = h.offload._in_flight[1]  # [10, 11): the same host block 2
    assert tail.after == [first]
    h.copier.wait(tail)  # the device runs the earlier copy first
    assert first.done.is_set()
    h.offload.poll()
    h.offload.prefetch(off, 10)
    reader = off.prefetch_job
    assert reader.after == []  # nothing in flight on its blocks any more
    writer = CopyJob("checkpoint", [h.offload._segment(off, 10, 11)])
    h.offload._submit(writer)
    assert writer.after == [reader]  # no write under a read in flight


def test_whole_blocks_checkpoint_full_blocks_and_the_partial_one_at_preemption():
    h = Harness("checkpoint", lag=0, whole_blocks=True)
    off = req("off", 10, 8, RequestClass.OFFLINE)
    h.sched.add_request(off)
    decode_until(h, off, 10)
    h.offload.poll()
    assert off.num_checkpoint_issued == 8 and h.offload.resumable_tokens(off) == 8
    h.offload.on_preempt(off, h.sched.evictable)  # the partial block [8, 10) goes too
    assert off.num_checkpoint_issued == 10
    h.offload.poll()
    h.offload.poll()
    assert h.offload.resumable_tokens(off) == 10

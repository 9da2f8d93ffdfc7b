"""The block copier on a device that runs behind the host (tests/late_queue.py): every tensor its queued
ops touch stays alive until the job's event, jobs complete in any order, and a prefetch told to wait
for a checkpoint reads what that checkpoint wrote."""

import gc
import random

import torch

from conserve.kv.block_copier import BlockCopier, BlockHostCache
from conserve.kv.copy_job import CopyJob, Segment
from conserve.model.attention import KVCache
from conserve.request import Request
from conserve.sampling_params import SamplingParams
from late_queue import LateQueue

BS = 4


def setup(num_blocks=12, host_blocks=12):
    kv = KVCache(3, num_blocks, BS, 2, 8, torch.float32, torch.device("cpu"))
    kv.store.copy_(torch.randn(kv.store.shape, generator=torch.Generator().manual_seed(0)))
    queue = LateQueue()
    host = BlockHostCache(kv, host_blocks, queue)
    return kv, host, BlockCopier(kv, host, queue), queue


def job(kind, device_blocks, host_blocks):
    r = Request("r", [1], SamplingParams())
    return CopyJob(kind, [Segment(r, 0, len(device_blocks) * BS, device_blocks, host_blocks, 0)])


def block(kv, b):
    return kv.block_view()[b].clone()


def test_queued_ops_keep_their_tensors_until_the_event_and_jobs_complete_in_any_order():
    kv, host, copier, queue = setup()
    before = {b: block(kv, b) for b in range(6)}
    jobs = [job("checkpoint", [0, 1], [5, 6]), job("checkpoint", [2], [0]), job("checkpoint", [3, 4, 5], [9, 1, 2])]
    for j in jobs:
        copier.submit(j)
    gc.collect()  # whatever the copier did not keep is gone now
    queue.complete_all(random.Random(3))
    copier.poll()
    assert all(j.done.is_set() for j in jobs)
    for j in jobs:
        seg = j.segments[0]
        for d, h in zip(seg.device_blocks, seg.host_blocks):
            assert torch.equal(host.blocks[h], before[d])
    back = [job("prefetch", [7, 8], [5, 6]), job("prefetch", [10, 11, 9], [9, 1, 2])]
    for j in back:
        copier.submit(j)
    gc.collect()
    queue.complete_all(random.Random(4))
    copier.poll()
    for new, old in [(7, 0), (8, 1), (10, 3), (11, 4), (9, 5)]:
        assert torch.equal(block(kv, new), before[old])


def test_a_job_is_done_only_when_its_event_has_completed_and_then_lets_go_of_its_buffers():
    kv, host, copier, queue = setup()
    first, second = job("checkpoint", [0], [0]), job("checkpoint", [1], [1])
    copier.submit(first)
    copier.submit(second)
    copier.poll()
    assert not first.done.is_set() and not second.done.is_set()
    queue.complete(queue.events[1])  # the later job lands first
    copier.poll()
    assert second.done.is_set() and not first.done.is_set()
    copier.wait(first)
    assert first.done.is_set() and not copier._pending


def test_a_prefetch_queued_after_a_checkpoint_reads_what_it_wrote():
    kv, host, copier, queue = setup()
    original = block(kv, 2)
    checkpoint = job("checkpoint", [2], [7])
    copier.submit(checkpoint)
    prefetch = job("prefetch", [9], [7])
    prefetch.after = [checkpoint]
    copier.submit(prefetch)
    queue.complete(queue.events[1])  # the device picks the prefetch first: it must wait for the checkpoint
    copier.poll()
    assert checkpoint.done.is_set() and prefetch.done.is_set()
    assert torch.equal(block(kv, 9), original)

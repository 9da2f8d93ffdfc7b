import pytest

from conserve.kv.block_pool import BlockPool
from conserve.kv.kv_manager import KVCacheManager, blocks_needed
from conserve.request import Request
from conserve.sampling_params import SamplingParams


def test_allocate_and_free_return_blocks():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free == 1  # a failed allocation takes nothing
    pool.free(a)
    assert pool.num_free == 4


def test_shared_block_is_free_only_after_last_reference():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.share([b])
    assert pool.ref_count(b) == 2
    pool.free([b])
    assert pool.num_free == 1
    pool.free([b])
    assert pool.num_free == 2


def test_double_free_and_sharing_free_block_are_errors():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError):
        pool.free([b])
    with pytest.raises(ValueError):
        pool.share([b])


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_manager_grows_table_only_when_a_block_fills():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = Request("a", [1, 2, 3], SamplingParams())
    assert kv.allocate(r, 3)
    assert len(kv.block_table(r)) == 1
    r.num_computed_tokens = 3
    assert kv.allocate(r, 1)  # position 3 still fits in block 0
    assert len(kv.block_table(r)) == 1
    r.num_computed_tokens = 4
    assert kv.allocate(r, 1)
    assert len(kv.block_table(r)) == 2
    kv.free(r)
    assert kv.num_free_blocks == 8 and kv.block_table(r) == []


def test_manager_refuses_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = Request("a", list(range(9)), SamplingParams())
    assert not kv.allocate(r, 9)
    assert kv.num_free_blocks == 2

"""How many KV blocks the device cache gets, and the longest sequence they can hold. Pure Python.

A sequence that outgrows the whole cache could never run: it would preempt itself forever and block
every request behind it. So max_model_len never exceeds the cache's capacity: a length the user asked
for is refused, the model's own (default) length is clamped with a warning, as vLLM does.
"""

from __future__ import annotations

import logging
import os

from conserve.errors import ConserveError

log = logging.getLogger(__name__)

# Share of the memory available at start-up that an automatically sized CPU KV cache takes: the
# rest stays for the process's activations, the host KV tier, other processes and the page cache.
AUTO_CPU_FRACTION = 0.25
# On a GPU (vLLM's --gpu-memory-utilization): the engine may fill this fraction of the device's total
# memory; the KV cache gets it less what is in use when it is sized (the weights, other processes)
# and an estimate of one large iteration's activations.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


class KVCapacityError(ConserveError, ValueError):
    """The configured max_model_len does not fit in the configured KV cache."""


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def auto_kv_bytes(free_bytes: int, fraction: float, bytes_per_token: int, max_model_len: int,
                  max_num_seqs: int) -> int:
    """A share of free memory, but no more than max_num_seqs full-length sequences can use."""
    return int(min(free_bytes * fraction, bytes_per_token * max_model_len * max_num_seqs))


def gpu_kv_bytes(total_bytes: int, utilization: float, in_use_bytes: int, activation_bytes: int) -> int:
    """The KV cache's share of a GPU: utilization x total, less what is in use and the activations."""
    kv = int(total_bytes * utilization - in_use_bytes - activation_bytes)
    if kv <= 0:
        raise KVCapacityError(
            f"--gpu-memory-utilization {utilization:g} leaves no room for the KV cache: {total_bytes / 2**30:.1f} "
            f"GiB x {utilization:g} minus {in_use_bytes / 2**30:.1f} GiB in use (weights, other processes) and "
            f"~{activation_bytes / 2**30:.1f} GiB of activations. Raise it, or set --kv-cache-gb.")
    return kv


def activation_bytes(hidden: int, intermediate: int, qkv_width: int, vocab: int, tokens: int, logit_rows: int,
                     dtype_bytes: int) -> int:
    """An estimate of the peak activations of an iteration of `tokens` tokens sampling `logit_rows` rows:
    the float32 residual stream and its normed copy, the q/k/v and gate/up outputs and the MLP product in
    the model dtype, and the sampler's float32 [rows, vocab] tensors (logits, probabilities, sorted,
    noise), with a quarter on top for the allocator's rounding and temporaries."""
    per_token = 3 * hidden * 4 + (qkv_width + 3 * intermediate + hidden) * dtype_bytes
    sampler = 4 * logit_rows * vocab * 4
    return int(1.25 * (tokens * per_token + sampler))


def num_blocks_for(kv_bytes: float, bytes_per_block: int) -> int:
    return max(1, int(kv_bytes // bytes_per_block))


def fit_max_model_len(requested: int | None, model_len: int, num_blocks: int, block_size: int) -> int:
    """The max_model_len to serve with. requested: what the user set (None: the model's own length).

    The KV cache holds a sequence's computed tokens, at most max_model_len - 1 (the last sampled
    token is never computed); requiring the full max_model_len keeps the rule simple."""
    capacity = num_blocks * block_size
    wanted = requested if requested is not None else model_len
    if wanted <= capacity:
        return wanted
    if requested is not None:
        raise KVCapacityError(
            f"max_model_len {requested} is more than the KV cache holds: {capacity} tokens ({num_blocks} blocks "
            f"of {block_size}). Raise --kv-cache-gb (or --num-kv-blocks), or lower --max-model-len to {capacity}.")
    log.warning("the model's context length %d is more than the KV cache holds (%d tokens in %d blocks); "
                "serving with max_model_len %d (raise --kv-cache-gb for longer sequences)",
                model_len, capacity, num_blocks, capacity)
    return capacity

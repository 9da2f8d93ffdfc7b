"""Turn logits into tokens: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Every step is one batched computation over the rows that need it: the parameters become columns, and
which steps run at all is decided from the parameters on the host (never from device values, which
would make the host wait). The one sync is the final `tolist()` of the tokens.

Randomness is counter-based: each row draws one uniform number, a hash of (its request's seed, the
position of the token being sampled), and takes the token where it falls in the row's cumulative
distribution. A seeded request draws the same tokens whatever else shares the batch, with no per-row
generator, no per-row kernel and one random number per row (not per vocabulary entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conserve.model import logits_ops
from conserve.outputs import TokenLogprobs
from conserve.sampling_params import SamplingParams
from conserve.uploads import Uploader

# splitmix64's constants, as signed 64-bit integers.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int | None  # None for greedy rows
    position: int = 0  # which output token of its request this is (the noise counter)
    banned_token_ids: list[int] = field(default_factory=list)  # e.g. EOS before min_tokens


def sample(logits: torch.Tensor, rows: list[SamplingRow], uploads: Uploader | None = None,
           fused: bool = False) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [N, vocab] float32, one row per SamplingRow. Returns tokens and per-row logprobs.
    fused: take the greedy argmax through logits_ops.py's CPU kernel (same result, ~10x faster)."""
    uploads = uploads or Uploader(logits.device)
    banned = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids]
    if banned:
        at_rows, at_tokens = uploads.upload([[i for i, _ in banned], [t for _, t in banned]])
        # The value is filled on the device: a Python scalar would be copied from pageable memory.
        logits = logits.index_put((at_rows, at_tokens), torch.full((), float("-inf"), device=logits.device))
    tokens = logits_ops.argmax_rows(logits, fused)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        picked = [rows[i] for i in random_rows]
        idx = uploads.one(random_rows)
        tokens[idx] = _sample_random(logits[idx], picked, uploads)
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, rows, token_list, uploads)


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow], uploads: Uploader) -> torch.Tensor:
    vocab = logits.shape[1]
    params = [r.params for r in rows]
    temps, top_ps, min_ps = uploads.upload([[p.temperature for p in params], [p.top_p for p in params],
                                            [p.min_p for p in params]], torch.float32)
    seeds, positions, top_ks = uploads.upload([[r.seed for r in rows], [r.position for r in rows],
                                               [min(p.top_k, vocab) for p in params]])
    logits = logits / temps.unsqueeze(1)
    if any(p.top_k for p in params):
        k_max = min(max(p.top_k for p in params), vocab)
        kth = logits.topk(k_max, dim=-1).values.gather(1, (top_ks - 1).clamp(min=0).unsqueeze(1))
        cut = torch.where(top_ks.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < cut, float("-inf"))
    probs = logits.softmax(dim=-1)
    if any(p.top_p < 1.0 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already reach top_p.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_ps.unsqueeze(1)
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    if any(p.min_p > 0 for p in params):
        probs = probs.masked_fill(probs < min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values, 0.0)
    # Inverse CDF: the first token whose cumulative probability passes u x total (float64 sums: exact
    # enough that only a zero-probability token could be skipped, never chosen).
    cdf = probs.double().cumsum(dim=-1)
    target = (uniform(seeds, positions) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab - 1)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (int64 arithmetic wraps around)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N] float64 draws in (0, 1), a function of (seed, position) only."""
    z = _mix(_mix(seeds * _GOLDEN + 1) + positions * _GOLDEN)
    return (_shr(z, 11).double() + 0.5) * 2.0**-53  # 53 random bits


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], tokens: list[int],
              uploads: Uploader) -> list[TokenLogprobs | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    idx, chosen_ids = uploads.upload([wanted, [tokens[i] for i in wanted]])
    lp = logits[idx].log_softmax(dim=-1)
    k = max(rows[i].params.logprobs for i in wanted)
    top_v, top_i = lp.topk(max(k, 1), dim=-1)
    chosen = lp.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
    top_v, top_i, chosen = top_v.tolist(), top_i.tolist(), chosen.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        out[i] = TokenLogprobs(tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out

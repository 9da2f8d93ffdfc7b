"""Turn logits into tokens: greedy, temperature, top-k, top-p, min-p, per-request seeded generators."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conserve.outputs import TokenLogprobs
from conserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    banned_token_ids: list[int] = field(default_factory=list)  # e.g. EOS before min_tokens


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [N, vocab] float32, one row per SamplingRow. Returns tokens and per-row logprobs."""
    banned = [(i, r.banned_token_ids) for i, r in enumerate(rows) if r.banned_token_ids]
    if banned:
        logits = logits.clone()
        for i, ids in banned:
            logits[i, ids] = float("-inf")
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _sample_random(logits[idx], [rows[i] for i in random_rows])
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, rows, token_list)


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    logits = logits / temps.unsqueeze(1)
    top_ks = [r.params.top_k for r in rows]
    if any(top_ks):
        k_max = max(top_ks)
        kth = logits.topk(min(k_max, logits.shape[1]), dim=-1).values
        cut = torch.stack([kth[i, min(k, kth.shape[1]) - 1] if k else kth.new_tensor(float("-inf"))
                           for i, k in enumerate(top_ks)])
        logits = logits.masked_fill(logits < cut.unsqueeze(1), float("-inf"))
    probs = logits.softmax(dim=-1)
    top_ps = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    if (top_ps < 1.0).any():
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already reach top_p.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_ps.unsqueeze(1)
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    min_ps = torch.tensor([r.params.min_p for r in rows], device=logits.device)
    if (min_ps > 0).any():
        probs = probs.masked_fill(probs < min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values, 0.0)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each row uses its own generator
    # so a seeded request samples the same tokens whatever else shares the batch.
    noise = torch.empty_like(probs)
    for i, r in enumerate(rows):
        noise[i].exponential_(generator=r.generator)
    return (probs / noise).argmax(dim=-1)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], tokens: list[int]) -> list[TokenLogprobs | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    idx = torch.tensor(wanted, device=logits.device)
    lp = logits[idx].log_softmax(dim=-1)
    k = max(rows[i].params.logprobs for i in wanted)
    top_v, top_i = lp.topk(max(k, 1), dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device)).squeeze(1)
    top_v, top_i, chosen = top_v.tolist(), top_i.tolist(), chosen.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        out[i] = TokenLogprobs(tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out

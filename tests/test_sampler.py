"""The batched sampler: each row's parameters applied in one computation for the whole batch, and a
seeded request's tokens independent of what else is in the batch."""

import json

import torch

from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.sampler import SamplingRow, sample, uniform
from conserve.sampling_params import SamplingParams

VOCAB = 64


def logits(n, seed=0):
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def row(seed, position=0, banned=(), **params):
    return SamplingRow(SamplingParams(**{"temperature": 1.0, **params}), seed, position, list(banned))


def test_a_seeded_row_samples_the_same_token_in_any_batch():
    x = logits(5)
    mine = row(1234, position=3, top_p=0.9, top_k=20)
    alone = sample(x[2:3], [mine])[0][0]
    batch = [row(1), row(7, top_k=3), mine, row(None, temperature=0), row(9, min_p=0.2)]
    assert sample(x, batch)[0][2] == alone
    shuffled = [batch[3], mine, batch[0]]
    assert sample(x[[3, 2, 0]], shuffled)[0][1] == alone


def test_seeds_and_positions_change_the_draw():
    x = torch.zeros(1, VOCAB)  # uniform: the noise alone decides
    draws = {sample(x, [row(s, p)])[0][0] for s in range(4) for p in range(4)}
    assert len(draws) > 8


def test_every_row_keeps_to_its_own_filters():
    x = logits(1, seed=1).repeat(200, 1)
    top3 = set(x[0].topk(3).indices.tolist())
    probs = x[0].softmax(-1)
    nucleus = set(torch.nonzero(probs >= probs.max() * 0.3).flatten().tolist())
    rows = [r for i in range(50) for r in (row(i, top_k=3), row(i, min_p=0.3), row(i, top_k=1),
                                             row(i, temperature=0, banned=[int(x[0].argmax())]))]
    tokens = sample(x, rows)[0]
    assert set(tokens[0::4]) <= top3 and len(set(tokens[0::4])) > 1
    assert set(tokens[1::4]) <= nucleus
    assert set(tokens[2::4]) == {int(x[0].argmax())}
    assert int(x[0].argmax()) not in tokens[3::4]


def test_the_draws_are_uniform_and_samples_follow_the_probabilities():
    seeds = torch.arange(100_000)
    u = uniform(seeds, seeds % 7)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert not torch.equal(uniform(seeds[:5], torch.zeros(5, dtype=torch.long)),
                           uniform(seeds[:5], torch.ones(5, dtype=torch.long)))
    p = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (VOCAB - 3))
    tokens = sample(p.log().repeat(3000, 1), [row(s) for s in range(3000)])[0]
    freq = torch.bincount(torch.tensor(tokens), minlength=3)[:3].float() / 3000
    assert torch.allclose(freq, p[:3], atol=0.03)


def test_a_seeded_request_gets_the_same_tokens_alone_and_in_a_batch(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "max_position_embeddings": 256}))
    engine = Engine(EngineConfig(model=str(config), load_format="dummy", dtype="float32", scheduler="fcfs",
                                 kv_cache_gb=0.01))
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=42, max_tokens=12, ignore_eos=True)

    def run(requests):
        outputs = {}
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o.outputs[0].token_ids
        return outputs

    alone = run({"a": ("tell me", seeded)})["a"]
    others = {f"o{i}": (f"other prompt {i}", SamplingParams(temperature=1.0, top_k=5, max_tokens=i + 3))
              for i in range(4)}
    assert run({**others, "b": ("tell me", seeded)})["b"] == alone

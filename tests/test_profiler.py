"""The profiler times real iterations on a tiny model and fits a usable latency model."""

import pytest

transformers = pytest.importorskip("transformers")

from test_hf_models import COMMON, write_tokenizer  # noqa: E402

from conserve.engine import Engine  # noqa: E402
from conserve.profiler import GRID_VERSION, cache_path, grid, profile  # noqa: E402
from conserve.sched.latency_model import decode_batch  # noqa: E402

pytestmark = pytest.mark.reference


def test_profile_measures_the_grid_and_fits(tmp_path):
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 4096}), dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True)
    write_tokenizer(tmp_path)
    engine = Engine(model=str(tmp_path), dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=256,
                    scheduler="fcfs")
    seen = []
    latency, report = profile(engine, quick=True, progress=lambda done, total: seen.append((done, total)))
    points = grid(256, engine.max_model_len, quick=True)
    assert seen[-1] == (len(points), len(points))
    assert 10 <= report["points"] <= len(points)  # points that do not fit the KV cache are skipped
    assert all(s["ms"] > 0 for s in report["samples"])
    assert 0 <= report["median_abs_rel_error"] <= report["max_abs_rel_error"]
    assert latency.predict(decode_batch(1, 64)) > 0
    # The profiler leaves no blocks behind.
    assert engine.kv_manager.num_free_blocks == 1024


def test_engine_profiles_on_first_start_and_reuses_the_cache(tmp_path):
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 4096}), dtype=torch.float32)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    write_tokenizer(tmp_path / "m")
    cache = tmp_path / "cache"
    first = Engine(model=str(tmp_path / "m"), dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=256,
                   latency_cache_dir=str(cache))
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and first.latency_model is not None
    again = Engine(model=str(tmp_path / "m"), dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=256,
                   latency_cache_dir=str(cache))
    assert again.latency_model.coefficients == first.latency_model.coefficients


def test_the_cache_is_kept_per_machine_and_grid(tmp_path):
    import torch

    from conserve.machine import cpu_model, isa, machine_key

    path = cache_path(tmp_path, "m", torch.float32, "cpu")
    assert machine_key() in path.name and path.name.endswith(f"-g{GRID_VERSION}.json")
    assert cpu_model() and isa()  # what the key is made of, read from this machine

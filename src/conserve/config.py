"""EngineConfig: every knob of the engine in one validated place."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from conserve.flags import Flagged, flag
from conserve.kv.offload import OFFLINE_KV_MODES
from conserve.kv.sizing import DEFAULT_GPU_MEMORY_UTILIZATION
from conserve.preemption import PREEMPTION_MODES
from conserve.sched.config import POLICIES, SchedulerConfig


def gib_or_auto(value: str) -> float | str:
    """argparse type of --kv-cache-gb."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB or 'auto', got {value!r}") from None


def quantile_or_off(value: str) -> float | None:
    """argparse type of --tbt-quantile."""
    if value == "off":
        return None
    try:
        q = float(value)
    except ValueError:
        q = -1.0
    if not 0 < q < 1:
        raise argparse.ArgumentTypeError(f"expected a quantile in (0, 1) or 'off', got {value!r}")
    return q


_S = SchedulerConfig  # the scheduler's own defaults, written once there

# Weight-only quantised matmuls (model/quant.py says what each mode quantises).
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
ATTENTION_MODES = ("auto", "kernel", "flex", "gather")
PREFILL_ATTENTION_MODES = ("auto", "kernel", "sdpa")
COMPILE_MODES = ("off", "on")
KV_COPY_UNITS = ("auto", "token", "block")
GEMM_KERNEL_MODES = ("auto", "off")
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights of the model's shape (model/dummy.py)


@dataclass
class EngineConfig(Flagged):
    """Every knob of the engine. The `flag(...)` fields are also `conserve` command-line flags (their
    help is the README's flag tables); the rest are for the Python API only."""

    FLAG_GROUPS: ClassVar[dict[str, str]] = {"engine": "engine", "coserving": "co-serving (each mechanism can be switched off)"}

    model: str | None = flag(None, "an HF directory (`config.json`, `*.safetensors`, `tokenizer.json`, "
                             "`tokenizer_config.json`, `generation_config.json`) or a GGUF file",
                             metavar="PATH", type=str, shown_default="SmolLM2-135M-Instruct")
    load_format: str = flag(
        "auto", "`auto`: read the weights of `--model`. `dummy`: random weights of its shape, nothing read but "
        "its config (vLLM's name), for benchmarks at sizes with no weights on disk; `--model` is then also "
        "a config shipped with conserve (`llama-3.1-8b`, `qwen2.5-14b`, `smollm2-135m`) or a config.json "
        "file, and the tokenizer is the model's own if it has one, else the default model's when installed "
        "and its ids fit, else one token per byte", choices=list(LOAD_FORMATS))
    dtype: str = flag("auto", "`float32`, `bfloat16`, `float16`; `auto` = bfloat16 where the CPU has native bf16 "
                      "instructions (or on CUDA), else float32", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = flag("cpu", "torch device, e.g. `cpu` or `cuda`")
    quantization: str = flag(
        "auto", "weight-only quantised matmuls (CPU) for iterations of few tokens, with bfloat16 or float32 "
        "activations (float32 ones are rounded to bfloat16 around the kernel, whose float32 path is 10-100x "
        "slower). `auto`: follow a GGUF file (Q4_0/Q4_1 projections int4 as stored, Q8_0 int8, lm_head int8 "
        "when stored quantised); HF checkpoints, and `--dtype float32` asked for by name (the exact "
        "reference path), stay dense. `int8` / `int4`: quantise every layer projection at "
        "load (int4 in 32-weight groups like Q4_1; int8 per row), lm_head int8. `none`: dense only. Dense "
        "weights are kept for larger iterations, and the tied embedding stays dense for lookups and to "
        "recompute the 8 best logits exactly; the quantised copies add ~90 MiB (int4) / ~130 MiB (int8) for "
        "SmolLM2", choices=list(QUANTIZATION_MODES))
    quant_max_tokens: int | None = flag(
        None, "largest iteration (tokens; logit rows for the lm_head) that uses the quantised weights. By "
        "default a start-up micro-benchmark times the model's own projections dense vs quantised at 1, 2, 4, "
        "... 64 tokens (about 1-2 s) and caches the cross-over per CPU model, threads, dtype and shapes in "
        "`--kernel-cache-dir`; where quantised never wins under `auto`, the quantised copies are freed",
        type=int, shown_default="measured")
    kernel_cache_dir: str = flag(str(Path.home() / ".cache/conserve/kernels"),
                                 "where measured quantised-matmul cross-overs and the built paged-attention "
                                 "kernel are cached", shown_default="`~/.cache/conserve/kernels`")
    compile: str = flag(
        "off", "`on`: the layer body (norms, projections, rotary, MLP; attention runs between its two halves) "
        "goes through torch.compile (inductor's C++ backend on CPU, Triton on CUDA), one graph for single "
        "tokens and one dynamic graph for every other size; all are compiled at start (time in the log) and "
        "inductor's caches kept in `--kernel-cache-dir`. bfloat16 weights then skip oneDNN prepacking, which "
        "compiled graphs cannot take. `off`: eager PyTorch", choices=list(COMPILE_MODES))
    attention: str = flag(
        "auto", "decode attention over the paged KV cache. `kernel`: a C++ kernel reads each request's KV "
        "blocks in place through its block table (CPU; built with the system C++ compiler at first start, "
        "~5-10 s, then cached in `--kernel-cache-dir`), so one long context costs only its own reads. "
        "`gather`: copy every decode context, padded to the longest, each layer. `auto`: on CPU the kernel where it "
        "builds, else gather; on CUDA `flex` where it compiles and agrees with plain attention at start, "
        "else gather. `flex`: FlexAttention reads each request's blocks in place through a block mask "
        "built per step (CUDA: compiled to a Triton kernel; CPU: eager, materialising scores, for "
        "checking only)", choices=list(ATTENTION_MODES))
    prefill_attention: str = flag(
        "auto", "attention of prompt chunks. `kernel`: a C++ flash-attention kernel (CPU; built at first "
        "start like `--attention kernel`; head sizes 64, 96 and 128): bfloat16 products on AVX512-BF16 (~4x "
        "torch's), float32 ones elsewhere (torch's speed). `sdpa`: torch's scaled_dot_product_attention. "
        "`auto`: the kernel for bfloat16 on CPUs with AVX512-BF16, else sdpa", choices=list(PREFILL_ATTENTION_MODES))
    gemm_kernel: str = flag(
        "auto", "`auto`: bfloat16 layer projections and the lm_head run on conserve's own matmul kernel on "
        "CPUs with AVX512-BF16 (weights packed once at load, in place of oneDNN's packing; built at first "
        "start like `--attention kernel`): 1.1-1.7x oneDNN at decode batches of 8-64 rows, equal on long "
        "prompts. `off`: oneDNN", choices=list(GEMM_KERNEL_MODES))
    fused_ops: str = flag(
        "auto", "`auto`: on CPU, the layer body's rotary embedding and RMS norms, the greedy argmax and the "
        "logits' top-k run as single-pass C++ kernels (built at first start like `--attention kernel`; with "
        "`--compile on` inductor fuses the layer body's instead). `off`: eager torch ops, for comparison",
        choices=["auto", "off"])
    int4: str | None = flag(None, "deprecated: `--int4 off` = `--quantization none`; `--int4 auto` changes "
                            "nothing", type=str, choices=["auto", "off"])
    kv_cache_gb: float | str = flag("auto", "memory for the paged KV cache, GiB; `auto` = 25% of the memory "
                                    "available at start on CPU (on CUDA: `--gpu-memory-utilization`), no more "
                                    "than `--max-num-seqs` full-length sequences can use; its pages are "
                                    "committed as blocks are first used", type=gib_or_auto)
    gpu_memory_utilization: float = flag(
        DEFAULT_GPU_MEMORY_UTILIZATION, "CUDA only (vLLM's name and meaning): the fraction of the GPU's total "
        "memory this engine may use. With `--kv-cache-gb auto` the KV cache gets that share less what is in "
        "use once the weights are loaded (weights, other processes) and an estimate of the activations of the "
        "largest iteration (`--max-num-batched-tokens` / `--max-offline-batched-tokens` tokens, `--max-num-seqs` "
        "sampled rows); start-up fails with the numbers if nothing is left. Ignored on CPU, where `auto` takes "
        "25% of the available host memory")
    num_kv_blocks: int | None = flag(None, "KV cache size in blocks (overrides `--kv-cache-gb`)", type=int)
    block_size: int = flag(16, "tokens per KV block")
    max_model_len: int | None = flag(None, "longest prompt + output; longer prompts are rejected, never truncated. "
                                     "A length the KV cache cannot hold is refused at start (the message names "
                                     "both numbers and the flags); the model's own length is lowered to what the "
                                     "cache holds, with a warning, so no sequence can outgrow the cache and stall "
                                     "the queue", type=int, shown_default="model's")
    max_num_batched_tokens: int = flag(_S.max_num_batched_tokens,
                                       "token budget of one iteration (prefill chunks + decodes)")
    max_offline_batched_tokens: int = flag(
        _S.max_offline_batched_tokens, "token cap of offline-only iterations under `--scheduler conserve`; "
        "the latency model picks the most efficient size within it")
    max_num_seqs: int = flag(_S.max_num_seqs, "most requests running at once")
    seed: int = 0  # the runner's base seed (a request's own seed overrides it)
    # Scheduling (see sched/config.py for what each policy does).
    scheduler: str = flag(
        _S.policy, "`conserve`: online decodes always run, online prefill is chunked to keep running online "
        "decodes within `--slo-tbt-ms`, offline work fills each iteration while the predicted time stays under "
        "the TBT objective (see `--tbt-quantile`), and with no online work offline batches grow to the size the latency model "
        "predicts runs most efficiently (within `--max-offline-batched-tokens`; capped by `--max-iteration-ms` "
        "only without `--preemption layer`); offline is guaranteed a little progress every 8 iterations. `fcfs`: "
        "one queue, no classes. `priority`: online before offline, preemption only when KV memory runs out "
        "(vLLM's priority policy). `sarathi`: priority with a fixed `--token-budget`",
        group="coserving", choices=list(POLICIES))
    slo_tbt_ms: float = flag(_S.slo_tbt_s * 1000, "time-between-tokens objective of online requests: "
                             "iterations with online work are planned to stay under it", group="coserving")
    tbt_quantile: float | None = flag(
        _S.tbt_quantile, "offline work beside online work is planned so that this quantile of such iterations "
        "stays under `--slo-tbt-ms`: the objective is divided by that quantile of measured/predicted time over "
        "the last 512 of them (the latency model predicts a mean; on a CPU the slow end runs ~1.5x it). "
        "`off`, and until 32 were seen: the objective less a fixed 10%", group="coserving",
        type=quantile_or_off, metavar="Q|off")
    slo_ttft_ms: float = flag(_S.slo_ttft_s * 1000, "time-to-first-token objective of online requests "
                              "(decides layer-wise preemption)", group="coserving")
    max_iteration_ms: float = flag(
        _S.max_iteration_s * 1000, "longest iteration planned when no online request runs, with `--preemption "
        "layer-restart` or `iteration` (with `layer`, an arrival stops an offline iteration at the next layer at "
        "no loss, so offline iterations are sized for throughput within `--max-offline-batched-tokens` and "
        "layers × `--slo-tbt-ms`, half that while online requests came in the last 10 s)", group="coserving")
    max_online_slowdown: float | None = flag(
        None, "online latency relative to online-only serving: offline work may make an iteration with online "
        "work at most this many times as long as its online part alone (predicted), on top of `--slo-tbt-ms`; "
        "while online requests came in the last 10 s, offline-only iterations shrink so that one safepoint "
        "interval fits that share of a short online step (e.g. 1.2; unset: only the TBT objective bounds "
        "offline work)", group="coserving", type=float, metavar="X", shown_default="off")
    token_budget: int = flag(_S.token_budget, "tokens per iteration for `--scheduler sarathi`", group="coserving")
    latency_model: str | None = flag(None, "a `conserve profile` JSON", group="coserving", type=str,
                                     metavar="PATH", shown_default="cached fit")
    latency_cache_dir: str = flag(str(Path.home() / ".cache/conserve/latency"),
                                  "where fitted latency models are cached (one per model, dtype, device, thread "
                                  "count and CPU model); a missing fit is profiled at start, about a minute",
                                  group="coserving", shown_default="`~/.cache/conserve/latency`")
    preemption: str = flag(
        "layer", "`layer`: an online arrival stops an offline-only iteration at the next safepoint between "
        "layers; the iteration is suspended (its hidden state and the KV written so far kept, its requests "
        "frozen) and resumes from that layer, alone when no online work is left or a few layers at a time in "
        "online iterations' slack under the TBT objective, so nothing computed is lost. `layer-restart`: it "
        "stops only when waiting would cost the arrival more than one TBT objective or break its TTFT "
        "objective, and is computed again later. `iteration`: it waits for the iteration to end",
        group="coserving", choices=list(PREEMPTION_MODES))
    safepoint_every: int = flag(1, "layers between safepoint checks", group="coserving")
    safepoint_lookahead: int = flag(
        1, "how many layers the host may issue ahead of the device in an iteration that can be stopped: the "
        "runner records an event after each layer and waits for the one this many layers back, so a stop "
        "lands within about this many + 1 layers of device time and safepoints read the device's progress "
        "(CUDA; on CPU a layer is done when the host returns from it, so nothing waits). 0: no events, no "
        "waits (the host runs ahead freely; stops are decided in host time)", group="coserving")
    offline_kv: str = flag(
        "checkpoint", "`checkpoint`: offline requests' new KV entries are copied to host memory after every "
        "iteration in the background, so preempting frees device blocks at once and resuming prefetches them; "
        "`swap`: copy everything at preemption, blocking; `recompute`: drop and recompute",
        group="coserving", choices=list(OFFLINE_KV_MODES))
    iteration_trace: str | None = flag(None, "append one JSON line per model run (time, duration, the latency "
                                       "model's prediction, tokens by class, context) to this file: where time "
                                       "goes when co-serving", type=str, metavar="PATH")
    kv_copy_unit: str = flag(
        "auto", "how KV moves between the device and the host tier. `block`: whole blocks, asynchronously "
        "(one gather of every layer's blocks and one copy per run of host blocks, on a side stream on CUDA, "
        "done when its event completes); only full blocks are checkpointed, so a resume recomputes at most "
        "the partial last block. `token`: each computed token once, on the engine thread (synchronous). "
        "`auto`: `block` on CUDA, `token` on CPU", group="coserving", choices=list(KV_COPY_UNITS))
    host_kv_cache_gb: float = flag(2.0, "host memory for checkpointed KV (pinned on CUDA); when full, the oldest "
                                   "checkpoints of preempted requests are dropped and those requests recompute",
                                   group="coserving")

    def __post_init__(self) -> None:
        if self.kv_cache_gb != "auto" and not (isinstance(self.kv_cache_gb, (int, float)) and self.kv_cache_gb > 0):
            raise ValueError(f"kv_cache_gb must be > 0 or 'auto', got {self.kv_cache_gb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.int4 not in (None, "auto", "off"):
            raise ValueError(f"int4 must be auto or off, got {self.int4!r}")
        if self.int4 == "off":
            if self.quantization not in ("auto", "none"):
                raise ValueError(f"int4 'off' contradicts quantization {self.quantization!r}; use quantization only")
            self.quantization = "none"
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.quant_max_tokens is not None and self.quant_max_tokens < 0:
            raise ValueError(f"quant_max_tokens must be >= 0, got {self.quant_max_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.gemm_kernel not in GEMM_KERNEL_MODES:
            raise ValueError(f"gemm_kernel must be one of {', '.join(GEMM_KERNEL_MODES)}, got {self.gemm_kernel!r}")
        if self.fused_ops not in ("auto", "off"):
            raise ValueError(f"fused_ops must be auto or off, got {self.fused_ops!r}")
        if self.prefill_attention not in PREFILL_ATTENTION_MODES:
            raise ValueError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION_MODES)}, "
                             f"got {self.prefill_attention!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption!r}")
        if self.offline_kv not in OFFLINE_KV_MODES:
            raise ValueError(f"offline_kv must be one of {', '.join(OFFLINE_KV_MODES)}, got {self.offline_kv!r}")
        if self.safepoint_lookahead < 0:
            raise ValueError(f"safepoint_lookahead must be >= 0, got {self.safepoint_lookahead}")
        if self.safepoint_every < 1:
            raise ValueError(f"safepoint_every must be >= 1, got {self.safepoint_every}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.kv_copy_unit not in KV_COPY_UNITS:
            raise ValueError(f"kv_copy_unit must be one of {', '.join(KV_COPY_UNITS)}, got {self.kv_copy_unit!r}")
        if self.host_kv_cache_gb <= 0:
            raise ValueError(f"host_kv_cache_gb must be > 0, got {self.host_kv_cache_gb}")
        self.scheduler_config(8192)  # validates the scheduling fields

    def scheduler_config(self, max_model_len: int, num_layers: int = 1) -> SchedulerConfig:
        offline_iteration_s = None
        if self.preemption == "layer" and self.scheduler == "conserve":
            # An arrival waits for at most one safepoint interval: keep that within the TBT objective.
            offline_iteration_s = self.slo_tbt_ms / 1000 * -(-num_layers // self.safepoint_every)
        return SchedulerConfig(policy=self.scheduler, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_num_seqs=self.max_num_seqs, max_model_len=max_model_len,
                               token_budget=self.token_budget, slo_ttft_s=self.slo_ttft_ms / 1000,
                               slo_tbt_s=self.slo_tbt_ms / 1000, max_iteration_s=self.max_iteration_ms / 1000,
                               max_offline_batched_tokens=self.max_offline_batched_tokens,
                               offline_iteration_s=offline_iteration_s,
                               max_online_slowdown=self.max_online_slowdown, tbt_quantile=self.tbt_quantile,
                               num_layer_groups=-(-num_layers // self.safepoint_every))


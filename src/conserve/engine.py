"""Engine: the step loop. Each step schedules, runs the model and turns new tokens into outputs."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conserve.config import EngineConfig
from conserve.detokenizer import IncrementalDetokenizer
from conserve.errors import RequestError
from conserve.kv.block_copier import BlockCopier, BlockHostCache
from conserve.kv.copier import Copier, HostKVCache
from conserve.kv.copy_queue import queue_for
from conserve.kv.host_kv_manager import HostKVManager
from conserve.kv.kv_manager import KVCacheManager, blocks_needed
from conserve.kv.offload import Offloader
from conserve.iteration_trace import IterationTrace
from conserve.kv.sizing import (
    AUTO_CPU_FRACTION,
    activation_bytes,
    auto_kv_bytes,
    available_host_bytes,
    fit_max_model_len,
    gpu_kv_bytes,
    num_blocks_for,
)
from conserve.malloc_tuning import tune_malloc
from conserve.model.gemm_kernel import PanelWeight
from conserve.model import flex_paged, layer_ops, logits_ops, paged_kernel, prefill_kernel
from conserve.model.attention import KVCache
from conserve.model.flex_paged import FlexDecode
from conserve.model.layer_body import FusedLayerBody
from conserve.model.loader import load_model
from conserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from conserve.preemption import LayerPreemption
from conserve.profiler import cache_path, profile
from conserve.request import Request, RequestClass, RequestStatus
from conserve.runner import ModelRunner, RunnerOutput, Suspended
from conserve.sampling_params import SamplingParams
from conserve.sched.latency_model import DRIFT_RATIO, DRIFT_WINDOW, LatencyModel
from conserve.sched.output import SchedulerOutput
from conserve.sched.scheduler import Scheduler
from conserve.stats import EngineStats

log = logging.getLogger(__name__)

ONLINE_RECENT_S = 10.0  # online traffic this recent sizes offline-only iterations for sharing (see sched)


@dataclass
class _Tracked:
    """Per-sequence output state: detokenizer and the logprobs gathered so far."""

    request: Request
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    parent_id: str
    index: int
    logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None


@dataclass
class _Parent:
    """A user request; with n > 1 it fans out into n sequences that finish independently."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[str]
    completions: dict[int, CompletionOutput] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt must satisfy to ever run: configuration only, so it outlives the engine it came
    from (the server validates prompts with it while a failed engine is rebuilt)."""

    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int

    def validate(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                               f"tokens (max_model_len), which leaves no room for output")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        if blocks_needed(len(ids) + 1, self.block_size) > self.num_kv_blocks:
            raise RequestError(f"the prompt has {len(ids)} tokens, more than the whole KV cache holds; "
                               f"raise --kv-cache-gb")


class Engine:
    def __init__(self, config: EngineConfig | None = None, latency_model: LatencyModel | None = None,
                 **kwargs) -> None:
        self.config = config = config or EngineConfig(**kwargs)
        tune_malloc()
        loaded = load_model(config.model, config.dtype, config.device, config.max_model_len, config.quantization,
                            config.quant_max_tokens, config.kernel_cache_dir, config.compile, config.load_format,
                            config.gemm_kernel)
        self.loaded = loaded
        if self._fused_ops():
            loaded.model.use_fused_ops()
        loaded.model.fused_logits = self._fused_logits()
        self.tokenizer = loaded.tokenizer
        c = loaded.config
        per_block = KVCache.bytes_per_block(c.num_layers, config.block_size, c.num_kv_heads, c.head_dim,
                                            loaded.model.dtype)
        num_blocks = self._num_kv_blocks(per_block, config.max_model_len or loaded.max_model_len)
        # A longer sequence could never fit: refused if the user asked for it, else clamped.
        self.max_model_len = fit_max_model_len(config.max_model_len, loaded.max_model_len, num_blocks,
                                               config.block_size)
        self.kv_cache = KVCache(c.num_layers, num_blocks, config.block_size, c.num_kv_heads, c.head_dim,
                                loaded.model.dtype, loaded.model.device)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size)
        self.prompt_limits = PromptLimits(self.max_model_len, c.vocab_size, config.block_size, num_blocks)
        flex = self._flex_decode()
        self.runner = ModelRunner(loaded.model, self.kv_cache, config.seed, flex is None and self._paged_kernel(),
                                  config.safepoint_lookahead, flex, loaded.sample_vocab, self._prefill_kernel())
        if latency_model is None and config.scheduler == "conserve":
            latency_model = self._load_or_profile_latency_model()
        if latency_model is not None:
            latency_model.padded_decode = not (self.runner.paged_kernel or self.runner.flex)
        self.latency_model = latency_model
        self.offload = self._build_offloader(per_block)
        sched_config = config.scheduler_config(self.max_model_len, c.num_layers)
        self.scheduler = Scheduler(sched_config, self.kv_manager, latency_model, self.offload)
        # Layer-wise preemption is the co-serving scheduler's: other policies stop at iteration ends.
        self.preemption = LayerPreemption(sched_config, latency_model, config.safepoint_every,
                                          keeps_work=config.preemption == "layer")
        self._layer_preemption = config.preemption != "iteration" and config.scheduler == "conserve"
        # An offline iteration stopped between layers, kept to resume (preemption "layer").
        self._suspended: tuple[SchedulerOutput, Suspended] | None = None
        self._suspended_waits = 0  # steps since it last progressed
        self._slack_bank = 0.0  # room online steps left for its layers, not yet used (max_online_slowdown)
        self.stats = EngineStats()
        self.trace = IterationTrace(config.iteration_trace) if config.iteration_trace else None
        self._tracked: dict[str, _Tracked] = {}
        self._parents: dict[str, _Parent] = {}
        self._ids = itertools.count()
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, config.block_size,
                 num_blocks * per_block / 2**30)

    def _flex_decode(self) -> FlexDecode | None:
        """FlexAttention for decodes: with --attention flex, or auto on CUDA where it compiles and agrees."""
        mode, device = self.config.attention, self.loaded.model.device
        if mode != "flex" and (mode != "auto" or device.type != "cuda"):
            return None
        flex = FlexDecode(device) if flex_paged.available() else None
        if flex is not None and flex.works(self.loaded.model.dtype):
            return flex
        if mode == "flex":
            raise RuntimeError("--attention flex: FlexAttention cannot run here (see the log)")
        return None

    def _paged_kernel(self) -> bool:
        mode = self.config.attention
        if mode in ("gather", "flex") or self.loaded.model.device.type != "cpu":
            return False
        if not paged_kernel.load(self.config.kernel_cache_dir) and mode == "kernel":
            raise RuntimeError("--attention kernel: the paged-attention kernel could not be built (see the log)")
        return paged_kernel.available()

    def _fused_ops(self) -> bool:
        """The layer body's rotary embedding and norms through layer_ops.py: on CPU, eager (a compiled body
        fuses them itself), where the kernels build."""
        config = self.config
        if config.fused_ops == "off" or config.compile == "on" or self.loaded.model.device.type != "cpu":
            return False
        return layer_ops.load(config.kernel_cache_dir)

    def _fused_logits(self) -> bool:
        """Greedy argmax and the logit refinement's top-k through logits_ops.py, on CPU, unless
        --fused-ops off (outside the compiled layer body, so also with --compile on)."""
        config = self.config
        if config.fused_ops == "off" or self.loaded.model.device.type != "cpu":
            return False
        return logits_ops.load(config.kernel_cache_dir)

    def _prefill_kernel(self) -> bool:
        mode, model = self.config.prefill_attention, self.loaded.model
        if mode == "sdpa" or model.device.type != "cpu":
            return False
        if not prefill_kernel.supports(model.config.head_dim):
            if mode == "kernel":
                raise RuntimeError(f"--prefill-attention kernel: head size {model.config.head_dim} is not built "
                                   f"(only {', '.join(map(str, prefill_kernel.HEAD_SIZES))})")
            return False
        if mode == "auto" and not prefill_kernel.native(model.dtype):
            return False
        if not prefill_kernel.load(self.config.kernel_cache_dir) and mode == "kernel":
            raise RuntimeError("--prefill-attention kernel: the kernel could not be built (see the log)")
        return prefill_kernel.available()

    def _num_kv_blocks(self, bytes_per_block: int, max_model_len: int) -> int:
        config = self.config
        if config.num_kv_blocks:
            return config.num_kv_blocks
        if config.kv_cache_gb != "auto":
            return num_blocks_for(config.kv_cache_gb * 2**30, bytes_per_block)
        if torch.device(config.device).type == "cuda":
            return num_blocks_for(self._gpu_kv_bytes(bytes_per_block, max_model_len), bytes_per_block)
        free, fraction = available_host_bytes(), AUTO_CPU_FRACTION
        if free is None:
            log.warning("cannot tell how much memory is free: KV cache of 1 GiB (set --kv-cache-gb)")
            return num_blocks_for(2**30, bytes_per_block)
        per_token = bytes_per_block / config.block_size
        kv_bytes = auto_kv_bytes(free, fraction, per_token, max_model_len, config.max_num_seqs)
        log.info("KV cache sized from free memory: %.0f%% of %.1f GiB free, at most %d sequences of %d tokens",
                 100 * fraction, free / 2**30, config.max_num_seqs, max_model_len)
        return num_blocks_for(kv_bytes, bytes_per_block)

    def _gpu_kv_bytes(self, bytes_per_block: int, max_model_len: int) -> int:
        """--gpu-memory-utilization: the KV cache's share of the device, as vLLM sizes it."""
        config, c = self.config, self.loaded.config
        device = torch.device(config.device)
        free, total = torch.cuda.mem_get_info(device)
        dtype_bytes = torch.tensor([], dtype=self.loaded.model.dtype).element_size()
        activations = activation_bytes(c.hidden_size, c.intermediate_size, c.q_size + 2 * c.kv_size, c.vocab_size,
                                       max(config.max_num_batched_tokens, config.max_offline_batched_tokens),
                                       config.max_num_seqs, dtype_bytes)
        kv = gpu_kv_bytes(total, config.gpu_memory_utilization, total - free, activations)
        # No more than max_num_seqs full-length sequences can use.
        kv = min(kv, bytes_per_block / config.block_size * max_model_len * config.max_num_seqs)
        log.info("KV cache sized by --gpu-memory-utilization %g: %.1f GiB of %.1f GiB total (%.1f GiB in use, "
                 "~%.1f GiB for activations)", config.gpu_memory_utilization, kv / 2**30, total / 2**30,
                 (total - free) / 2**30, activations / 2**30)
        return int(kv)

    def _build_offloader(self, bytes_per_block: int) -> Offloader | None:
        config = self.config
        if config.offline_kv == "recompute":
            return None
        num_blocks = max(1, int(config.host_kv_cache_gb * 2**30 // bytes_per_block))
        unit = config.kv_copy_unit
        if unit == "auto":
            unit = "block" if self.kv_cache.store.is_cuda else "token"
        if unit == "block":
            queue = queue_for(self.kv_cache.store.device)
            self.host_kv_cache = BlockHostCache(self.kv_cache, num_blocks, queue)
            self.copier = BlockCopier(self.kv_cache, self.host_kv_cache, queue)
        else:
            self.host_kv_cache = HostKVCache(self.kv_cache, num_blocks)
            self.copier = Copier(self.kv_cache, self.host_kv_cache)
        log.info("host KV tier: %d blocks (%.2f GiB), offline KV mode %s, copied by %s", num_blocks,
                 num_blocks * bytes_per_block / 2**30, config.offline_kv, unit)
        return Offloader(config.offline_kv, HostKVManager(num_blocks, config.block_size), self.kv_manager,
                         self.copier, bytes_per_block // config.block_size, whole_blocks=unit == "block")

    def latency_cache_path(self) -> Path:
        """Where this engine's latency fit is cached: per model, dtype, device, machine and the kernels
        that change its timings (quantised matmuls, the prefill kernel, fused ops, the matmul kernel)."""
        model = self.loaded.model
        kernels = "-".join(tag for tag in (model.quant_tag(), "pk" if self.runner.prefill_kernel else "",
                                           "fused" if isinstance(model.body, FusedLayerBody) else "",
                                           "gemm" if isinstance(model.lm_head, PanelWeight) else "") if tag)
        return cache_path(Path(self.config.latency_cache_dir), self.loaded.name, self.loaded.model.dtype,
                          self.config.device, kernels)

    def _load_or_profile_latency_model(self) -> LatencyModel:
        """The configured latency model, else the cached fit for this model/dtype/device/threads, else
        a quick profile now (cached for next time)."""
        if self.config.latency_model:
            return LatencyModel.load(Path(self.config.latency_model))
        path = self.latency_cache_path()
        if path.exists():
            try:
                return LatencyModel.load(path)
            except ValueError as e:
                log.warning("ignoring the cached latency model: %s", e)
        log.warning("no latency model cached at %s: profiling this machine (once, about a minute)", path)
        model, report = profile(self, quick=True)
        log.warning("latency model fitted: held-out median error %.1f%%", 100 * report["median_abs_rel_error"])
        model.save(path)
        return model

    # -- requests ------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    request_class: RequestClass = RequestClass.ONLINE,
                    arrival_time: float | None = None, deadline: float | None = None) -> None:
        """deadline: when an offline request should be done (see Request.deadline)."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise RequestError(f"duplicate request id {request_id!r}")
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate_prompt(prompt_ids)
        children = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        self._parents[request_id] = _Parent(request_id, text, prompt_ids, children)
        for index, child_id in enumerate(children):
            child_params = params
            if params.n > 1:
                child_params = SamplingParams(**{**params.__dict__, "n": 1,
                                                 "seed": None if params.seed is None else params.seed + index})
            request = Request(child_id, prompt_ids, child_params, tuple(self.tokenizer.eos_token_ids),
                              request_class, arrival_time, self.max_model_len, deadline)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params.skip_special_tokens,
                                           child_params.stop, child_params.include_stop_str_in_output)
            logprobs = [] if child_params.logprobs is not None else None
            self._tracked[child_id] = _Tracked(request, text, detok, request_id, index, logprobs)
            self.scheduler.add_request(request)

    def validate_prompt(self, ids: list[int]) -> None:
        """Raise RequestError if this prompt can never run. Reads configuration only: thread-safe."""
        self.prompt_limits.validate(ids)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            self.scheduler.finish_request(child, RequestStatus.FINISHED_ABORTED)
            self._tracked.pop(child, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the loop ------------------------------------------------------------------------------
    def step(self, arrivals_seen: int | None = None) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that produced tokens or finished.

        arrivals_seen: the online-arrival count read before the caller handed its new requests to the
        engine (AsyncEngine); an online arrival after that may stop an offline-only iteration."""
        step_started = time.perf_counter()
        offload = self.offload
        if offload is not None:
            offload.poll()
        seen = self.preemption.arrivals if arrivals_seen is None else arrivals_seen
        if self._suspended is not None:
            if self.scheduler.suspension_broken:  # one of its requests left: its work is lost
                self._drop_suspended()
            elif not self.scheduler.has_online_work():
                return self._resume(seen)
        self.scheduler.online_recently = self.preemption.online_within(ONLINE_RECENT_S)
        sched_out = self.scheduler.schedule()
        for request, num_tokens in sched_out.prefetch:
            offload.prefetch(request, num_tokens)
        if not sched_out.scheduled:
            if self._suspended is not None:
                return self._resume(seen)
            if offload is not None and offload.num_in_flight:
                offload.wait_oldest()  # nothing to compute until a prefetch lands
            return []
        safepoint = None
        offline_only = not any(s.request.is_online for s in sched_out.scheduled)
        if self._layer_preemption and offline_only and self._suspended is None:
            safepoint = self.preemption.safepoint(seen, 0, self.runner.num_layers, self.runner.progress)
        result = self.runner.execute(sched_out, safepoint)
        if result.stopped_at_layer is not None:
            self._stopped(sched_out, result, time.perf_counter() - step_started, 0)
            return []
        outputs = self._commit(sched_out, result)
        seconds = time.perf_counter() - step_started
        if self.trace is not None:
            self.trace.record("iteration", sched_out, seconds, self.latency_model)
        self.stats.on_iteration(sched_out, seconds)
        if self.latency_model is not None:
            # The whole step (planning, model, outputs) is what an online request feels between tokens.
            model = self.latency_model
            tail = self.scheduler.fill_tail
            if sched_out.filled and tail is not None:
                tail.observe(seconds, model.predict(sched_out.shape))
            drift_refits = model.drift_refits
            if model.observe(sched_out.shape, seconds) and drift_refits == 0 and model.drift_refits == 1:
                log.warning("live iterations drifted more than %d%% from the latency model for %d iterations "
                            "in a row: refitted (logged once; `conserve profile` makes a fresh fit)",
                            100 * DRIFT_RATIO, DRIFT_WINDOW)
        if self._suspended is not None:
            outputs += self._resume_in_slack(step_started)
        return outputs

    def _stopped(self, sched_out: SchedulerOutput, result: RunnerOutput, seconds: float, first_layer: int) -> None:
        """A safepoint stopped an offline-only iteration. With preemption "layer" it is suspended: its
        requests are frozen and it resumes from the next layer; with "layer-restart" nothing is
        committed and the KV written for these positions is overwritten when they are redone."""
        if self.trace is not None:
            self.trace.record("stopped", sched_out, seconds, self.latency_model,
                              result.stopped_at_layer + 1 - first_layer)
        self.runner.progress.finish()  # the arrival waits until the device has run the layers issued
        self.preemption.stopped()
        self.stats.on_partial(seconds)
        if self.config.preemption == "layer":
            if self._suspended is None:
                self.scheduler.freeze([s.request for s in sched_out.scheduled])
            self._suspended = (sched_out, result.suspended)
            self._suspended_waits = 0
        else:
            self.stats.layers_discarded += result.stopped_at_layer + 1

    def _resume(self, seen: int) -> list[RequestOutput]:
        """Run the suspended iteration to its end, stoppable again at its safepoints."""
        sched_out, suspended = self._suspended
        started = time.perf_counter()
        safepoint = None
        if self._layer_preemption:
            safepoint = self.preemption.safepoint(seen, suspended.next_layer, self.runner.num_layers,
                                                  self.runner.progress)
        first_layer = suspended.next_layer
        result = self.runner.resume(suspended, safepoint)
        if result.stopped_at_layer is not None:
            self._stopped(sched_out, result, time.perf_counter() - started, first_layer)
            return []
        self.stats.on_partial(time.perf_counter() - started)
        if self.trace is not None:
            self.trace.record("resumed", sched_out, time.perf_counter() - started, self.latency_model,
                              self.runner.num_layers - first_layer)
        return self._finish_suspended(sched_out, result)

    def _resume_in_slack(self, step_started: float) -> list[RequestOutput]:
        """Beside online work: run as many of the suspended iteration's layers as the online
        iteration left room for under the TBT objective (one, once in starvation_iterations steps,
        if none fit), so it progresses under any online load. With --max-online-slowdown the room
        is that share of the online step's measured time, saved up over steps until a layer fits
        (one is forced only after 16x starvation_iterations steps, so the forced ones stay rarer
        than the 1% of steps a P99 sees)."""
        sched_out, suspended = self._suspended
        config = self.scheduler.config
        layers = self.runner.num_layers
        per_layer = self.latency_model.predict(sched_out.shape) / layers if self.latency_model else 0.0
        elapsed = time.perf_counter() - step_started
        slack = self.scheduler.tbt_fill_limit_s() - elapsed
        patience = config.starvation_iterations
        if config.max_online_slowdown is not None:
            self._slack_bank += max(0.0, min(slack, (config.max_online_slowdown - 1) * elapsed))
            slack, patience = self._slack_bank, 16 * config.starvation_iterations
        n = int(slack / per_layer) if per_layer > 0 else layers
        self._suspended_waits += 1
        if n < 1:
            if self._suspended_waits < patience:
                return []
            n = 1
        self._suspended_waits = 0
        self._slack_bank = max(0.0, self._slack_bank - n * per_layer)
        started = time.perf_counter()
        first_layer = suspended.next_layer
        result = self.runner.resume(suspended, None, max_layers=n)
        self.stats.on_partial(time.perf_counter() - started)
        if self.trace is not None:
            self.trace.record("slack", sched_out, time.perf_counter() - started, self.latency_model,
                              min(n, self.runner.num_layers - first_layer))
        if result.stopped_at_layer is not None:
            return []
        return self._finish_suspended(sched_out, result)

    def _finish_suspended(self, sched_out: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        self._suspended = None
        self._slack_bank = 0.0
        self.scheduler.thaw()
        self.stats.resumed += 1
        self.stats.on_tokens(sched_out)
        return self._commit(sched_out, result)

    def _drop_suspended(self) -> None:
        _, suspended = self._suspended
        self.stats.layers_discarded += suspended.next_layer
        self._suspended = None
        self._slack_bank = 0.0
        self.scheduler.thaw()

    def _commit(self, sched_out: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Advance the scheduled requests by the executed iteration and build their outputs."""
        offload = self.offload
        finished = {r.request_id for r in self.scheduler.update(sched_out, result.sampled)}
        if offload is not None:
            offload.checkpoint([r for r in self.scheduler.running if not r.is_online], self.scheduler.evictable)
        now = time.monotonic()
        touched: dict[str, None] = {}
        for request_id, token in result.sampled.items():
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            self._record_token(tracked, token, result.logprobs.get(request_id), now)
            if request_id in finished or tracked.request.is_finished:
                tracked.detokenizer.flush()
            touched[tracked.parent_id] = None
        return [self._parent_output(p) for p in touched]

    def settle(self) -> bool:
        """When idle: let copies in flight land, so every block they held is free again. True if
        there were any (block counts changed)."""
        if self.offload is not None and self.offload.num_in_flight:
            self.offload.wait_all()
            return True
        return False

    def _record_token(self, tracked: _Tracked, token: int, lp: TokenLogprobs | None, now: float) -> None:
        if tracked.first_token_time is None:
            tracked.first_token_time = now
        if lp is not None and tracked.logprobs is not None:
            tracked.logprobs.append(lp)
            tracked.cumulative_logprob += lp.logprob
        detok = tracked.detokenizer
        detok.step([token])
        if detok.stopped and not tracked.request.is_finished:
            request = self.scheduler.finish_request(tracked.request.request_id, RequestStatus.FINISHED_STOPPED)
            if request is not None:
                request.stop_reason = detok.stop_reason

    def _parent_output(self, parent_id: str) -> RequestOutput:
        parent = self._parents[parent_id]
        for child_id in parent.children:
            tracked = self._tracked.get(child_id)
            if tracked is None:
                continue
            r = tracked.request
            parent.completions[tracked.index] = CompletionOutput(
                tracked.index, tracked.detokenizer.text, r.output_token_ids,
                tracked.cumulative_logprob if tracked.logprobs is not None else None,
                list(tracked.logprobs) if tracked.logprobs is not None else None,
                r.finish_reason, r.stop_reason)
            if r.is_finished:
                del self._tracked[child_id]
        outputs = [parent.completions[i] for i in sorted(parent.completions)]
        done = len(outputs) == len(parent.children) and all(o.finish_reason for o in outputs)
        if done:
            del self._parents[parent_id]
        return RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids, outputs, done)

    @torch.inference_mode()
    def warmup(self) -> None:
        """One tiny request through the whole path, so the first real request is not the slow one."""
        self.add_request("__warmup__", [self.tokenizer.bos_token_id or 0, 1],
                         SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()

"""ModelRunner: executes one SchedulerOutput. It builds the batch tensors, runs the layers (with a
safepoint between them) and samples. It decides nothing: what to run comes from the scheduler."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conserve.layer_progress import LayerProgress, event_factory
from conserve.model.flex_paged import FlexDecode
from conserve.model.attention import AttentionMetadata, KVCache, PrefillChunk
from conserve.model.llama import ForwardState, LlamaModel
from conserve.outputs import TokenLogprobs
from conserve.request import Request
from conserve.sampler import SamplingRow, sample
from conserve.uploads import Uploader
from conserve.sched.output import ScheduledRequest, SchedulerOutput


@dataclass
class Suspended:
    """An iteration stopped between layers: its forward state and the batch it was built for. Valid
    while none of its requests' blocks change hands (the scheduler freezes those requests)."""

    state: ForwardState
    meta: AttentionMetadata
    sample_rows: list[tuple[int, Request]]
    sample_index: torch.Tensor | None = None  # the rows of sample_rows, on the device

    @property
    def next_layer(self) -> int:
        return self.state.next_layer


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    stopped_at_layer: int | None = None  # set when a safepoint (or a layer limit) stopped the iteration
    suspended: Suspended | None = None  # with stopped_at_layer: what resume() continues from


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, seed: int = 0, paged_kernel: bool = False,
                 safepoint_lookahead: int = 1, flex: FlexDecode | None = None,
                 sample_vocab: int | None = None, prefill_kernel: bool = False) -> None:
        self.model = model
        self.sample_vocab = sample_vocab  # sample only ids below this (None: the whole vocabulary)
        self.kv = kv
        self.paged_kernel = paged_kernel  # decodes read blocks in place (paged_kernel.py), else gather
        self.flex = flex  # or in place through FlexAttention (flex_paged.py)
        self.prefill_kernel = prefill_kernel  # prompt chunks through prefill_kernel.py, else sdpa
        self.device = model.device
        self.uploads = Uploader(self.device)
        # Preemptible runs mark each layer, so safepoints see the device's progress (layer_progress.py).
        self.progress = LayerProgress(event_factory(self.device), safepoint_lookahead)
        self.block_size = kv.block_size
        # Unseeded requests draw their sampling seeds from here: reproducible per engine seed.
        self._seeds = torch.Generator().manual_seed(seed)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, safepoint: Callable[[int], bool] | None = None) -> RunnerOutput:
        ordered = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first (stable)
        input_ids, positions, meta, sample_rows, sample_index = self._prepare(ordered)
        suspended = Suspended(self.model.begin(input_ids, positions), meta, sample_rows, sample_index)
        return self.resume(suspended, safepoint)

    @torch.inference_mode()
    def resume(self, suspended: Suspended, safepoint: Callable[[int], bool] | None = None,
               max_layers: int | None = None) -> RunnerOutput:
        """Run a suspended iteration on from its next layer (at most max_layers of them); sample when
        the last layer has run, else report where it stopped."""
        if safepoint is not None:
            safepoint = self._paced(safepoint)
        if not self.model.run_layers(suspended.state, suspended.meta, self.kv, safepoint, max_layers):
            return RunnerOutput(stopped_at_layer=suspended.next_layer - 1, suspended=suspended)
        hidden, sample_rows = suspended.state.hidden, suspended.sample_rows
        if not sample_rows:
            return RunnerOutput()
        rows, requests = zip(*sample_rows)
        logits = self.model.compute_logits(hidden[suspended.sample_index])
        if self.sample_vocab is not None:
            logits = logits[:, : self.sample_vocab]
        tokens, logprobs = sample(logits, [self._sampling_row(r) for r in requests], self.uploads,
                                  self.model.fused_logits)
        result = RunnerOutput()
        for request, token, lp in zip(requests, tokens, logprobs):
            result.sampled[request.request_id] = token
            if lp is not None:
                result.logprobs[request.request_id] = lp
        return result

    def _paced(self, safepoint: Callable[[int], bool]) -> Callable[[int], bool]:
        progress = self.progress
        progress.begin()

        def check(layer: int) -> bool:
            progress.layer_issued()  # the host stays within the lookahead of the device
            return safepoint(layer)

        return check

    def _prepare(self, ordered: list[ScheduledRequest]):
        """The iteration's inputs: host lists first, then a few packed uploads (uploads.py)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[tuple[int, Request]] = []
        decodes: list[ScheduledRequest] = []
        prefills: list[tuple[ScheduledRequest, int]] = []
        for s in ordered:
            start, n, table = s.start, s.num_new_tokens, s.block_table
            row = len(ids)
            ids.extend(s.request.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decodes.append(s)
            else:
                prefills.append((s, row))
            if s.samples:
                sample_rows.append((row + n - 1, s.request))
        input_ids, positions, slot_t, sample_index = self.uploads.upload([ids, pos, slots,
                                                                           [r for r, _ in sample_rows]])
        meta = AttentionMetadata(self.kv.rows(slot_t), len(decodes), None, None, self._prefill_chunks(prefills))
        meta.prefill_kernel = self.prefill_kernel
        if decodes and self.flex is not None:
            self._decode_flex(decodes, meta)
        elif decodes and self.paged_kernel:
            self._decode_tables(decodes, meta)
        elif decodes:
            meta.decode_slots, meta.decode_bias = self._decode_context(decodes)
        return input_ids, positions, meta, sample_rows, sample_index

    def _prefill_chunks(self, prefills: list[tuple[ScheduledRequest, int]]) -> list[PrefillChunk]:
        bs = self.block_size
        # A chunk after context reads it through its blocks; all chunks' block lists in one upload.
        with_context = [s for s, _ in prefills if s.start]
        tables = iter(self.uploads.upload([s.block_table[: -(-(s.start + s.num_new_tokens) // bs)]
                                           for s in with_context]) if with_context else [])
        chunks = []
        for s, row in prefills:
            start, n = s.start, s.num_new_tokens
            if start == 0:
                chunks.append(PrefillChunk(row, row + n, None, None))  # the chunk is its whole context: causal
                continue
            ctx = start + n
            context = (next(tables).unsqueeze(1) * bs + torch.arange(bs, device=self.device)).flatten()[:ctx]
            q_pos = torch.arange(start, ctx, device=self.device)
            mask = torch.arange(ctx, device=self.device).unsqueeze(0) <= q_pos.unsqueeze(1)
            chunks.append(PrefillChunk(row, row + n, self.kv.rows(context), mask))
        return chunks

    def _block_tables(self, decodes: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' block tables [B, blocks of the longest] (padded with 0) and context lengths [B]."""
        lengths = [s.start + 1 for s in decodes]
        width = -(-max(lengths) // self.block_size)
        rows = [b for s in decodes for b in (s.block_table[:width] + [0] * width)[:width]]
        tables, lens = self.uploads.upload([rows, lengths])
        return tables.view(len(decodes), width), lens

    def _decode_tables(self, decodes: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        tables, lens = self._block_tables(decodes)
        meta.decode_tables = tables.to(torch.int32)
        meta.decode_rows = torch.arange(len(decodes), dtype=torch.int32, device=self.device)
        meta.decode_lens = lens.to(torch.int32)
        meta.block_size = self.block_size

    def _decode_flex(self, decodes: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        tables, lens = self._block_tables(decodes)
        flex_meta = self.flex.metadata(tables, lens, self.kv.num_blocks, self.block_size, self.model.config.head_dim)
        meta.flex_decode = functools.partial(self.flex, meta=flex_meta)

    def _decode_context(self, decodes: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        bs, dev = self.block_size, self.device
        lengths = [s.start + 1 for s in decodes]
        max_len = max(lengths)
        max_blocks = -(-max_len // bs)
        rows = [b for s in decodes for b in (s.block_table + [0] * max_blocks)[:max_blocks]]
        tables, lens = self.uploads.upload([rows, lengths])
        offsets = torch.arange(max_len, device=dev)
        slots = tables.view(len(decodes), max_blocks)[:, offsets // bs] * bs + offsets % bs
        padding = offsets.unsqueeze(0) >= lens.unsqueeze(1)
        bias = torch.zeros(padding.shape, dtype=self.model.dtype, device=dev).masked_fill_(padding, float("-inf"))
        kv_heads = self.model.config.num_kv_heads
        return self.kv.rows(slots.flatten()), bias.repeat(kv_heads, 1).unsqueeze(1)

    def _sampling_row(self, request: Request) -> SamplingRow:
        params = request.sampling_params
        seed = None
        if not params.greedy:
            if request.sampling_seed is None:
                seed = params.seed
                if seed is None:
                    seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
                request.sampling_seed = seed
            seed = request.sampling_seed
        banned: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(request.eos_token_ids))
        return SamplingRow(params, seed, request.num_output_tokens, banned)

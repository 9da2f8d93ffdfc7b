"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in plain PyTorch, inference only.

The forward pass is an explicit loop over layers; between layers it calls a safepoint, which may
ask it to stop (the layer-wise preemption point). q/k/v and gate/up projections are fused into
one matmul each: fewer, larger matmuls are what a CPU runs fastest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from conserve.errors import ModelLoadError
from conserve.model.attention import AttentionMetadata, KVCache, paged_attention
from conserve.model.config import ModelConfig
from conserve.model.gemm_kernel import PanelWeight
from conserve.model import logits_ops, quant
from conserve.model.int4 import Q4Blocks
from conserve.model.layer_body import CompiledLayerBody, FusedLayerBody, LayerBody, linear, timed_warmup
from conserve.model.quant import QuantWeight
from conserve.model.rope import RotaryEmbedding

# Best logits per row recomputed in float32 when the model runs in a lower precision.
REFINED_LOGITS = 8

# Fused projections and the HF tensors they are made of, in row order.
_FUSED_PARTS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 intermediate, hidden]
    down: torch.Tensor
    # The same projections as int8/int4 weights (see quant.py), used for small iterations.
    quant: dict[str, QuantWeight] = field(default_factory=dict)
    # Norm weights in float32, for the float32 residual stream.
    input_norm_f32: torch.Tensor | None = None
    post_norm_f32: torch.Tensor | None = None


@dataclass
class ForwardState:
    """A forward pass between layers: what a stopped iteration keeps to resume where it stopped."""

    hidden: torch.Tensor  # [T, hidden] float32 residual stream after layer next_layer - 1
    cos: torch.Tensor
    sin: torch.Tensor
    next_layer: int = 0


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaModel:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        c = config
        qkv_rows = c.q_size + 2 * c.kv_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        self.embed = empty(c.vocab_size, c.hidden_size)
        self.norm = empty(c.hidden_size)
        self.lm_head = self.embed if c.tie_word_embeddings else empty(c.vocab_size, c.hidden_size)
        self.lm_head_plain = self.lm_head  # lm_head may be replaced by a packed copy; this stays indexable
        self.layers = [
            LayerWeights(empty(c.hidden_size), empty(qkv_rows, c.hidden_size),
                         empty(qkv_rows) if c.attention_bias else None, empty(c.hidden_size, c.q_size),
                         empty(c.hidden_size), empty(2 * c.intermediate_size, c.hidden_size),
                         empty(c.hidden_size, c.intermediate_size))
            for _ in range(c.num_layers)
        ]
        self.rope_freq_factors: torch.Tensor | None = None
        self.rotary: RotaryEmbedding | None = None
        self._expected = set(self._expected_names())
        self._loaded: set[str] = set()
        self._q4_parts: dict[str, Q4Blocks] = {}
        self._file_types: dict[str, str] = {}  # GGUF storage type of each loaded tensor
        # Iterations of at most this many tokens (logit rows) use the quantised weights; the start-up
        # micro-benchmark sets them (quant_tuning.py).
        self.quant_max_tokens = 0
        self.lm_head_quant: QuantWeight | None = None
        self.lm_head_quant_max_rows = 0
        self.body: LayerBody = LayerBody(config, dtype)  # Compiled/FusedLayerBody after compile()/use_fused_ops()
        self.fused_logits = False  # argmax / top-k over logits through logits_ops.py (set by the engine)

    # -- weights -------------------------------------------------------------------------------
    def _expected_names(self):
        yield "model.embed_tokens.weight"
        yield "model.norm.weight"
        if not self.config.tie_word_embeddings:
            yield "lm_head.weight"
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            for part in ("q", "k", "v", "o"):
                yield f"{p}self_attn.{part}_proj.weight"
            if self.config.attention_bias:
                for part in ("q", "k", "v"):
                    yield f"{p}self_attn.{part}_proj.bias"
            for part in ("gate", "up", "down"):
                yield f"{p}mlp.{part}_proj.weight"
            yield f"{p}input_layernorm.weight"
            yield f"{p}post_attention_layernorm.weight"

    def load_weight(self, name: str, tensor: torch.Tensor, q4: Q4Blocks | None = None,
                    file_type: str | None = None) -> None:
        """Copy one tensor, named as in HF checkpoints, into place (casting to the model dtype).
        q4: the same weight as 4-bit blocks, kept to build int4 matmuls from; file_type: how a GGUF
        file stored it (e.g. Q8_0), which quantization "auto" follows."""
        if name == "rope_freqs":
            self.rope_freq_factors = tensor.float()
            return
        target = self._target(name)
        if target is None:
            return  # e.g. rotary inv_freq buffers, which we compute ourselves
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"tensor {name}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        self._loaded.add(name)
        if q4 is not None:
            self._q4_parts[name] = q4
        if file_type is not None:
            self._file_types[name] = file_type

    def _target(self, name: str) -> torch.Tensor | None:
        c = self.config
        if name == "model.embed_tokens.weight":
            return self.embed
        if name == "model.norm.weight":
            return self.norm
        if name == "lm_head.weight":
            return None if c.tie_word_embeddings else self.lm_head
        m = _LAYER_NAME.fullmatch(name)
        if m is None or int(m.group(1)) >= c.num_layers:
            return None
        layer, part = self.layers[int(m.group(1))], m.group(2)
        q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
        rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        if part.startswith("self_attn.") and part[10] in rows and part[11:17] == "_proj.":
            lo, hi = rows[part[10]]
            if part.endswith(".weight"):
                return layer.qkv[lo:hi]
            return layer.qkv_bias[lo:hi] if layer.qkv_bias is not None else None
        return {
            "self_attn.o_proj.weight": layer.o,
            "mlp.gate_proj.weight": layer.gate_up[:inter],
            "mlp.up_proj.weight": layer.gate_up[inter:],
            "mlp.down_proj.weight": layer.down,
            "input_layernorm.weight": layer.input_norm,
            "post_attention_layernorm.weight": layer.post_norm,
        }.get(part)

    def finish_loading(self, source: str, max_positions: int, quantization: str = "none",
                       prepack: bool = True, panels: bool = False) -> None:
        """prepack: reorder bfloat16 weights for oneDNN once; panels: pack them for conserve's own bfloat16
        kernel instead (gemm_kernel.py, loaded by the caller)."""
        missing = sorted(self._expected - self._loaded)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
        self.rotary = RotaryEmbedding(self.config, max_positions, self.device, self.rope_freq_factors)
        for layer in self.layers:
            layer.input_norm_f32, layer.post_norm_f32 = layer.input_norm.float(), layer.post_norm.float()
        if self.device.type == "cpu" and quantization != "none":
            self._build_quant(quantization)
        self._q4_parts.clear()
        # oneDNN's packed weights are opaque tensors, which compiled graphs cannot take (prepack=False).
        if not prepack or self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return
        if panels and all(PanelWeight.supports(w) for w in self._projection_weights()):
            self._prepack(PanelWeight, gated=lambda w: PanelWeight(w, gated=True))
        elif onednn_prepack_available():
            self._prepack(_pack)

    def _projection_weights(self) -> list[torch.Tensor]:
        names = ("qkv", "o", "gate_up", "down")
        return [getattr(layer, name) for layer in self.layers for name in names] + [self.lm_head_plain]

    def _prepack(self, pack: Callable[[torch.Tensor], torch.Tensor | PanelWeight],
                 gated: Callable[[torch.Tensor], torch.Tensor | PanelWeight] | None = None) -> None:
        # oneDNN reorders a plain weight on every call; reordering once at load makes bfloat16
        # matmuls ~25% faster on CPU (measured at 9 to 512 tokens). The packed weights replace
        # the plain ones; the embedding stays plain for lookups, with a packed copy as lm_head.
        # `gated` packs the fused gate/up projections (default: like the others).
        for layer in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                packer = gated if gated is not None and name == "gate_up" else pack
                setattr(layer, name, packer(getattr(layer, name)))
        self.lm_head = pack(self.lm_head_plain)

    def _build_quant(self, mode: str) -> None:
        for i, layer in enumerate(self.layers):
            for fused, parts in _FUSED_PARTS.items():
                names = [f"model.layers.{i}.{p}.weight" for p in parts]
                kind = quant.projection_kind(mode, [self._file_types.get(n) for n in names])
                built = quant.build(kind, getattr(layer, fused), [self._q4_parts.get(n) for n in names])
                if built is not None:
                    layer.quant[fused] = built
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        self.lm_head_quant = quant.build(quant.lm_head_kind(mode, self._file_types.get(head)),
                                         self.lm_head_plain, [])

    def layer_groups(self) -> list[list[tuple[torch.Tensor, QuantWeight]]]:
        """Per layer, the (dense, quantised) pairs of its quantised projections."""
        return [[(getattr(layer, name), q) for name, q in layer.quant.items()] for layer in self.layers]

    def layer_projections(self) -> list[tuple[torch.Tensor, QuantWeight]]:
        return [pair for group in self.layer_groups() for pair in group]

    def drop_quant(self, layers: bool, lm_head: bool) -> None:
        """Free quantised weights that never pay on this machine."""
        if layers:
            for layer in self.layers:
                layer.quant.clear()
        if lm_head:
            self.lm_head_quant = None

    def compile(self) -> float:
        """Run the layer body through torch.compile, compiling every graph it will need now: one token
        and the dynamic size, with the quantised weights and the dense ones as iterations use them.
        Returns the seconds it took."""
        self.body = CompiledLayerBody(self.config, self.dtype)
        sizes = {1, 2, self.quant_max_tokens + 1} | ({self.quant_max_tokens} if self.quant_max_tokens else set())
        w = self.layers[0]

        def run() -> None:
            for t in sorted(sizes):
                h = torch.zeros(t, self.config.hidden_size, device=self.device)
                cos, sin = self.body.rotary_tables(self.rotary, torch.zeros(t, dtype=torch.long, device=self.device))
                q4 = w.quant if t <= self.quant_max_tokens else {}
                q, _, _ = self.body.attn_in(h, w.input_norm_f32, w.qkv, q4.get("qkv"), w.qkv_bias, cos, sin)
                self.body.attn_out(h, q, w.o, q4.get("o"), w.post_norm_f32, w.gate_up, q4.get("gate_up"), w.down,
                                   q4.get("down"))

        return timed_warmup(run, f"sizes {sorted(sizes)}")

    def use_fused_ops(self) -> None:
        """Rotary and SiLU-gating through the CPU kernels of layer_ops.py (loaded by the caller)."""
        self.body = FusedLayerBody(self.config, self.dtype)

    def quant_tag(self) -> str:
        """Which quantised matmuls run up to which sizes, e.g. "int4w8-int8h16"; "" when none."""
        kinds = sorted({type(q).__name__ for _, q in self.layer_projections()})
        tag = "".join(k.removesuffix("Weight").lower() for k in kinds)
        tag = f"{tag}w{self.quant_max_tokens}" if tag else ""
        if self.lm_head_quant is not None:
            tag += f"-{type(self.lm_head_quant).__name__.removesuffix('Weight').lower()}h{self.lm_head_quant_max_rows}"
        return tag.lstrip("-")

    def quant_summary(self) -> str:
        kinds: dict[str, int] = {}
        for _, q in self.layer_projections():
            kinds[type(q).__name__] = kinds.get(type(q).__name__, 0) + 1
        head = type(self.lm_head_quant).__name__ if self.lm_head_quant is not None else "dense"
        size = sum(q.nbytes for _, q in self.layer_projections())
        size += self.lm_head_quant.nbytes if self.lm_head_quant is not None else 0
        layers = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        return (f"quantised projections: {layers} (up to {self.quant_max_tokens} tokens); lm_head {head} "
                f"(up to {self.lm_head_quant_max_rows} rows); {size / 2**20:.0f} MiB beside the dense weights")

    # -- forward -------------------------------------------------------------------------------
    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor) -> ForwardState:
        """The state before layer 0: embeddings and the rotary tables of these positions."""
        cos, sin = self.body.rotary_tables(self.rotary, positions)
        # The residual stream stays in float32: 60 bfloat16 additions would lose the small updates
        # that decide close calls between tokens. Only the matmul inputs are cast down.
        return ForwardState(F.embedding(input_ids, self.embed).float(), cos, sin)

    def run_layers(self, state: ForwardState, meta: AttentionMetadata, kv: KVCache,
                   safepoint: Callable[[int], bool] | None = None, max_layers: int | None = None) -> bool:
        """Run layers from state.next_layer on, advancing the state in place. Stops early when the
        safepoint says so (checked after each layer but the last) or after max_layers layers.
        Returns whether the last layer has run."""
        c = self.config
        h, cos, sin = state.hidden, state.cos, state.sin
        small = h.shape[0] <= self.quant_max_tokens
        body = self.body
        end = c.num_layers if max_layers is None else min(c.num_layers, state.next_layer + max_layers)
        for i in range(state.next_layer, end):
            w = self.layers[i]
            q4 = w.quant if small else {}
            q, k, v = body.attn_in(h, w.input_norm_f32, w.qkv, q4.get("qkv"), w.qkv_bias, cos, sin)
            attn = paged_attention(q, k, v, kv.k[i], kv.v[i], meta)
            h = body.attn_out(h, attn, w.o, q4.get("o"), w.post_norm_f32, w.gate_up, q4.get("gate_up"), w.down,
                              q4.get("down"))
            state.hidden, state.next_layer = h, i + 1
            if safepoint is not None and i + 1 < c.num_layers and safepoint(i):
                return False
        return state.next_layer == c.num_layers

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] rows that sample. Returns float32 logits [N, vocab]."""
        x = F.rms_norm(hidden.float(), (self.config.hidden_size,), self.norm.float(), self.config.rms_norm_eps)
        head = self.lm_head_quant if hidden.shape[0] <= self.lm_head_quant_max_rows else None
        logits = linear(x.to(self.dtype), self.lm_head, head).float()
        if self.dtype != torch.float32 or head is not None:
            # A bfloat16 logit near 25 is rounded to 1/8: enough to tie the two best tokens (int8 weights
            # err more). Recompute the few candidates that decide greedy choice and top logprobs in
            # float32 from the dense weights (~1 ms at 32 rows).
            top = logits_ops.top_indices(logits, REFINED_LOGITS, self.fused_logits)
            exact = torch.einsum("nd,nkd->nk", x, self.lm_head_plain[top].float())
            logits.scatter_(1, top, exact)
        return logits


def onednn_prepack_available() -> bool:
    mkldnn = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(
        mkldnn, "_linear_pointwise")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)


"""One decoder layer's work around attention, as two functions the layer loop calls: `attn_in` (input
norm, q/k/v projection, rotary) and `attn_out` (output projection, residual, post norm, MLP,
residual). Attention itself (cache writes and the paged read) runs between them, outside any compiled
graph: its metadata changes shape every iteration.

With compile on, both run through torch.compile (inductor: C++ on CPU, Triton on CUDA), which fuses
the norms, casts, rotary and SiLU-gating into a few kernels around the matmuls. Shapes: one token is
its own graph (the single-stream case); every other count is one dynamic graph, so iteration sizes
never recompile. Quantised matmuls (int4.py, int8.py) trace as the aten ops they call.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F

from conserve.model.config import ModelConfig
from conserve.model.gemm_kernel import PanelWeight
from conserve.model.quant import QuantWeight
from conserve.model.rope import apply_rotary

log = logging.getLogger(__name__)

def linear(x: torch.Tensor, dense: torch.Tensor | PanelWeight, quantized: QuantWeight | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    if quantized is None:
        if isinstance(dense, PanelWeight):
            return dense.matmul(x, bias)
        if dense.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, dense, bias, "none", [], "")
        return F.linear(x, dense, bias)
    y = quantized.matmul(x)
    return y if bias is None else y + bias


class LayerBody:
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        self.hidden, self.eps, self.dtype = config.hidden_size, config.rms_norm_eps, dtype
        self.q_size, self.kv_size, self.head_dim = config.q_size, config.kv_size, config.head_dim
        self.heads, self.kv_heads = config.num_heads, config.num_kv_heads

    def attn_in(self, h, norm, qkv, qkv_quant, qkv_bias, cos, sin):
        """h: [T, hidden] float32 residual stream. Returns q [T, heads, D], k and v [T, kv_heads, D]."""
        t = h.shape[0]
        x = self.norm(h, norm)
        y = linear(x, qkv, qkv_quant, qkv_bias)
        qk = self.rotate(y[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
        v = y[:, self.q_size + self.kv_size:].view(t, self.kv_heads, self.head_dim)
        return qk[:, : self.heads], qk[:, self.heads:], v

    def rotate(self, qk, cos, sin):
        """qk: [T, heads + kv_heads, D] -> rotated (a new tensor)."""
        return apply_rotary(qk, cos, sin)

    def attn_out(self, h, attn, o, o_quant, norm, gate_up, gate_up_quant, down, down_quant):
        """attn: [T, heads, D]. Returns the residual stream after the layer."""
        h = h + linear(attn.reshape(h.shape[0], self.q_size), o, o_quant)
        x = self.norm(h, norm)
        gate, up = linear(x, gate_up, gate_up_quant).chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, down, down_quant)

    def rotary_tables(self, rotary, positions):
        """The cos/sin tables attn_in takes for these positions."""
        return rotary.tables(positions, self.dtype)

    def norm(self, h, weight):
        """RMS norm of the float32 residual stream, cast to the matmuls' dtype."""
        return F.rms_norm(h, (self.hidden,), weight, self.eps).to(self.dtype)


class FusedLayerBody(LayerBody):
    """LayerBody with the rotary embedding, the RMS norms (the first after attention with its residual
    add) and SiLU-gating as single-pass CPU kernels (layer_ops.py); cos/sin come as float32 [T, D/2]
    tables, rounded only with the rotated values."""

    def rotary_tables(self, rotary, positions):
        return rotary.cos[positions], rotary.sin[positions]

    def norm(self, h, weight):
        return torch.ops.conserve.rms_norm_to(h, weight, self.eps, self.dtype)

    def rotate(self, qk, cos, sin):
        torch.ops.conserve.rotary_(qk, cos, sin)  # in place: q and k stay views of the projection's output
        return qk

    def attn_out(self, h, attn, o, o_quant, norm, gate_up, gate_up_quant, down, down_quant):
        y = linear(attn.reshape(h.shape[0], self.q_size), o, o_quant)
        h, x = torch.ops.conserve.add_rms_norm(h, y, norm, self.eps, self.dtype)
        if gate_up_quant is None and isinstance(gate_up, PanelWeight) and gate_up.gated:
            gated = gate_up.silu_matmul(x)  # SiLU-gating in the matmul's epilogue
        else:
            gated = torch.ops.conserve.silu_mul(linear(x, gate_up, gate_up_quant))
        return h + linear(gated, down, down_quant)


class CompiledLayerBody(LayerBody):
    """LayerBody through torch.compile; the eager methods stay reachable as LayerBody's."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__(config, dtype)
        self._in = torch.compile(super().attn_in)
        self._out = torch.compile(super().attn_out)

    def attn_in(self, h, norm, qkv, qkv_quant, qkv_bias, cos, sin):
        _mark(h, cos, sin)
        return self._in(h, norm, qkv, qkv_quant, qkv_bias, cos, sin)

    def attn_out(self, h, attn, *weights):
        attn = attn.contiguous()  # one stride pattern: attention paths return contiguous outputs anyway
        _mark(h, attn)
        return self._out(h, attn, *weights)


def _mark(*tensors: torch.Tensor) -> None:
    # More than one token: the token dimension is symbolic, so one graph serves every size.
    if tensors[0].shape[0] > 1:
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def use_compile_cache(cache_dir: str | Path) -> None:
    """Keep inductor's caches (FX graphs, compiled C++) across starts, in cache_dir unless the user set
    TORCHINDUCTOR_CACHE_DIR."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its default into the environment when first asked, so that value is not the user's.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser())
    torch._inductor.config.fx_graph_cache = True


def timed_warmup(run, what: str) -> float:
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    log.info("compiled the layer body (%s) in %.1f s (cache: %s)", what, seconds,
             os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    return seconds

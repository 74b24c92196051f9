"""Causal LingBot-World-Fast DiT: Wan2.2 blocks with camera (or action) injection, run chunk by chunk.

Public API (what the generator calls)::

    model = CausalDiT(config, attention_backend="auto")      # config: worldgen.config.DiTConfig
    model.load_state_dict(state_dict, strict=True)            # checkpoint keys are the module names here
    model.set_compute_dtype(torch.bfloat16)                   # token-wise matmuls in bf16 (see below)

    text = model.prepare_text(context)                        # once per video; context [B, T<=512, text_dim]
    cache = model.make_kv_cache(batch_size=B, latent_height=h, latent_width=w, chunk_size=3,
                                local_attn_size=21, sink_size=3, num_frames=latent_frames)
    for each chunk, latent frames [f0, f0 + F):
        control = model.prepare_control(control_chunk)       # once per chunk; [B, control_channels, F, h, w]
        4 denoising passes:  v = model(x, t, y, text, control, cache=cache, first_latent_frame=f0)
        1 cache-update pass: model.update_cache(x0, y, text, control, cache=cache, first_latent_frame=f0)

- `x` [B, 16, F, h, w] is the chunk's latent (noisy, or clean for the cache update), `y` [B, 20, F, h, w]
  the chunk's slice of cat[mask, conditioning latent], `t` a number, a [B] tensor or a per-frame [B, F]
  tensor (0..1000 scale). The return value is the velocity [B, 16, F, h, w] in float32 (float64 when
  the model is float64).
- The first pass at `first_latent_frame == cache.end_frame` opens a new chunk in the cache (evicting the
  oldest window frames); passes repeating that chunk overwrite its slots. No pass flag is needed.
- `update_cache` is the forward at timestep 0 cut to what the cache keeps: every block's K/V. The last
  block stops after writing its K/V (its attention, cross-attention and FFN, and the head, feed only the
  velocity, which the cache update discards). `model(x0, 0, ...)` writes the same cache.
- Plain path (the benchmark yardstick): pass the raw `context` tensor and/or the raw control tensor
  instead of the prepared states; the forward then recomputes the text embedding, every block's text K/V,
  the control tokens and every block's camera modulation inside the pass. Outputs are identical.
- Fast-path kernels (off on the model; the generator turns them on for a bf16 model on CUDA, or as its
  `--triton-kernels` / `--gelu-epilogue` say):
  `model.triton_kernels = True` runs the cached passes' q/k RMSNorm + RoPE as one Triton kernel on CUDA
  that writes the keys straight into the cache, and, with fp8 layers (worldgen/quant.py), quantises each
  fp8 layer's input in one kernel fused with the LayerNorm + modulation, affine LayerNorm or GELU before
  it, and, before the cross-attention query and the FFN, with the residual update of the stream that
  precedes those norms (worldgen/models/fp8_rows.py); the model's own ops run elsewhere.
  `model.gelu_epilogue = True` runs the FFN's bias + GELU in cuBLASLt's GEMM epilogue on CUDA.
- Oracle path: `model(x, t, y, context, control, attn_mask=visibility_mask(...))` with no cache runs one
  full-sequence forward over all frames given, with per-frame timesteps [B, F].

Mixed precision: `set_compute_dtype(torch.bfloat16)` casts the weights of every token-wise matmul
(patch/control/text embeddings, attention, camera layers, FFN, head projection) to bf16; each `Linear`
runs in its weight's dtype. The residual stream, the modulation tables (time embedding, time projection,
`modulation` parameters), every norm and RoPE stay in float32, so shift/scale/gate and the skip
connections are never rounded to bf16; bf16 matmul outputs (attention, FFN, camera scale/shift) are
promoted to float32 where they meet the stream. A float64 model runs everything in float64 (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldgen.config import DiTConfig
from worldgen.models import fp8_rows
from worldgen.models.attention import AttentionBackend, attention, check_backend
from worldgen.models.fp8_rows import Quantized
from worldgen.models.kv_cache import E4M3, KVCache, to_e4m3

ROPE_THETA = 10000.0
# The time MLP acts on one row per frame, not per token: it stays in float32 with the modulation tables.
_FLOAT32_MODULES = ("time_embedding", "time_projection")


def _upcast(x: Tensor) -> Tensor:
    """float32 for bf16/fp16/fp32 tensors, float64 stays float64: the dtype of the residual stream."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Linear(nn.Linear):
    """nn.Linear that runs in its weight's dtype, whatever the dtype of its input."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))

    @property
    def output_dtype(self) -> torch.dtype:
        """dtype of this layer's output; attention and the KV cache follow it (fp8 layers output bf16)."""
        return self.weight.dtype


class Conv3d(nn.Conv3d):
    """nn.Conv3d that runs in its weight's dtype, whatever the dtype of its input."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = _upcast(x)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FeedForward(nn.Sequential):
    """Linear, tanh GELU, Linear: the blocks' FFN and the text embedding (checkpoint keys `.0`, `.2`)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__(
            Linear(in_features, hidden_features),
            nn.GELU(approximate="tanh"),
            Linear(hidden_features, out_features),
        )

    def forward(
        self, x: Tensor | Quantized, gelu_epilogue: bool = False, quantize_in_kernel: bool = False
    ) -> Tensor:
        up, gelu, down = self
        if quantize_in_kernel:  # fp8 layers: the GELU and the down projection's quantisation in one kernel
            return down(fp8_rows.fused_quantize(up(x), gelu=True))
        if gelu_epilogue and isinstance(up, Linear) and up.weight.is_cuda:
            # cuBLASLt adds the bias and applies GELU (its tanh form, this layer's) in the GEMM's epilogue:
            # the hidden state is written once instead of written, read and written again. The CPU kernel
            # computes the exact GELU instead, hence CUDA only.
            rows = x.reshape(-1, x.shape[-1]).to(up.weight.dtype)
            hidden = torch._addmm_activation(up.bias, rows, up.weight.t(), use_gelu=True)
            hidden = hidden.view(*x.shape[:-1], -1)
        else:
            hidden = gelu(up(x))
        return down(hidden)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, then the adaptive shift/scale of the time modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def sinusoidal_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """cat[cos, sin] of timestep * 10000^(-i/half), i < half = dim/2, in float64. [...] -> [..., dim]."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=timesteps.device) / half
    angles = timesteps.to(torch.float64)[..., None] * torch.pow(10000.0, -exponents)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim channels rotated by frame, height and width position: 44/42/42 for head_dim 128."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def rope_tables(
    head_dim: int, first_frame: int, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin [tokens, 1, head_dim/2] of the 3-D RoPE angles for a (frames, height, width) token grid.

    Pair j of the frame part turns by position * theta^(-2j/part_dim); the frame position is the absolute
    latent-frame index, so chunk K cached after RoPE keeps its place when the window rolls. Angles are
    computed in float64 (positions reach ~1000) and rounded once to `dtype`.
    """
    frames, height, width = grid
    per_axis = []
    for start, size, part in zip((first_frame, 0, 0), grid, rope_split(head_dim), strict=True):
        positions = torch.arange(start, start + size, dtype=torch.float64, device=device)
        inv_freq = ROPE_THETA ** (-torch.arange(0, part, 2, dtype=torch.float64, device=device) / part)
        per_axis.append(torch.outer(positions, inv_freq))
    angles = torch.cat(
        [
            per_axis[0][:, None, None].expand(frames, height, width, -1),
            per_axis[1][None, :, None].expand(frames, height, width, -1),
            per_axis[2][None, None, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(frames * height * width, 1, head_dim // 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (x[2j], x[2j+1]) of x [B, tokens, heads, head_dim]."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


@dataclass(frozen=True)
class TextState:
    """Per-video text state: every block's cross-attention K and V [B, text_len, heads, head_dim]."""

    kv: tuple[tuple[Tensor, Tensor], ...]


@dataclass(frozen=True)
class ControlState:
    """Per-chunk control state: every block's camera (scale, shift) [B, F, tokens_per_frame, dim]."""

    modulation: tuple[tuple[Tensor, Tensor], ...]


@dataclass(frozen=True)
class _PassContext:
    """What every block of one forward shares. The flags are plain bools: a compiled block guards on them."""

    rope: tuple[Tensor, Tensor]  # cos, sin [tokens, 1, head_dim / 2]
    cache: KVCache | None
    mask: Tensor | None
    backend: AttentionBackend
    e4m3: bool = False  # the cache holds e4m3 (backend `fp8`)
    triton_norm_rope: bool = False  # q/k RMSNorm + RoPE as one kernel in `attend` (cached passes only)
    quantize_in_kernel: bool = False  # fp8 layers get their inputs from fp8_rows.fused_quantize
    gelu_epilogue: bool = False  # the FFN's GELU inside its first GEMM (CUDA)


def _fp8_input(x: Tensor, fused: bool) -> Tensor | Quantized:
    """x for an fp8 layer: quantised by the fused kernel if `fused`, else as it is (the layer quantises)."""
    return fp8_rows.fused_quantize(x) if fused else x


def norm_rope_into(x: Tensor, norm: RMSNorm, rope: tuple[Tensor, Tensor], out: Tensor) -> Tensor:
    """RoPE(norm(x)) for x [B, T, dim] written into `out` [B, T, dim] (a slice of the KV cache, say), in
    out's dtype (e4m3 saturated); rope is (cos, sin) [T, 1, head_dim / 2]. One Triton kernel on CUDA
    (worldgen/models/triton_kernels.py, float32 inside), the model's own ops elsewhere and in float64."""
    if x.is_cuda and x.dtype != torch.float64:
        from worldgen.models.triton_kernels import norm_rope as kernel  # Triton: imported where it can run

        cos, sin = rope
        kernel(x, norm.weight, norm.eps, cos[:, 0], sin[:, 0], out)
        return out
    rotated = _norm_rope(x, norm, rope).flatten(2)
    return out.copy_(to_e4m3(rotated) if out.dtype == E4M3 else rotated)


def _norm_rope(x: Tensor, norm: RMSNorm, rope: tuple[Tensor, Tensor]) -> Tensor:
    """RoPE(norm(x)) in the norm's dtype (float32 or float64): x [B, L, dim] -> [B, L, heads, head_dim]."""
    half_head = rope[0].shape[-1]
    return apply_rope(norm(x).unflatten(-1, (-1, 2 * half_head)), *rope)


class _Attention(nn.Module):
    """q/k/v/o projections with RMSNorm over the full dim on q and k (Wan layout)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def _output(self, heads: Tensor, quantize_in_kernel: bool) -> Tensor:
        """Attention output [B, L, heads, head_dim] -> o projection [B, L, dim]."""
        return self.o(_fp8_input(heads.flatten(2), quantize_in_kernel))


class SelfAttention(_Attention):
    def __init__(self, dim: int, num_heads: int, eps: float, layer: int) -> None:
        super().__init__(dim, num_heads, eps)
        self.layer = layer  # index of this layer's K/V in the cache

    def forward(self, tokens: Tensor | Quantized, ctx: _PassContext) -> Tensor:
        """Token rows [B, L, dim] -> [B, L, dim]: attends to the cache (and this pass's frames) or, without
        a cache, to the tokens under `ctx.mask`."""
        query = self.q(tokens) if ctx.triton_norm_rope else self._rotated(self.q, self.norm_q, tokens, ctx)
        return self._output(self.attend(query, *self.key_value(tokens, ctx), ctx), ctx.quantize_in_kernel)

    def key_value(self, tokens: Tensor | Quantized, ctx: _PassContext) -> tuple[Tensor, Tensor]:
        """Tokens [B, L, dim] -> this pass's K (normed, rotated) and V, [B, L, heads, head_dim] each; in
        e4m3 for an e4m3 cache (cast here, where a compiled block fuses it into RoPE, not in the cache).
        With `triton_norm_rope`, K is the projection [B, L, dim] alone: `store_kv` norms and rotates it."""
        value = self._heads(self.v(tokens))
        value = to_e4m3(value) if ctx.e4m3 else value
        if ctx.triton_norm_rope:
            return self.k(tokens), value
        return self._rotated(self.k, self.norm_k, tokens, ctx), value

    def _rotated(
        self, projection: nn.Module, norm: RMSNorm, tokens: Tensor | Quantized, ctx: _PassContext
    ) -> Tensor:
        """RoPE(norm(projection(tokens))) [B, L, heads, head_dim] in the attention's dtype."""
        rotated = _norm_rope(projection(tokens), norm, ctx.rope).to(projection.output_dtype)
        return to_e4m3(rotated) if ctx.e4m3 else rotated

    def store_kv(self, key: Tensor, value: Tensor, ctx: _PassContext) -> tuple[Tensor, Tensor]:
        """Write this pass's K/V into the cache; returns the visible K and V. With `triton_norm_rope` the
        kernel writes normed, rotated K straight into the cache's slots: no K tensor of its own, no copy."""
        cache = ctx.cache
        if cache is None:
            raise ValueError("store_kv needs the pass's KV cache")
        if not ctx.triton_norm_rope:
            return cache.update(self.layer, key, value)
        cos, sin = ctx.rope
        for tokens, key_slots, value_slots in cache.runs(self.layer):
            norm_rope_into(key[:, tokens], self.norm_k, (cos[tokens], sin[tokens]), key_slots.flatten(2))
            value_slots.copy_(value[:, tokens])
        return cache.visible(self.layer)

    # The cache cursors are host ints that change from chunk to chunk (slots, visible length), and this
    # layer's index differs from block to block: a compiled block (worldgen/compile.py) that traced them
    # would recompile per layer and per cache state. Kept out of the graph, they never reach a guard, and
    # the cache write and SDPA are single kernels that compilation would not fuse anyway.
    @torch.compiler.disable
    def attend(self, query: Tensor, key: Tensor, value: Tensor, ctx: _PassContext) -> Tensor:
        """Write this pass's K/V into the cache (if any), then attend to what the queries may see."""
        if ctx.triton_norm_rope:  # Q is the projection [B, L, dim]: norm and rotate it here
            dtype = E4M3 if ctx.e4m3 else query.dtype
            query = norm_rope_into(query, self.norm_q, ctx.rope, torch.empty_like(query, dtype=dtype))
            query = self._heads(query)
        if ctx.cache is not None:
            key, value = self.store_kv(key, value, ctx)
        return attention(query, key, value, ctx.backend, ctx.mask)


class CrossAttention(_Attention):
    def text_kv(self, text_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded text [B, T, dim] -> K, V [B, T, heads, head_dim]; once per video."""
        key = self._heads(self.norm_k(self.k(text_tokens))).to(self.k.output_dtype)
        return key, self._heads(self.v(text_tokens))

    def forward(
        self, tokens: Tensor | Quantized, text_kv: tuple[Tensor, Tensor], ctx: _PassContext
    ) -> Tensor:
        """Token rows [B, L, dim] attend to the text -> [B, L, dim]."""
        query = self._heads(self.norm_q(self.q(tokens))).to(self.q.output_dtype)
        return self._output(attention(query, *text_kv, ctx.backend), ctx.quantize_in_kernel)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig, layer: int) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.self_attn = SelfAttention(dim, config.num_heads, eps, layer)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.ffn = FeedForward(dim, config.ffn_dim, dim)
        self.cam_injector_layer1 = Linear(dim, dim)
        self.cam_injector_layer2 = Linear(dim, dim)
        self.cam_scale_layer = Linear(dim, dim)
        self.cam_shift_layer = Linear(dim, dim)

    def camera_modulation(
        self, control_tokens: Tensor, quantize_in_kernel: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Control tokens c [B, F, S, dim] -> (scale, shift); depends on the control only, not the time.
        `quantize_in_kernel`: the camera layers are fp8 ones, given inputs quantised by the fused kernel."""
        injected = F.silu(self.cam_injector_layer1(_fp8_input(control_tokens, quantize_in_kernel)))
        hidden = self.cam_injector_layer2(_fp8_input(injected, quantize_in_kernel)) + control_tokens
        hidden = _fp8_input(hidden, quantize_in_kernel)  # one quantisation for both layers
        return self.cam_scale_layer(hidden), self.cam_shift_layer(hidden)

    def forward(
        self,
        x: Tensor,
        time_mod: Tensor,
        text_kv: tuple[Tensor, Tensor],
        camera: tuple[Tensor, Tensor],
        ctx: _PassContext,
    ) -> Tensor:
        """x [B, F, S, dim] residual stream; time_mod [B, F, 6, dim] time projection of each frame."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(time_mod)
        attended = self.self_attn(self._attention_input(x, shift_msa, scale_msa, ctx), ctx).view_as(x)
        if ctx.quantize_in_kernel:
            # One kernel: the residual update, the camera modulation, norm3 and the query's quantisation.
            x, text_query_input = fp8_rows.fused_residual_quantize(
                x, attended, gate=gate_msa, camera=camera, eps=self.eps, mul=self.norm3.weight,
                add=self.norm3.bias,
            )  # fmt: skip
        else:
            cam_scale, cam_shift = camera
            x = (x + gate_msa * attended) * (1 + _upcast(cam_scale)) + cam_shift
            text_query_input = self.norm3(x)
        attended_text = self.cross_attn(text_query_input.flatten(1, 2), text_kv, ctx).view_as(x)
        if ctx.quantize_in_kernel:  # likewise: the residual update, the FFN's norm + modulation, quantisation
            x, ffn_input = fp8_rows.fused_residual_quantize(
                x, attended_text, eps=self.eps, mul=1 + scale_mlp, add=shift_mlp
            )
        else:
            x = x + attended_text
            ffn_input = _modulate(x, shift_mlp, scale_mlp, self.eps)
        hidden = self.ffn(ffn_input.flatten(1, 2), ctx.gelu_epilogue, ctx.quantize_in_kernel)
        return x + gate_mlp * hidden.view_as(x)

    def write_kv(self, x: Tensor, time_mod: Tensor, ctx: _PassContext) -> None:
        """The start of `forward`: write this pass's K/V of x into the cache, and stop there."""
        shift_msa, scale_msa, *_ = self._modulation(time_mod)
        tokens = self._attention_input(x, shift_msa, scale_msa, ctx)
        self.self_attn.store_kv(*self.self_attn.key_value(tokens, ctx), ctx)

    def _modulated_rows(
        self, x: Tensor, shift: Tensor, scale: Tensor, ctx: _PassContext
    ) -> Tensor | Quantized:
        """LayerNorm(x) * (1 + scale) + shift as token rows [B, L, dim] (x [B, F, S, dim]): float32, or, with
        `ctx.quantize_in_kernel`, the fp8 layer's quantised input from one kernel."""
        if ctx.quantize_in_kernel:
            return fp8_rows.fused_quantize(x, eps=self.eps, mul=1 + scale, add=shift).flatten(1, 2)
        return _modulate(x, shift, scale, self.eps).flatten(1, 2)

    def _attention_input(
        self, x: Tensor, shift: Tensor, scale: Tensor, ctx: _PassContext
    ) -> Tensor | Quantized:
        """The modulated stream as token rows, in the dtype the q/k/v projections compute in (bf16 for bf16
        and fp8 layers), or quantised already (`_modulated_rows`). With the cast here, a compiled block's
        first graph writes bf16, instead of float32 that the self-attention's own graph (compile.py) would
        read back only to cast it. bf16 layers compute the same; unfused fp8 layers quantise the bf16-rounded
        rows, which moves an e4m3 code only at rounding ties (the benchmark's fp8 latent error was unchanged
        to three digits); the fused kernel quantises the float32 rows."""
        rows = self._modulated_rows(x, shift, scale, ctx)
        return rows if isinstance(rows, Quantized) else rows.to(self.self_attn.q.output_dtype)

    def _modulation(self, time_mod: Tensor) -> tuple[Tensor, ...]:
        """Shift, scale and gate of self-attention, then of the FFN: [B, F, 1, dim] each, one per frame,
        broadcast over the frame's tokens."""
        return (self.modulation + time_mod).unsqueeze(3).unbind(2)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = Linear(dim, out_features)

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        """x [B, F, S, dim], time_emb [B, F, dim] -> [B, F, S, out_features]."""
        shift, scale = (self.modulation + time_emb.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head(_modulate(x, shift, scale, self.eps))


class CausalDiT(nn.Module):
    """The LingBot-World-Fast transformer; module names give exactly the checkpoint's state-dict keys."""

    def __init__(self, config: DiTConfig, attention_backend: AttentionBackend = "auto") -> None:
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(
                f"DiTConfig: dim {config.dim} must split into {config.num_heads} heads of even size"
            )
        if config.patch_size[0] != 1:
            raise ValueError(f"DiTConfig.patch_size {config.patch_size}: the causal model patches 1 frame")
        self.config = config
        self.attention_backend = attention_backend
        # Hand-fused kernels of the fast path, off by default (the plain path never sets them): Triton
        # kernels (q/k RMSNorm + RoPE writing K into the cache; fp8 layers' inputs quantised in one pass with
        # what precedes them), and the FFN's GELU in its GEMM (CUDA).
        self.triton_kernels = False
        self.gelu_epilogue = False
        dim, patch = config.dim, config.patch_size
        patch_volume = patch[0] * patch[1] * patch[2]
        self.patch_embedding = Conv3d(config.in_dim, dim, kernel_size=patch, stride=patch)
        self.patch_embedding_wancamctrl = Linear(config.control_channels * patch_volume, dim)
        self.c2ws_hidden_states_layer1 = Linear(dim, dim)
        self.c2ws_hidden_states_layer2 = Linear(dim, dim)
        self.text_embedding = FeedForward(config.text_dim, dim, dim)
        self.time_embedding = nn.Sequential(Linear(config.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config, layer) for layer in range(config.num_layers))
        self.head = Head(dim, config.out_dim * patch_volume, config.eps)

    # ----------------------------------------------------------------------------------- setup helpers
    @property
    def attention_backend(self) -> AttentionBackend:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        self._attention_backend = check_backend(backend)

    def set_compute_dtype(self, dtype: torch.dtype) -> CausalDiT:
        """Cast every token-wise Linear/Conv3d to `dtype`; time MLP, modulation and norms stay as they are."""
        for name, module in self.named_modules():
            if isinstance(module, Linear | Conv3d) and not name.startswith(_FLOAT32_MODULES):
                module.to(dtype)
        return self

    def frame_tokens(self, latent_height: int, latent_width: int) -> int:
        _, patch_h, patch_w = self.config.patch_size
        return (latent_height // patch_h) * (latent_width // patch_w)

    def make_kv_cache(
        self,
        *,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        chunk_size: int,
        local_attn_size: int,
        sink_size: int,
        num_frames: int,
    ) -> KVCache:
        """A rolling cache for this model on its device: in the dtype of its K projection's output, or in
        e4m3 with the attention backend `fp8`."""
        key_layer = self.blocks[0].self_attn.k
        return KVCache(
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            frame_tokens=self.frame_tokens(latent_height, latent_width),
            num_heads=self.config.num_heads,
            head_dim=self.config.head_dim,
            chunk_size=chunk_size,
            local_attn_size=local_attn_size,
            sink_size=sink_size,
            num_frames=num_frames,
            dtype=E4M3 if self.attention_backend == "fp8" else key_layer.output_dtype,
            device=key_layer.weight.device,
        )

    # --------------------------------------------------------------------- per-video and per-chunk state
    def prepare_text(self, context: Tensor) -> TextState:
        """Text encoder output [B, T, text_dim] (T <= text_len, zero-padded to text_len) -> TextState."""
        config = self.config
        if context.dim() != 3 or context.shape[-1] != config.text_dim or context.shape[1] > config.text_len:
            raise ValueError(
                f"context must be [batch, tokens <= {config.text_len}, {config.text_dim}], "
                f"got {tuple(context.shape)}"
            )
        context = F.pad(context, (0, 0, 0, config.text_len - context.shape[1]))
        tokens = self.text_embedding(context)
        return TextState(tuple(block.cross_attn.text_kv(tokens) for block in self.blocks))

    def prepare_control(self, control: Tensor) -> ControlState:
        """Control tensor at latent resolution [B, control_channels, F, h, w] -> ControlState."""
        channels = self.config.control_channels
        _, patch_h, patch_w = self.config.patch_size
        bad_grid = control.dim() != 5 or control.shape[3] % patch_h or control.shape[4] % patch_w
        if bad_grid or control.shape[1] != channels:
            raise ValueError(
                f"control must be [batch, {channels}, frames, height, width] with height/width divisible by "
                f"the patch {patch_h}x{patch_w} ({self.config.control_type} mode), got {tuple(control.shape)}"
            )
        batch, _, frames, height, width = control.shape
        # Patch features in (channel, patch row, patch column) order, like the Conv3d patch embedding.
        patches = (
            control.reshape(batch, channels, frames, height // patch_h, patch_h, width // patch_w, patch_w)
            .permute(0, 2, 3, 5, 1, 4, 6)
            .reshape(batch, frames, (height // patch_h) * (width // patch_w), channels * patch_h * patch_w)
        )
        tokens = _upcast(self.patch_embedding_wancamctrl(patches))
        fused = self.quantize_in_kernel
        hidden = F.silu(self.c2ws_hidden_states_layer1(_fp8_input(tokens, fused)))
        tokens = tokens + self.c2ws_hidden_states_layer2(_fp8_input(hidden, fused))
        return ControlState(tuple(block.camera_modulation(tokens, fused) for block in self.blocks))

    @property
    def quantize_in_kernel(self) -> bool:
        """Whether the fp8 layers' inputs come from the fused quantisation kernel: with `triton_kernels` and
        fp8 layers (worldgen/quant.py swaps the q projection, among others)."""
        return self.triton_kernels and self.blocks[0].self_attn.q.weight.dtype == E4M3

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        timestep: float | Tensor,
        y: Tensor,
        text: TextState | Tensor,
        control: ControlState | Tensor,
        *,
        cache: KVCache | None = None,
        first_latent_frame: int = 0,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Velocity [B, out_dim, F, h, w] for the latent x of the same shape (see the module docstring)."""
        grid = self._check_inputs(x, y, cache, attn_mask)
        text, control = self._states(text, control, x.shape[0], grid)
        stream, time_emb, time_mod, ctx = self._begin_pass(
            x, timestep, y, grid, cache, first_latent_frame, attn_mask
        )
        for block, text_kv, camera in zip(self.blocks, text.kv, control.modulation, strict=True):
            stream = block(stream, time_mod, text_kv, camera, ctx)
        return self._unpatchify(_upcast(self.head(stream, time_emb)), grid)

    def update_cache(
        self,
        x: Tensor,
        y: Tensor,
        text: TextState | Tensor,
        control: ControlState | Tensor,
        *,
        cache: KVCache,
        first_latent_frame: int,
    ) -> None:
        """The cache-update pass: the chunk's clean latent x at timestep 0 writes every block's K/V.

        Uncompiled, it writes exactly what `model(x, 0, ...)` writes. With compiled blocks
        (worldgen/compile.py) the last block's K/V come from eager ops (its `forward` is what is compiled),
        so they may differ from the compiled forward's by rounding.
        """
        if not isinstance(cache, KVCache):
            raise ValueError(f"update_cache needs the KV cache to write, got {type(cache).__name__}")
        grid = self._check_inputs(x, y, cache, None)
        text, control = self._states(text, control, x.shape[0], grid)
        stream, _, time_mod, ctx = self._begin_pass(x, 0.0, y, grid, cache, first_latent_frame, None)
        *blocks, last = self.blocks
        for block, text_kv, camera in zip(blocks, text.kv[:-1], control.modulation[:-1], strict=True):
            stream = block(stream, time_mod, text_kv, camera, ctx)
        last.write_kv(stream, time_mod, ctx)

    def _states(
        self, text: TextState | Tensor, control: ControlState | Tensor, batch: int, grid: tuple[int, int, int]
    ) -> tuple[TextState, ControlState]:
        # The plain path passes raw tensors: recompute the text and control states inside this pass.
        text = self.prepare_text(text) if isinstance(text, Tensor) else text
        control = self.prepare_control(control) if isinstance(control, Tensor) else control
        self._check_states(text, control, batch, grid)
        return text, control

    def _begin_pass(
        self,
        x: Tensor,
        timestep: float | Tensor,
        y: Tensor,
        grid: tuple[int, int, int],
        cache: KVCache | None,
        first_latent_frame: int,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, _PassContext]:
        """Patch-embed [x, y]; the time embedding and modulation tables; RoPE; open the pass in the cache."""
        patches = self.patch_embedding(torch.cat([x, y], dim=1))  # [B, dim, F, h', w']
        stream = _upcast(patches.flatten(3).permute(0, 2, 3, 1)).contiguous()  # [B, F, S, dim]
        sinusoid = sinusoidal_embedding(self._frame_timesteps(timestep, x), self.config.freq_dim)
        time_emb = _upcast(self.time_embedding(sinusoid))  # [B, F, dim]
        time_mod = _upcast(self.time_projection(time_emb)).unflatten(-1, (6, self.config.dim))
        rope = rope_tables(self.config.head_dim, first_latent_frame, grid, x.device, stream.dtype)
        if cache is not None:
            cache.begin_pass(first_latent_frame, grid[0])
        ctx = _PassContext(
            rope,
            cache,
            attn_mask,
            self.attention_backend,
            e4m3=cache is not None and cache.keys.dtype == E4M3,
            triton_norm_rope=self.triton_kernels and cache is not None,
            quantize_in_kernel=self.quantize_in_kernel,
            gelu_epilogue=self.gelu_epilogue,
        )
        return stream, time_emb, time_mod, ctx

    def _check_inputs(
        self, x: Tensor, y: Tensor, cache: KVCache | None, attn_mask: Tensor | None
    ) -> tuple[int, int, int]:
        """Validate the pass's tensors; return the token grid (frames, height, width) of x."""
        config = self.config
        _, patch_h, patch_w = config.patch_size
        cond_channels = config.in_dim - config.out_dim
        if x.dim() != 5 or x.shape[1] != config.out_dim or x.shape[3] % patch_h or x.shape[4] % patch_w:
            raise ValueError(
                f"x must be [batch, {config.out_dim}, frames, height, width] with height/width divisible by "
                f"{patch_h}x{patch_w}, got {tuple(x.shape)}"
            )
        if y.shape != (x.shape[0], cond_channels, *x.shape[2:]):
            raise ValueError(f"y must be {[x.shape[0], cond_channels, *x.shape[2:]]}, got {list(y.shape)}")
        batch, _, frames, height, width = x.shape
        grid = (frames, height // patch_h, width // patch_w)
        tokens = frames * grid[1] * grid[2]
        if cache is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask is for the full-sequence forward; a cached pass needs no mask")
            if (cache.batch_size, cache.frame_tokens) != (batch, grid[1] * grid[2]):
                raise ValueError(
                    f"KV cache is for batch {cache.batch_size} x {cache.frame_tokens} tokens per frame, "
                    f"x gives {batch} x {grid[1] * grid[2]}"
                )
        if attn_mask is not None and attn_mask.shape[-2:] != (tokens, tokens):
            raise ValueError(f"attn_mask must end in [{tokens}, {tokens}], got {list(attn_mask.shape)}")
        return grid

    @staticmethod
    def _check_states(text: TextState, control: ControlState, batch: int, grid: tuple[int, int, int]) -> None:
        text_batch = text.kv[0][0].shape[0]
        if text_batch != batch:
            raise ValueError(f"text state is for batch {text_batch}, x has batch {batch}")
        control_shape = list(control.modulation[0][0].shape[:3])
        if control_shape != [batch, grid[0], grid[1] * grid[2]]:
            raise ValueError(
                f"control state is for [batch, frames, tokens] = {control_shape}, but x gives "
                f"{[batch, grid[0], grid[1] * grid[2]]}"
            )

    @staticmethod
    def _frame_timesteps(timestep: float | Tensor, x: Tensor) -> Tensor:
        """A number, [B] or [B, F] -> [B, F] float64 timesteps (one per latent frame)."""
        batch, frames = x.shape[0], x.shape[2]
        if not isinstance(timestep, Tensor):
            # A fill, not a host-to-device copy: a copy from pageable memory would synchronise.
            return torch.full((batch, frames), float(timestep), dtype=torch.float64, device=x.device)
        t = timestep.to(device=x.device, dtype=torch.float64)
        if t.dim() == 0:
            return t.expand(batch, frames)
        if t.shape == (batch,):
            return t[:, None].expand(batch, frames)
        if t.shape == (batch, frames):
            return t
        raise ValueError(
            f"timestep must be a number, [batch] or [batch, frames] = [{batch}, {frames}], "
            f"got shape {list(t.shape)}"
        )

    def _unpatchify(self, patches: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, F, S, (pt ph pw c)] with channels innermost -> [B, c, F*pt, h*ph, w*pw]."""
        frames, height, width = grid
        patch_t, patch_h, patch_w = self.config.patch_size
        channels = self.config.out_dim
        batch = patches.shape[0]
        patches = patches.reshape(batch, frames, height, width, patch_t, patch_h, patch_w, channels)
        return patches.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            batch, channels, frames * patch_t, height * patch_h, width * patch_w
        )

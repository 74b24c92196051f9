"""Causal Wan2.1 video VAE with streaming encode and decode.

Module names follow the official checkpoint (`Wan2.1_VAE.pth`), so its state dict loads as it is.
Everything is causal in time: 3-D convolutions pad only in front, and a `FeatureCache` carries the frames a
layer needs from one chunk of a stream into the next. Every layer also works on many frames at once, so a
one-shot call is simply a stream of one chunk, and a stream gives the same result for any chunking.

Time layout (temporal stride s = 4 for Wan2.1): the stream's first video frame is encoded alone, later frames
in groups of s, one latent frame each; in decode the first latent frame gives 1 video frame, later ones s.

Memory layout: convolutions run channels-last, the layout cuDNN's fast kernels use; NCDHW input would make it
transpose on every call. On this fast path a causal Conv3d with temporal stride 1 runs as one 2-D convolution
per temporal tap (`CausalConv3d`), and nearest upsampling as a broadcast copy (`NearestUpsample2x`).
`set_channels_last(False)` gives the plain path: NCDHW Conv3d and `F.interpolate`.

Precision: the network runs in the dtype of its weights (float32 as released, bfloat16 for speed and memory,
float64 in tests); the latent (de)normalisation around it runs in float32 (float64 for a float64 VAE), so
encoded latents come out in float32 and bf16 rounds only the network's own activations.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldgen.config import VAEConfig

ResampleMode = Literal["upsample2d", "upsample3d", "downsample2d", "downsample3d"]


class FeatureCache:
    """Per-layer state of one stream: the tail frames a causal layer carries into the next chunk."""

    def __init__(self) -> None:
        self._tails: dict[nn.Module, Tensor] = {}
        self._started: set[nn.Module] = set()

    def get(self, layer: nn.Module) -> Tensor | None:
        return self._tails.get(layer)

    def put(
        self, layer: nn.Module, tail: Tensor, memory_format: torch.memory_format = torch.preserve_format
    ) -> None:
        # A clone, so the cache does not keep the whole chunk's activation alive through a view.
        self._tails[layer] = tail.clone(memory_format=memory_format)

    def first_call(self, layer: nn.Module) -> bool:
        """True the first time `layer` asks in this stream (it then sees the stream's first frame)."""
        first = layer not in self._started
        self._started.add(layer)
        return first


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time only in front: with zeros at the stream's start, then with the cached frames.

    With channels-last layout (the fast path, the default; `set_channels_last`) and temporal stride 1, it
    runs as one 2-D convolution per temporal tap, over the frames that tap reads, summed in place. On an
    H200 cuDNN ran the decoder's 3-D convolutions of 96 channels with sm80 kernels at about 250 TFLOP/s,
    and PyTorch adds a 3-D convolution's bias in a separate non-vectorised pass over the output (16 ms of a
    chunk's decode); the 2-D path has Hopper kernels and adds the bias inside the convolution
    (docs/benchmarks.md, eighth round). Summing the taps rounds each partial sum to the VAE's dtype: in
    bf16 about three times the rounding of one convolution (relative L2 0.0036 against 0.0012 on random
    data); in float64 it equals the Conv3d to rounding. The weight is then laid out tap-major, so each
    tap's slice is a dense channels-last kernel that needs no copy.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, pad_h, pad_w))
        self.front_frames = 2 * pad_t
        self.set_channels_last(True)

    def set_channels_last(self, enabled: bool) -> None:
        """The fast layout (channels-last input; a tap-major weight where the layer runs as taps, else a
        channels_last_3d one) or the plain one (NCDHW input and weight, one Conv3d)."""
        self.memory_format = torch.channels_last_3d if enabled else torch.contiguous_format
        weight = self.weight.data
        if self.runs_as_taps:  # each temporal tap's slice [out, in, kh, kw]: a dense channels-last kernel
            self.weight.data = weight.permute(2, 0, 3, 4, 1).contiguous().permute(1, 4, 0, 2, 3)
        else:
            self.weight.data = weight.contiguous(memory_format=self.memory_format)

    @property
    def runs_as_taps(self) -> bool:
        """Whether this layer runs as 2-D convolutions per temporal tap: channels-last, temporal stride 1."""
        return self.memory_format == torch.channels_last_3d and self.stride[0] == 1

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self._with_front_frames(x, cache) if self.front_frames else x
        x = x.contiguous(memory_format=self.memory_format)
        return self._taps(x) if self.runs_as_taps else super().forward(x)

    def _with_front_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, C, T, H, W] after the frames this layer needs in front (the cached tail, or zeros at the
        stream's start), in the layer's memory format; the new tail goes into the cache in that format too.
        Explicitly: with one frame, [B, C, 1, H, W] is both channels-last and contiguous, and padding or
        concatenating it lets PyTorch pick the contiguous format, which a cached tail would then carry
        into every later chunk (each convolution re-laying out its input: 255 against about 125 ms per
        chunk decode on an H200 when a stream starts with one latent frame)."""
        batch, channels, frames, height, width = x.shape
        front = self.front_frames
        shape = (batch, channels, front + frames, height, width)
        padded = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=self.memory_format)
        tail = cache.get(self)
        padded[:, :, :front] = 0 if tail is None else tail
        padded[:, :, front:] = x
        cache.put(self, padded[:, :, -front:], self.memory_format)
        return padded

    def _taps(self, x: Tensor) -> Tensor:
        """out[t] = sum over taps k of conv2d(x[t + k], weight[:, :, k]), x [B, C, T, H, W] channels-last."""
        frames = x.transpose(1, 2)  # [B, T, C, H, W]: each frame an NHWC image
        out_frames = frames.shape[1] - self.kernel_size[0] + 1
        if out_frames < 1:
            raise ValueError(
                f"CausalConv3d: {frames.shape[1]} frames (cached ones included) for a temporal kernel of "
                f"{self.kernel_size[0]}"
            )

        def tap(k: int, bias: Tensor | None) -> Tensor:
            # The tap's frames as NHWC images [B * T', C, H, W]: a view for batch 1, else one copy in NHWC.
            images = frames[:, k : k + out_frames].movedim(2, -1).flatten(0, 1).movedim(-1, 1)
            return F.conv2d(images, self.weight[:, :, k], bias, self.stride[1:], self.padding[1:])

        out = tap(0, self.bias)
        for k in range(1, self.kernel_size[0]):
            out.add_(tap(k, None))
        return _images_to_frames(out, x.shape[0])


class RMSNorm(nn.Module):
    """Scale each position's channel vector to unit RMS, times a learned per-channel gain.

    The checkpoint's form is `normalize(x, dim=1) * sqrt(C) * gamma`: a norm reduction and three passes that
    broadcast over the channels (about 60 ms of a 0.19 s bf16 chunk decode on H200). With `channels_last`
    (set by `WanVAE.set_channels_last`) the channels are innermost in memory, so the same function runs as
    one `F.rms_norm` over the last dim of a permuted view: x * rsqrt(mean(x^2) + eps) * gamma, with eps
    standing in for normalize's 1e-12 clamp on the norm. With `triton` (`WanVAE.set_triton_norms`), a CUDA
    tensor whose channels are innermost takes one Triton kernel (worldgen/models/triton_kernels.py, float32
    inside, so float64 stays on the eager ops) for the norm and the SiLU.

    `silu`: the norm followed by SiLU, as the residual blocks and the head always pair them (the checkpoint's
    SiLU at the next index holds no weights; it is an Identity here).
    """

    def __init__(self, dim: int, spatial_dims: int, silu: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))
        self.scale = dim**0.5
        self.eps = 1e-24 / dim  # (1e-12)^2 / C: normalize's clamp, on the mean square
        self.silu = silu
        self.channels_last = False
        self.triton = False

    def forward(self, x: Tensor) -> Tensor:
        if self.triton and x.is_cuda and x.dtype != torch.float64 and x.movedim(1, -1).is_contiguous():
            from worldgen.models.triton_kernels import rms_norm_channels  # Triton: imported where it can run

            return rms_norm_channels(x, self.gamma.flatten(), self.eps, self.silu)
        if self.channels_last:
            normed = F.rms_norm(x.movedim(1, -1), (x.shape[1],), self.gamma.flatten(), self.eps)
            normed = normed.movedim(-1, 1)
        else:
            normed = F.normalize(x, dim=1) * self.scale * self.gamma
        return F.silu(normed) if self.silu else normed


def _frames_to_images(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]; a view when x is channels_last_3d (it is then NHWC)."""
    return x.transpose(1, 2).flatten(0, 1)


def _images_to_frames(x: Tensor, batch: int) -> Tensor:
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Index 5 is the checkpoint's (inference-time no-op) dropout; it keeps the later index at 6.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, spatial_dims=3, silu=True),
            nn.Identity(),  # the checkpoint's SiLU, applied by the norm before it
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, spatial_dims=3, silu=True),
            nn.Identity(),  # SiLU, likewise
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x, cache)
        return _run_layers(self.residual, x, cache) + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame; frames do not see each other."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:  # stateless in time: no cache use
        batch, height, width = x.shape[0], x.shape[3], x.shape[4]
        qkv = self.to_qkv(self.norm(_frames_to_images(x)))
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [B*T, 1, H*W, C] each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).unflatten(2, (height, width))
        return x + _images_to_frames(self.proj(out), batch)


class NearestUpsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling of images [N, C, H, W] (the checkpoint's "nearest-exact", which at
    scale 2 repeats each pixel twice in each direction). A channels-last input is expanded and copied in
    one broadcast copy that keeps its layout: 2.1 to 2.2x faster than `F.interpolate`'s NHWC kernel on an
    H200 at the decoder's shapes, and bit-identical. Other layouts (the plain path) take `F.interpolate`."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):
            return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
        batch, channels, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1)[:, :, None, :, None]  # [N, H, 1, W, 1, C]
        doubled = pixels.expand(batch, height, 2, width, 2, channels)
        return doubled.reshape(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)


class Resample(nn.Module):
    """2x spatial up/downsampling per frame, plus 2x in time for the "3d" modes."""

    def __init__(self, dim: int, mode: ResampleMode) -> None:
        super().__init__()
        self.mode = mode
        self.time_conv: CausalConv3d | None = None
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            # Pad right/bottom only, then a valid stride-2 conv: H -> H/2 without a centred pad.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = _images_to_frames(self.resample(_frames_to_images(x)), x.shape[0])
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        # The stream's first frame stays one frame and never enters the temporal conv: as in the checkpoint's
        # own decoder, the later frames' causal conv starts from zero padding, not from frame 0.
        first = x[:, :, :1] if cache.first_call(self) else None
        rest = x if first is None else x[:, :, 1:]
        if rest.shape[2]:
            # Output channels [0:C] are each frame's first sub-frame, [C:2C] its second.
            pairs = self.time_conv(rest, cache)
            batch, channels, frames, height, width = rest.shape
            rest = torch.empty(
                (batch, channels, 2 * frames, height, width),
                dtype=pairs.dtype,
                device=pairs.device,
                memory_format=self.time_conv.memory_format,
            )
            rest[:, :, 0::2] = pairs[:, :channels]
            rest[:, :, 1::2] = pairs[:, channels:]
        return rest if first is None else torch.cat([first, rest], dim=2)

    def _halve_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        # The stream's first frame passes through; a valid stride-2 conv then covers each later pair of
        # frames together with the frame before it, so the last frame is carried into the next chunk.
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:])
        if previous is not None:
            return self.time_conv(torch.cat([previous, x], dim=2), cache)
        first = x[:, :, :1]
        return torch.cat([first, self.time_conv(x, cache)], dim=2) if x.shape[2] > 1 else first


CachedLayer = CausalConv3d | ResidualBlock | AttentionBlock | Resample


def _run_layers(layers: nn.Sequential, x: Tensor, cache: FeatureCache) -> Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, CachedLayer) else layer(x)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    # Index 1 is the checkpoint's SiLU, applied by the norm.
    norm = RMSNorm(dim, spatial_dims=3, silu=True)
    return nn.Sequential(norm, nn.Identity(), CausalConv3d(dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2*z_dim, latent T, H/8, W/8] (mean and log-variance)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * mult for mult in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        for stage, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for block_in in (in_dim, *(out_dim,) * (config.num_res_blocks - 1)):
                blocks.append(ResidualBlock(block_in, out_dim))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
            if stage < len(config.temporal_downsample):
                blocks.append(
                    Resample(out_dim, "downsample3d" if config.temporal_downsample[stage] else "downsample2d")
                )
                scale /= 2
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        for layers in (self.downsamples, self.middle, self.head):
            x = _run_layers(layers, x, cache)
        return x


class Decoder3d(nn.Module):
    """Latent [B, z_dim, t, h, w] -> video [B, 3, T, 8h, 8w]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * mult for mult in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(config.dim_mult) - 2)
        for stage, (in_dim, out_dim) in enumerate(pairwise(dims)):
            # Every upsampling Resample halves the channels, so later stages start from half of `in_dim`.
            first_in = in_dim if stage == 0 else in_dim // 2
            for block_in in (first_in, *(out_dim,) * config.num_res_blocks):
                blocks.append(ResidualBlock(block_in, out_dim))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
            if stage < len(temporal_upsample):
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[stage] else "upsample2d"))
                scale *= 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        for layers in (self.middle, self.upsamples, self.head):
            x = _run_layers(layers, x, cache)
        return x


class WanVAE(nn.Module):
    """The Wan2.1 VAE: `encode` gives normalised latents, `decode` takes them back to raw video (about
    [-1, 1]; `to_uint8_frames` clamps).

    Runs in the dtype of its parameters (float32 by default), inputs cast to it; `converted(dtype)` gives a
    copy in another dtype (`.to(dtype)` converts in place but rounds the latent statistics with the weights).
    `encode` / `decode` are one-shot causal calls; `encode_stream()` / `decode_stream()` give chunk-by-chunk
    streams with identical results.
    """

    def __init__(self, config: VAEConfig, *, channels_last: bool = True) -> None:
        super().__init__()
        if len(config.temporal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig.temporal_downsample has {len(config.temporal_downsample)} entries; "
                f"dim_mult {config.dim_mult} needs {len(config.dim_mult) - 1}"
            )
        for name in ("latent_mean", "latent_std"):
            if len(getattr(config, name)) != config.z_dim:
                raise ValueError(
                    f"VAEConfig.{name} has {len(getattr(config, name))} entries, z_dim is {config.z_dim}"
                )
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self._make_latent_stats(self.conv1.weight.device, self.conv1.weight.dtype)
        self.set_channels_last(channels_last)
        self.set_triton_norms(False)
        self.register_load_state_dict_post_hook(WanVAE._after_load)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _make_latent_stats(self, device: torch.device, dtype: torch.dtype) -> None:
        # Not in the checkpoint (non-persistent): they come from the config. Never below float32: they scale
        # the latents outside the network, where a bf16 VAE has no reason to round.
        dtype = torch.promote_types(dtype, torch.float32)
        for name in ("latent_mean", "latent_std"):
            stats = torch.tensor(getattr(self.config, name), device=device, dtype=dtype).view(1, -1, 1, 1, 1)
            self.register_buffer(name, stats, persistent=False)

    @staticmethod
    def _after_load(module: nn.Module, _incompatible_keys: object) -> None:
        # Loaded tensors may replace the parameters (`assign=True`, e.g. onto a meta-built model): put them in
        # the chosen layout once here, and rebuild the statistics that a meta or `to_empty` model lacks.
        assert isinstance(module, WanVAE)
        module.set_channels_last(module.channels_last)
        module._make_latent_stats(module.conv1.weight.device, module.dtype)

    def set_channels_last(self, enabled: bool) -> None:
        """Channels-last weights and Conv3d inputs (the fast cuDNN path) or plain NC(D)HW (for comparison)."""
        self.channels_last = enabled
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.set_channels_last(enabled)
            elif isinstance(module, nn.Conv3d | nn.Conv2d):
                fast = torch.channels_last_3d if isinstance(module, nn.Conv3d) else torch.channels_last
                layout = fast if enabled else torch.contiguous_format
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
            elif isinstance(module, RMSNorm):
                module.channels_last = enabled

    def set_triton_norms(self, enabled: bool) -> None:
        """Every RMSNorm (and the SiLU after it) as one Triton kernel on CUDA, with channels-last tensors."""
        self.triton_norms = enabled
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.triton = enabled

    def converted(self, dtype: torch.dtype) -> WanVAE:
        """A copy of this VAE with its weights in `dtype` (statistics rebuilt, layout and norm kernels kept);
        this one is left as it is, so models shared with another user are never changed under it."""
        with torch.device("meta"):
            copy = WanVAE(self.config, channels_last=self.channels_last)
        weights = {name: tensor.to(dtype) for name, tensor in self.state_dict().items()}
        copy.load_state_dict(weights, strict=True, assign=True)  # the load hook rebuilds the statistics
        copy.set_triton_norms(self.triton_norms)
        return copy.train(self.training).requires_grad_(self.conv1.weight.requires_grad)

    def encode_stream(self) -> EncodeStream:
        return EncodeStream(self)

    def decode_stream(self, frames_per_step: int | None = None) -> DecodeStream:
        """A decode stream; `frames_per_step` latent frames go through the decoder at a time (None: each
        chunk at once). Smaller steps cut the activation memory; the video is the same up to rounding."""
        return DecodeStream(self, frames_per_step)

    def encode(self, video: Tensor) -> Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [B, z_dim, 1 + k, H/8, W/8]."""
        with self.encode_stream() as stream:
            return stream.encode(video)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, z_dim, n, h, w] -> video [B, 3, 1 + 4(n-1), 8h, 8w] (not clamped)."""
        with self.decode_stream() as stream:
            return stream.decode(latents)


class _Stream:
    """Start, then chunk calls, then finish; holds the feature cache between chunks."""

    kind = "stream"

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self._cache: FeatureCache | None = None
        self._chunks = 0
        self._frame_shape: tuple[int, ...] = ()  # batch, height, width of the stream's first chunk

    @property
    def started(self) -> bool:
        return self._cache is not None

    def start(self) -> Self:
        if self._cache is not None:
            raise RuntimeError(f"{self.kind} already started: call finish() before starting it again")
        self._cache = FeatureCache()
        self._chunks = 0
        return self

    def finish(self) -> None:
        """End the stream and release its cached frames."""
        if self._cache is None:
            raise RuntimeError(f"{self.kind}.finish() called before start()")
        self._cache = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.finish()

    def _check_chunk(self, x: Tensor, first: bool) -> None:
        """Raise ValueError when `x` cannot be the stream's next chunk."""
        raise NotImplementedError

    def _next_chunk(self, x: Tensor) -> FeatureCache:
        """Check the stream state and the chunk; returns the cache to run the chunk with."""
        if self._cache is None:
            raise RuntimeError(f"{self.kind} not started: call start() before sending chunks")
        self._check_chunk(x, first=self._chunks == 0)
        frame_shape = (x.shape[0], *x.shape[3:])
        if self._chunks and frame_shape != self._frame_shape:
            raise ValueError(
                f"{self.kind}: chunk {self._chunks} has batch, height, width {frame_shape}; "
                f"the stream started with {self._frame_shape}"
            )
        self._frame_shape = frame_shape
        self._chunks += 1
        return self._cache

    def _check_layout(self, x: Tensor, name: str, channels: int) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{self.kind}: {name} must be [B, {channels}, T, H, W], got {list(x.shape)}")


class EncodeStream(_Stream):
    """Video chunks -> normalised latent chunks. Chunk 0 holds 1 + 4k frames, later chunks 4k (k >= 1)."""

    kind = "VAE encode stream"

    def _check_chunk(self, x: Tensor, first: bool) -> None:
        self._check_layout(x, "video", 3)
        stride, frames = self.vae.config.temporal_stride, x.shape[2]
        if (frames - 1 if first else frames) % stride or frames < (1 if first else stride):
            wanted = f"1 + {stride}k frames (k >= 0)" if first else f"{stride}k frames (k >= 1)"
            raise ValueError(
                f"{self.kind}: chunk {self._chunks} has {frames} frames but must have {wanted}: "
                f"the first frame is encoded alone, later frames in groups of {stride}"
            )
        spatial = self.vae.config.spatial_stride
        if x.shape[3] % spatial or x.shape[4] % spatial:
            raise ValueError(
                f"{self.kind}: video height and width must be multiples of {spatial}, got {list(x.shape[3:])}"
            )

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Video chunk [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, z_dim, t, H/8, W/8]."""
        cache = self._next_chunk(video)
        vae = self.vae
        moments = vae.conv1(vae.encoder(video.to(vae.dtype), cache), cache)
        mu = moments[:, : vae.config.z_dim]  # the rest is the log-variance, unused at inference
        return (mu.to(vae.latent_mean.dtype) - vae.latent_mean) / vae.latent_std


class DecodeStream(_Stream):
    """Normalised latent chunks -> video chunks: the first latent frame gives 1 frame, later ones 4."""

    kind = "VAE decode stream"

    def __init__(self, vae: WanVAE, frames_per_step: int | None = None) -> None:
        if frames_per_step is not None and frames_per_step < 1:
            raise ValueError(
                f"{self.kind}: frames_per_step must be a number of latent frames >= 1 or None (the whole "
                f"chunk), got {frames_per_step!r}"
            )
        super().__init__(vae)
        self.frames_per_step = frames_per_step

    def _check_chunk(self, x: Tensor, first: bool) -> None:
        self._check_layout(x, "latents", self.vae.config.z_dim)
        if x.shape[2] == 0:
            raise ValueError(f"{self.kind}: chunk {self._chunks} has no latent frames")

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latent chunk [B, z_dim, t, h, w] -> video [B, 3, T, 8h, 8w], raw (not clamped), in the VAE's dtype.

        With `frames_per_step`, the chunk's latent frames go through the decoder a few at a time, the
        feature cache carrying each step into the next as it carries chunks: the same video, with the
        activations of `frames_per_step` latent frames alive at once instead of the whole chunk's.
        """
        cache = self._next_chunk(latents)
        vae = self.vae
        z = latents.to(vae.latent_std.dtype) * vae.latent_std + vae.latent_mean
        z = vae.conv2(z.to(vae.dtype), cache)
        step = self.frames_per_step or z.shape[2]
        videos = [vae.decoder(z[:, :, first : first + step], cache) for first in range(0, z.shape[2], step)]
        return videos[0] if len(videos) == 1 else torch.cat(videos, dim=2)


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """Decoded video [3, T, H, W] or [1, 3, T, H, W] -> host uint8 frames [T, H, W, 3].

    Clamps to [-1, 1] and maps (x + 1) * 127.5, rounded to nearest (truncation would bias every pixel down
    by half a step and reach 255 only at exactly 1.0). Computed in float32 on the video's device, so only the
    uint8 frames cross to the host.
    """
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"to_uint8_frames takes one video; got a batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(
            f"to_uint8_frames expects video [3, T, H, W] or [1, 3, T, H, W], got {list(video.shape)}"
        )
    pixels = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()

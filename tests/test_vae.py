"""The causal Wan2.1 VAE: streaming == one-shot, channels-last == plain, checkpoint layout, stream misuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cuda_test, relative_error
from torch.overrides import TorchFunctionMode

from worldgen.config import VAEConfig, get_preset
from worldgen.models.vae import (
    CausalConv3d,
    FeatureCache,
    NearestUpsample2x,
    RMSNorm,
    WanVAE,
    to_uint8_frames,
)

TINY = get_preset("tiny").vae
LATENT_FRAMES = 4  # chunks of 1, 2, 3 split it as 1+1+1+1, 2+2, 3+1
LATENT_HW = (2, 2)


def _video_frames(latent_frames: int) -> int:
    return 1 + 4 * (latent_frames - 1)


def _random_vae(channels_last: bool = True, dtype: torch.dtype = torch.float64) -> WanVAE:
    """Tiny VAE with seeded random weights; gains away from 1 so the norms matter."""
    torch.manual_seed(0)
    vae = WanVAE(TINY, channels_last=channels_last).to(dtype)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return vae


def _latents(dtype: torch.dtype = torch.float64, frames: int = LATENT_FRAMES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, TINY.z_dim, frames, *LATENT_HW, generator=generator, dtype=dtype)


def _video(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    size = (1, 3, _video_frames(LATENT_FRAMES), 8 * LATENT_HW[0], 8 * LATENT_HW[1])
    return torch.rand(size, generator=generator, dtype=dtype) * 2 - 1


def _chunk_sizes(total: int, chunk: int) -> list[int]:
    return [min(chunk, total - start) for start in range(0, total, chunk)]


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return _random_vae()


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_decode_equals_one_shot(vae: WanVAE, chunk: int) -> None:
    latents = _latents()
    expected = vae.decode(latents)
    assert expected.shape == (1, 3, _video_frames(LATENT_FRAMES), 8 * LATENT_HW[0], 8 * LATENT_HW[1])

    outputs, start = [], 0
    with vae.decode_stream() as stream:
        for size in _chunk_sizes(LATENT_FRAMES, chunk):
            frames = stream.decode(latents[:, :, start : start + size])
            # The first latent frame decodes to 1 video frame, every later one to 4.
            assert frames.shape[2] == (_video_frames(size) if start == 0 else 4 * size)
            outputs.append(frames)
            start += size
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_encode_equals_one_shot(vae: WanVAE, chunk: int) -> None:
    video = _video()
    expected = vae.encode(video)
    assert expected.shape == (1, TINY.z_dim, LATENT_FRAMES, *LATENT_HW)

    outputs, start = [], 0
    with vae.encode_stream() as stream:
        for index, size in enumerate(_chunk_sizes(LATENT_FRAMES, chunk)):
            frames = _video_frames(size) if index == 0 else 4 * size
            latents = stream.encode(video[:, :, start : start + frames])
            assert latents.shape[2] == size
            outputs.append(latents)
            start += frames
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=1e-12, atol=1e-12)


def test_one_stream_can_be_restarted(vae: WanVAE) -> None:
    latents = _latents()[:, :, :2]
    stream = vae.decode_stream()
    runs = []
    for _ in range(2):
        stream.start()
        runs.append(torch.cat([stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:])], dim=2))
        stream.finish()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


class _ConvLayouts(TorchFunctionMode):
    """Notes every 3-D and 2-D convolution run: its kind, and whether its input and weight are both
    channels-last (channels_last_3d for a 3-D one)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kinds = {torch.conv3d: ("conv3d", torch.channels_last_3d), F.conv2d: ("conv2d", torch.channels_last)}
        if func in kinds:
            kind, layout = kinds[func]
            self.calls.append((kind, all(t.is_contiguous(memory_format=layout) for t in args[:2])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
    ("spatial_dims", "dtype", "tolerance"),
    [(2, torch.float64, 1e-12), (3, torch.float64, 1e-12), (3, torch.float32, 1e-6)],
)
def test_channels_last_rms_norm_is_the_checkpoints_normalize(
    spatial_dims: int, dtype: torch.dtype, tolerance: float, silu: bool
) -> None:
    norm = RMSNorm(6, spatial_dims, silu=silu).to(dtype)
    with torch.no_grad():
        norm.gamma.normal_()
    layout = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    x = torch.randn(2, 6, *(3,) * spatial_dims, dtype=dtype).contiguous(memory_format=layout)
    x[0, :, 0] = 0.0  # zero channel vectors stay zero, as normalize leaves them
    x[1, :, 0] *= 1e-6  # small ones are scaled up to unit RMS like any other
    expected = F.normalize(x, dim=1) * 6**0.5 * norm.gamma
    expected = F.silu(expected) if silu else expected
    torch.testing.assert_close(norm(x), expected, rtol=tolerance, atol=tolerance)
    norm.channels_last = True
    fused = norm(x)
    assert fused.is_contiguous(memory_format=layout)
    torch.testing.assert_close(fused, expected, rtol=tolerance, atol=tolerance)


@cuda_test
def test_causal_conv_taps_on_gpu_stay_within_bf16_rounding() -> None:
    """cuDNN's 2-D taps in bf16 at the decoder's full-resolution width (96 channels) against the float32
    Conv3d: a relative L2 error of a few bf16 roundings (measured 0.0036 at 480 x 832 in the probe)."""
    generator = torch.Generator(device="cuda").manual_seed(7)
    conv3d = CausalConv3d(96, 96, 3, padding=1).cuda()
    conv3d.set_channels_last(False)
    taps = copy.deepcopy(conv3d).bfloat16()
    taps.set_channels_last(True)
    video = torch.randn(1, 96, 6, 24, 40, device="cuda", generator=generator)
    exact = conv3d(video, FeatureCache())
    result = taps(video.bfloat16().contiguous(memory_format=torch.channels_last_3d), FeatureCache())
    assert result.dtype == torch.bfloat16 and result.is_contiguous(memory_format=torch.channels_last_3d)
    assert relative_error(result.float(), exact) < 0.01


@cuda_test
def test_triton_norms_match_the_channels_last_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton RMSNorm (+ SiLU) at the full VAE's channel counts in bf16, rows that fill no whole tile,
    against the same norm in float32; then the tiny VAE's decode with every norm on it."""
    import worldgen.models.triton_kernels as kernels  # Triton: on CUDA machines only

    generator = torch.Generator(device="cuda").manual_seed(6)
    for channels, shape, layout in ((96, (1, 96, 3, 10, 14), torch.channels_last_3d),
                                    (384, (3, 384, 6, 10), torch.channels_last)):  # fmt: skip
        x = (4 * torch.randn(shape, device="cuda", generator=generator)).bfloat16()
        x = x.contiguous(memory_format=layout)
        norm = RMSNorm(channels, len(shape) - 2).cuda()
        norm.gamma.uniform_(0.5, 1.5, generator=generator)
        norm.gamma.copy_(norm.gamma.bfloat16())  # the same gains in float32 and bf16
        norm.channels_last = True
        for silu in (False, True):
            norm.silu, norm.triton = silu, False
            exact = norm(x.float())
            norm.bfloat16().triton = True
            result = norm(x)
            norm.float()
            assert result.dtype == torch.bfloat16 and result.is_contiguous(memory_format=layout)
            # One bf16 rounding of the float32 result: 2^-8.
            torch.testing.assert_close(result.float(), exact, rtol=2**-7, atol=1e-5)
    with pytest.raises(ValueError, match="must be channels-last"):
        kernels.rms_norm_channels(x.contiguous(), norm.gamma.flatten(), norm.eps, silu=True)
    with pytest.raises(ValueError, match=r"gamma \[96\] must be \[384\]"):
        kernels.rms_norm_channels(x, torch.ones(96, device="cuda"), norm.eps, silu=True)
    model = _random_vae(dtype=torch.float32).cuda()
    latents = _latents(torch.float32).cuda()
    reference = model.decode(latents)
    model.to(torch.bfloat16)
    kernel_calls = []  # the kernel's calls: the eager fallback would pass the comparison too

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        kernel_calls.append(x.shape[1])
        return kernel(x, *args)

    kernel = kernels.rms_norm_channels
    monkeypatch.setattr(kernels, "rms_norm_channels", counted)
    errors = {}
    for triton in (False, True):
        model.set_triton_norms(triton)
        kernel_calls.clear()
        errors[triton] = relative_error(model.decode(latents), reference)
    # The kernel ran (inputs that are not channels-last, which tiny shapes can give, take the eager norm;
    # a full-size chunk decode ran all 30 of its norms through it: docs/benchmarks.md, run KP).
    assert kernel_calls
    # The Triton path rounds once where the eager one rounds after the norm and again after the SiLU.
    assert errors[True] < max(1.5 * errors[False], 1e-3), errors


def test_channels_last_path_equals_plain_path() -> None:
    """The fast path (channels-last; causal convolutions as 2-D taps, the encoder's temporally strided ones
    as Conv3d) equals the plain path (every convolution NC(D)HW, each causal one a Conv3d) in float64."""
    latents, video = _latents(), _video()
    outputs = {}
    calls = {}
    for channels_last in (True, False):
        model = _random_vae(channels_last=channels_last)
        with _ConvLayouts() as layouts:
            outputs[channels_last] = (model.encode(video), model.decode(latents))
        calls[channels_last] = layouts.calls
    # Every convolution sees channels-last input and weight on the fast path; no Conv3d on the plain one
    # (each has several channels and pixels, so the two layouts cannot coincide; a 1x1 Conv2d's can).
    assert all(fast for _, fast in calls[True])
    assert not any(fast for kind, fast in calls[False] if kind == "conv3d")
    strided = sum(isinstance(m, CausalConv3d) and m.stride[0] > 1 for m in model.modules())
    assert strided and [kind for kind, _ in calls[True]].count("conv3d") == strided
    for fast, plain in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)


def _causal_conv_pair(kernel: tuple[int, int, int]) -> dict[bool, CausalConv3d]:
    """The same float64 layer as 2-D taps (True: channels-last, the default) and as one Conv3d (False)."""
    torch.manual_seed(3)
    taps = CausalConv3d(4, 6, kernel, padding=tuple(size // 2 for size in kernel)).double()
    conv3d = copy.deepcopy(taps)
    conv3d.set_channels_last(False)
    assert taps.runs_as_taps and not conv3d.runs_as_taps
    assert taps.weight[:, :, 0].is_contiguous(memory_format=torch.channels_last)  # tap-major
    return {True: taps, False: conv3d}


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (1, 1, 1)])
def test_causal_conv_taps_equal_conv3d_across_a_stream(kernel: tuple[int, int, int]) -> None:
    """Each temporal tap as a 2-D convolution over two chunks of a stream, batch 2 (the tap's frames are
    then copied, in NHWC), against the same layer as one Conv3d."""
    layers = _causal_conv_pair(kernel)
    video = torch.randn(2, 4, 5, 6, 8, dtype=torch.float64)
    outputs = {}
    for taps, layer in layers.items():
        cache = FeatureCache()
        with _ConvLayouts() as layouts:
            outputs[taps] = torch.cat([layer(video[:, :, :2], cache), layer(video[:, :, 2:], cache)], dim=2)
        if taps:
            assert layouts.calls == [("conv2d", True)] * 2 * kernel[0]
    assert outputs[True].is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-12, atol=1e-12)


def test_causal_conv_from_a_one_frame_start_keeps_its_layout_and_values() -> None:
    """A stream that starts with one frame: [B, C, 1, H, W] is both channels-last and contiguous, and the
    padded input PyTorch would build from it is contiguous. The cached tail must still be channels-last,
    or every later chunk would carry the wrong layout (and re-lay out every convolution's input); the
    values are the Conv3d's."""
    layers = _causal_conv_pair((3, 3, 3))
    caches = {taps: FeatureCache() for taps in layers}
    for frames in (1, 3, 3):
        video = torch.randn(1, 4, frames, 5, 6, dtype=torch.float64)
        out = layers[True](video.contiguous(memory_format=torch.channels_last_3d), caches[True])
        tail = caches[True].get(layers[True])
        assert tail is not None and tail.shape[2] == 2
        assert tail.is_contiguous(memory_format=torch.channels_last_3d) and not tail.is_contiguous()
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(out, layers[False](video, caches[False]), rtol=1e-12, atol=1e-12)


def test_causal_conv_refuses_fewer_frames_than_its_kernel() -> None:
    layer = CausalConv3d(4, 6, (3, 1, 1))  # no temporal padding: 3 frames in, 1 out
    with pytest.raises(ValueError, match=r"2 frames \(cached ones included\) for a temporal kernel of 3"):
        layer(torch.randn(1, 4, 2, 5, 6), FeatureCache())


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_nearest_upsample_is_the_checkpoints_nearest_exact(layout: torch.memory_format) -> None:
    images = torch.randn(2, 5, 3, 4).contiguous(memory_format=layout)
    doubled = NearestUpsample2x()(images)
    assert doubled.is_contiguous(memory_format=layout)
    expected = torch.nn.Upsample(scale_factor=2.0, mode="nearest-exact")(images)
    torch.testing.assert_close(doubled, expected, rtol=0, atol=0)


def test_bfloat16_option_tracks_float32() -> None:
    model = _random_vae(dtype=torch.float32)
    assert WanVAE(TINY).dtype == torch.float32  # the default
    reference = model.decode(_latents(torch.float32))
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    decoded = model.decode(_latents(torch.float32))  # inputs are cast to the model's dtype
    assert decoded.dtype == torch.bfloat16
    assert (decoded.float() - reference).abs().max() < 0.1 * reference.abs().max()


def _reference_keys(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "reference" / "wan21_vae.keys.json").read_text())


def test_full_size_meta_model_has_reference_keys_and_shapes(shared_dir: Path) -> None:
    reference = _reference_keys(shared_dir)
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == {name: entry["shape"] for name, entry in reference["tensors"].items()}
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


def test_assign_load_onto_meta_model_restores_layout_and_statistics() -> None:
    weights = _random_vae(channels_last=False, dtype=torch.float32).state_dict()
    with torch.device("meta"):
        model = WanVAE(TINY)
    model.load_state_dict(weights, assign=True)
    # Loaded tensors replace the parameters: the post-load hook puts them back in channels-last layout once.
    assert model.encoder.conv1.weight[:, :, 0].is_contiguous(memory_format=torch.channels_last)  # tap-major
    assert model.latent_std.device.type == "cpu"
    torch.testing.assert_close(model.latent_std.flatten(), torch.tensor(TINY.latent_std))
    assert model.decode(_latents(torch.float32)).isfinite().all()


def test_load_names_missing_misshaped_and_extra_tensors() -> None:
    weights = WanVAE(TINY).state_dict()
    missing = dict(weights)
    del missing["decoder.head.2.bias"]
    with pytest.raises(RuntimeError, match=r"decoder\.head\.2\.bias"):
        WanVAE(TINY).load_state_dict(missing)

    misshaped = dict(weights, **{"encoder.middle.1.to_qkv.weight": torch.zeros(3, 3, 1, 1)})
    with pytest.raises(RuntimeError, match=r"encoder\.middle\.1\.to_qkv\.weight"):
        WanVAE(TINY).load_state_dict(misshaped)

    extra = dict(weights, **{"decoder.head.3.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"decoder\.head\.3\.weight"):
        WanVAE(TINY).load_state_dict(extra)


def test_out_of_order_stream_use_raises(vae: WanVAE) -> None:
    latents, video = _latents(), _video()
    stream = vae.decode_stream()
    assert not stream.started
    with pytest.raises(RuntimeError, match="not started"):
        stream.decode(latents)
    with pytest.raises(RuntimeError, match="before start"):
        stream.finish()
    stream.start()
    assert stream.started
    with pytest.raises(RuntimeError, match="already started"):
        stream.start()
    stream.decode(latents[:, :, :1])
    with pytest.raises(ValueError, match="batch, height, width"):
        stream.decode(latents[:, :, 1:2, :1])
    with pytest.raises(ValueError, match=r"latents must be \[B, 16"):
        stream.decode(latents[:, :8])
    stream.finish()
    with pytest.raises(RuntimeError, match="not started"):
        stream.decode(latents)

    encoder = vae.encode_stream().start()
    with pytest.raises(ValueError, match="chunk 0 has 4 frames but must have 1 \\+ 4k"):
        encoder.encode(video[:, :, :4])
    encoder.encode(video[:, :, :1])  # the rejected chunk left the stream at chunk 0
    with pytest.raises(ValueError, match="chunk 1 has 1 frames but must have 4k"):
        encoder.encode(video[:, :, 1:2])
    with pytest.raises(ValueError, match="multiples of 8"):
        encoder.encode(video[:, :, 1:5, :12])
    encoder.encode(video[:, :, 1:5])
    encoder.finish()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(video[:, :, :6])


def test_to_uint8_frames_clamps_rounds_and_moves_channels_last() -> None:
    video = (
        torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
        .view(1, 1, 1, 1, 8)
        .expand(1, 3, 2, 4, 8)
    )
    frames = to_uint8_frames(video)
    assert frames.dtype == np.uint8 and frames.shape == (2, 4, 8, 3)
    assert frames[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    assert np.array_equal(to_uint8_frames(video[0].to(torch.bfloat16)), frames)
    with pytest.raises(ValueError, match="one video"):
        to_uint8_frames(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(4, 1, 4, 4))

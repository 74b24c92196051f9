"""The VAE dtype setting and the stepped decode: bf16 tracks float32, steps are exact, shared VAEs stay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import relative_error
from test_bench import TINY_ARGS, TINY_SETTINGS
from test_generator import tiny_job
from test_vae import _latents, _random_vae, _video

from worldgen.bench import BenchSettings
from worldgen.cli import build_parser, engine_options, main
from worldgen.config import get_preset
from worldgen.generator import ChunkedGenerator, EngineSettings
from worldgen.models.random_init import random_dit, random_vae
from worldgen.render import render_settings_hash

# Relative L2 of bf16 against float32 (bf16 keeps 8 significant bits). The tiny random decoder amplifies
# rounding: bf16 weights alone, computed in float32, already move its video by 1.5% (all bf16: 3.6%);
# the encoder stays at 0.3%.
BF16_TOLERANCE = {"decode": 5e-2, "encode": 1e-2}


def test_bfloat16_copy_tracks_float32_and_leaves_the_original() -> None:
    model = _random_vae(dtype=torch.float32)
    latents, video = _latents(torch.float32), _video(torch.float32)
    reference = (model.decode(latents), model.encode(video))
    bf16 = model.converted(torch.bfloat16)
    assert model.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    # The (de)normalisation stays float32 around the bf16 network: latents come out in float32.
    assert bf16.latent_mean.dtype == bf16.latent_std.dtype == torch.float32
    torch.testing.assert_close(bf16.latent_std, model.latent_std, rtol=0, atol=0)
    # Layout kept: the causal convolutions' tap-major weights (each temporal slice dense channels-last).
    assert bf16.decoder.conv1.weight.stride() == model.decoder.conv1.weight.stride()
    assert bf16.decoder.conv1.weight[:, :, 0].is_contiguous(memory_format=torch.channels_last)
    model.set_triton_norms(True)  # and the norms' kernel choice (it matters on CUDA only)
    assert model.converted(torch.bfloat16).decoder.head[0].triton and not bf16.decoder.head[0].triton
    model.set_triton_norms(False)

    decoded, encoded = bf16.decode(latents), bf16.encode(video)
    assert decoded.dtype == torch.bfloat16 and encoded.dtype == torch.float32
    for ours, theirs, tolerance in zip((decoded, encoded), reference, BF16_TOLERANCE.values(), strict=True):
        assert relative_error(ours, theirs) < tolerance
        assert not torch.equal(ours.float(), theirs)  # bf16 really ran
    for ours, theirs in zip((model.decode(latents), model.encode(video)), reference, strict=True):
        assert torch.equal(ours, theirs)  # the float32 model is untouched


@pytest.mark.parametrize("frames_per_step", [1, 2])
def test_stepped_decode_equals_whole_chunk_decode(frames_per_step: int) -> None:
    model = _random_vae()  # float64
    latents = _latents(frames=6)  # two 3-frame chunks: the stream's first chunk and a later one

    def decode(steps: int | None) -> torch.Tensor:
        with model.decode_stream(frames_per_step=steps) as stream:
            return torch.cat([stream.decode(latents[:, :, :3]), stream.decode(latents[:, :, 3:])], dim=2)

    stepped, whole = decode(frames_per_step), decode(None)
    assert stepped.shape == whole.shape == (1, 3, 1 + 4 * 5, 16, 16)
    torch.testing.assert_close(stepped, whole, rtol=1e-12, atol=1e-12)


def test_bad_frames_per_step_is_refused() -> None:
    with pytest.raises(ValueError, match="frames_per_step must be a number of latent frames >= 1"):
        _random_vae().decode_stream(frames_per_step=0)


def test_vae_dtype_defaults_and_checks() -> None:
    # resolved() only parses the device string, so CUDA's defaults are checked on any machine.
    assert EngineSettings().resolved().vae_dtype == "float32"  # CPU
    assert EngineSettings(device="cuda").resolved().vae_dtype == "bfloat16"
    assert EngineSettings(device="cuda", plain=True).resolved().vae_dtype == "float32"  # the yardstick
    assert EngineSettings(device="cuda", dtype="float64").resolved().vae_dtype == "float64"
    assert EngineSettings(dtype="float64").resolved().vae_dtype == "float64"
    assert EngineSettings(vae_dtype="bfloat16").resolved().vae_dtype == "bfloat16"  # explicit wins on CPU
    with pytest.raises(ValueError, match="vae_dtype must be one of float32, bfloat16, float64, got 'fp16'"):
        EngineSettings(vae_dtype="fp16").resolved()
    with pytest.raises(ValueError, match=r"plain path .* float32, not bfloat16"):
        EngineSettings(plain=True, vae_dtype="bfloat16").resolved()


def test_a_bf16_vae_generator_leaves_the_shared_float32_vae_alone() -> None:
    preset = get_preset("tiny")
    dit, vae = random_dit(preset.dit, "cpu", torch.float32), random_vae(preset.vae, "cpu")
    weights = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    fast = ChunkedGenerator(EngineSettings(model="tiny", vae_dtype="bfloat16"), models=(dit, vae))
    plain = ChunkedGenerator(EngineSettings(model="tiny", plain=True), models=(dit, vae))
    assert fast.dit is dit and fast.vae is not vae and fast.vae.dtype == torch.bfloat16
    assert plain.vae is vae and vae.dtype == torch.float32
    assert all(torch.equal(weights[name], tensor) for name, tensor in vae.state_dict().items())
    # The whole path in bf16: the image encode, then a stepped decode; frames close to the float32 path's.
    runtimes = [generator.create_runtime(tiny_job(height=32, width=32)) for generator in (fast, plain)]
    assert runtimes[0].settings["vae_dtype"] == "bfloat16" and runtimes[0].run_info("r").dtype == "float32"
    frames = [runtime.generate_next_chunk().frames.astype(int) for runtime in runtimes]
    assert frames[0].shape == frames[1].shape == (1 + 4, 32, 32, 3)
    assert np.abs(frames[0] - frames[1]).mean() < 2.0 and not np.array_equal(*frames)


def test_render_hash_names_the_vae_dtype_and_resolves_model_folders(tmp_path, monkeypatch) -> None:
    job = tiny_job()
    float32 = render_settings_hash(job, EngineSettings())
    assert render_settings_hash(job, EngineSettings(vae_dtype="float32")) == float32  # the CPU default
    assert render_settings_hash(job, EngineSettings(vae_dtype="bfloat16")) != float32
    # 8-bit attention rounds differently; the choice among the exact attention kernels is not hashed.
    cuda = {
        name: render_settings_hash(job, EngineSettings(device="cuda", attention=name))
        for name in ("auto", "cudnn", "fa4", "fp8")
    }
    assert cuda["auto"] == cuda["cudnn"] == cuda["fa4"] != cuda["fp8"]
    # A relative model folder without a slash is hashed by where it is, not by its name.
    hashes = []
    for place in ("a", "b"):
        (tmp_path / place / "model").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / place)
        hashes.append(render_settings_hash(job, EngineSettings(model="model")))
    assert hashes[0] != hashes[1]


def test_vae_dtype_reaches_the_render_and_bench_settings(tmp_path) -> None:
    parser = build_parser()
    render = parser.parse_args(["render", "--job", "j.json", "--out", "o", "--vae-dtype", "bfloat16"])
    assert EngineSettings(**engine_options(render)).resolved().vae_dtype == "bfloat16"
    bench = BenchSettings(out=tmp_path, vae_dtype="bfloat16", **TINY_SETTINGS)
    assert bench.engine().vae_dtype == "bfloat16" and bench.engine(plain=True).vae_dtype == "float32"
    out = tmp_path / "bench"
    args = [*TINY_ARGS, "--vae-dtype", "bfloat16", "--chunks", "1", "--compare", "plain", "--out", str(out)]
    assert main(["bench", *args]) == 0
    paths = json.loads((out / "bench.json").read_text())["paths"]
    assert paths["fast"]["engine"]["vae_dtype"] == "bfloat16"
    assert paths["plain"]["engine"]["vae_dtype"] == "float32"


def test_fast_path_switches_reach_the_render_and_bench_settings(tmp_path) -> None:
    parser = build_parser()
    switches = ["--compile", "--triton-kernels", "--gelu-epilogue"]
    names = ("compile", "triton_kernels", "gelu_epilogue")
    render = engine_options(parser.parse_args(["render", "--job", "j.json", "--out", "o", *switches]))
    assert all(render[name] is True for name in names)
    bench_args = vars(parser.parse_args(["bench", "--out", "o", *switches]))
    bench = BenchSettings(out=tmp_path, device="cuda", **{name: bench_args[name] for name in names})
    fast, plain = bench.engine(), bench.engine(plain=True)  # resolving needs no GPU
    assert all(getattr(fast, name) is True and getattr(plain, name) is False for name in names)

"""The chunked generator and the render of one job: frames, timing rows, reproducibility, memory, crashes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import ASSETS, job_row

from worldgen.checkpoints import CheckpointError, write_checkpoint
from worldgen.cli import main as cli_main
from worldgen.config import Job
from worldgen.control import video_frame_count
from worldgen.generator import (
    ChunkedGenerator,
    EngineSettings,
    JobInputError,
    Runtime,
    check_control_modes,
    control_mode_problem,
    generator_loads,
    model_preset,
    shared_generator,
)
from worldgen.quant import Fp8Linear
from worldgen.render import (
    MARKER,
    PROMPT_CACHE,
    TIMINGS,
    VIDEO,
    finished_result,
    render_job,
    render_settings_hash,
)
from worldgen.timing import TIMING_SCHEMA, TimingLog, read_timings, summarize
from worldgen.video import VideoWriter


def tiny_job(**changes) -> Job:
    """A 64x48 camera job over the committed demo assets: 13 frames -> 4 latent frames -> 2 chunks of 2."""
    job = Job(
        job_id="tiny",
        prompt="a red house on green hills",
        image=str(ASSETS / "image.png"),
        poses=str(ASSETS / "poses.npy"),
        intrinsics=str(ASSETS / "intrinsics.npy"),
        frame_num=13,
        chunk_size=2,
        local_attn_size=-1,
        sink_size=0,
        height=48,
        width=64,
        seed=3,
    )
    return dataclasses.replace(job, **changes)


@pytest.fixture(scope="module")
def generator() -> ChunkedGenerator:
    return ChunkedGenerator(EngineSettings(model="tiny", device="cpu"))


def all_frames(runtime: Runtime) -> np.ndarray:
    chunks = []
    while not runtime.done:
        chunks.append(runtime.generate_next_chunk().frames)
    return np.concatenate(chunks)


def test_chunks_cover_the_video_frame_by_frame(generator):
    runtime = generator.create_runtime(tiny_job(frame_num=17, chunk_size=2))  # 5 latent -> 4 -> 2 chunks
    first = runtime.generate_next_chunk()
    second = runtime.generate_next_chunk()
    assert runtime.done and runtime.num_chunks == 2
    assert (first.first_latent_frame, second.first_latent_frame) == (0, 2)
    # The first latent frame decodes to 1 video frame, every later one to 4.
    assert first.frames.shape == (1 + 4, 48, 64, 3) and first.frames.dtype == np.uint8
    assert second.frames.shape == (8, 48, 64, 3)
    assert set(first.seconds) == {"denoise", "update_cache", "decode", "generate_next_chunk"}
    assert (first.kv_frames, second.kv_frames) == (2, 4)
    with pytest.raises(RuntimeError, match="already generated"):
        runtime.generate_next_chunk()


def test_same_seed_same_frames_and_another_seed_other_frames(generator):
    frames = all_frames(generator.create_runtime(tiny_job(seed=7)))
    again = all_frames(generator.create_runtime(tiny_job(seed=7)))
    other = all_frames(generator.create_runtime(tiny_job(seed=8)))
    assert np.array_equal(frames, again)
    assert not np.array_equal(frames, other)


def test_cache_memory_is_flat_as_the_video_grows(generator):
    """With a window, the KV cache is sized by the window, not by the video's length."""
    window = {"chunk_size": 2, "local_attn_size": 4, "sink_size": 1}
    short = generator.create_runtime(tiny_job(frame_num=13, **window))  # 4 latent frames
    long = generator.create_runtime(tiny_job(frame_num=37, **window))  # 10 latent frames, 2.5x
    assert long.latent_frames >= 2.5 * short.latent_frames
    assert long.cache.keys.nbytes == short.cache.keys.nbytes
    kv_frames = []
    while not long.done:
        kv_frames.append(long.generate_next_chunk().kv_frames)
    assert kv_frames == [2, 4, 4, 4, 4]  # the window (sink 1 + 3 recent) caps what a chunk attends to
    whole = generator.create_runtime(tiny_job(frame_num=37, chunk_size=2))
    assert whole.cache.keys.nbytes > long.cache.keys.nbytes  # without a window it holds the whole video


def test_render_writes_video_timings_and_marker(generator, tmp_path):
    job, written = tiny_job(frame_num=17), []
    result = render_job(
        generator, job, tmp_path, progress=False, on_chunk=lambda c, n: written.append((c.index, n))
    )
    job_dir = tmp_path / "tiny"
    assert result["status"] == "rendered" and result["chunks"] == 2 and written == [(0, 2), (1, 2)]
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(job_dir / VIDEO))
    assert frames == video_frame_count(4) == 13
    reader = imageio_ffmpeg.read_frames(str(job_dir / VIDEO))
    assert next(reader)["size"] == (64, 48)
    reader.close()

    table = read_timings(job_dir / TIMINGS)
    assert table.schema.remove_metadata().equals(TIMING_SCHEMA)
    assert table.column("chunk_index").to_pylist() == [0, 1]
    assert table.column("is_warmup").to_pylist() == [True, False]
    assert table.column("video_frames").to_pylist() == [5, 8]
    summary = summarize(table)
    assert summary.warmup_skipped == 1 and summary.steady_chunks == 1
    assert result["steady_seconds_per_chunk"] == summary.stages["generate_next_chunk"].mean

    marker = json.loads((job_dir / MARKER).read_text())
    assert marker["job"]["job_id"] == "tiny" and marker["settings"]["video_frames"] == 13
    assert sorted(marker["outputs"]) == [TIMINGS, VIDEO]
    assert not [p.name for p in job_dir.iterdir() if p.name.startswith(".")]


def test_rerun_skips_and_changed_settings_rerender(generator, tmp_path):
    first = render_job(generator, tiny_job(), tmp_path, progress=False)
    assert first["status"] == "rendered"
    assert render_job(generator, tiny_job(), tmp_path, progress=False)["status"] == "skipped"
    assert render_job(generator, tiny_job(seed=4), tmp_path, progress=False)["status"] == "rendered"


def test_a_failed_rerender_leaves_the_finished_render_whole(generator, tmp_path, monkeypatch):
    render_job(generator, tiny_job(), tmp_path, progress=False)  # a finished earlier version of the job
    job_dir = tmp_path / "tiny"
    before = {name: (job_dir / name).read_bytes() for name in (MARKER, VIDEO, TIMINGS)}
    real = Runtime.generate_next_chunk

    def fail_on_second_chunk(self):
        if self.next_chunk == 1:
            raise RuntimeError("device lost")
        return real(self)

    def fail(*args, **kwargs):
        raise RuntimeError("device lost")

    # In the chunk loop, in the video's last checks, in writing the timings: until then the new files are
    # complete only under their temp names, and the old render is still the finished one.
    for owner, method, failing in (
        (Runtime, "generate_next_chunk", fail_on_second_chunk),
        (VideoWriter, "_finish", fail),
        (TimingLog, "save", fail),
    ):
        monkeypatch.setattr(owner, method, failing)
        for changed in ({"job": tiny_job(seed=5)}, {"job": tiny_job(), "force": True}):
            with pytest.raises(RuntimeError, match="device lost"):
                render_job(generator, progress=False, out_dir=tmp_path, **changed)
            assert {name: (job_dir / name).read_bytes() for name in before} == before
            assert not [p.name for p in job_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
        monkeypatch.undo()
    assert render_job(generator, tiny_job(), tmp_path, progress=False)["status"] == "skipped"
    assert render_job(generator, tiny_job(seed=5), tmp_path, progress=False)["status"] == "rendered"


def test_a_render_without_video_counts_only_for_runs_without_video(generator, tmp_path):
    job, job_dir = tiny_job(), tmp_path / "tiny"
    assert render_job(generator, job, tmp_path, write_video=False, progress=False)["status"] == "rendered"
    assert finished_result(job, tmp_path, generator.settings, write_video=True) is None
    with_video = render_job(generator, job, tmp_path, progress=False)
    assert with_video["status"] == "rendered" and Path(with_video["video"]) == job_dir / VIDEO
    assert render_job(generator, job, tmp_path, write_video=False, progress=False)["status"] == "skipped"
    # A forced re-render without video takes the old one away: no file of another render stays behind.
    assert (
        render_job(generator, job, tmp_path, write_video=False, force=True, progress=False)["video"] is None
    )
    assert not (job_dir / VIDEO).exists()
    assert json.loads((job_dir / MARKER).read_text())["outputs"] == [TIMINGS]


def test_outputs_are_readable_as_the_umask_says_and_stale_temps_go(generator, tmp_path):
    job_dir = tmp_path / "tiny"
    job_dir.mkdir()
    # Temps of killed writers: named by a process of this host that is gone (removed at once), or named as
    # before 2026-11-30, without a writer, and idle for an hour. A live process's temp stays, and so does a
    # fresh one that names no writer: another process may be rendering into the same folder.
    host, gone = socket.gethostname(), _finished_pid()
    stale = [
        job_dir / f".video.mp4@{host}:{gone}.a.tmp",
        job_dir / ".job.json.b.tmp",
        job_dir / ".video.c.mp4.tmp",
    ]
    kept = [job_dir / f".timings.parquet@{host}:{os.getppid()}.d.tmp", job_dir / ".timings.parquet.e.tmp"]
    for temp in [*stale, *kept]:
        temp.write_bytes(b"left by a killed run")
    hour_ago = time.time() - 3600
    for temp in stale[1:]:
        os.utime(temp, (hour_ago, hour_ago))
    render_job(generator, tiny_job(), tmp_path, progress=False)
    assert not any(temp.exists() for temp in stale) and all(temp.exists() for temp in kept)
    stale[0].write_bytes(b"left by a killed forced re-render")
    assert render_job(generator, tiny_job(), tmp_path, progress=False)["status"] == "skipped"
    umask = os.umask(0)
    os.umask(umask)
    for name in (VIDEO, TIMINGS, MARKER):
        assert stat.S_IMODE((job_dir / name).stat().st_mode) == 0o666 & ~umask
    assert not any(temp.exists() for temp in stale)


def _finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_results_name_the_output_folder_as_given_not_as_first_rendered(generator, tmp_path):
    render_job(generator, tiny_job(), tmp_path / "first", progress=False)
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    skipped = render_job(generator, tiny_job(), tmp_path / "moved", progress=False)
    assert skipped["status"] == "skipped"
    assert (skipped["job_dir"], skipped["video"]) == (
        str(tmp_path / "moved" / "tiny"),
        str(tmp_path / "moved" / "tiny" / VIDEO),
    )
    assert "first" not in (tmp_path / "moved" / "tiny" / MARKER).read_text()


def test_a_failure_before_the_first_frame_leaves_no_video(generator, tmp_path):
    with pytest.raises(JobInputError, match="poses"):
        render_job(generator, tiny_job(frame_num=200), tmp_path, progress=False)
    assert not (tmp_path / "tiny" / VIDEO).exists() and not (tmp_path / "tiny" / MARKER).exists()


def test_the_control_mode_must_match_the_model(generator, tmp_path):
    keys = str(ASSETS / "actions.npy")
    with pytest.raises(JobInputError, match="takes the camera"):
        generator.create_runtime(tiny_job(actions=keys))
    # A batch is checked up front, every job named, with no model loaded (a folder's preset from its shapes).
    write_checkpoint("tiny", tmp_path / "model", seed=0, num_shards=1)
    assert model_preset(str(tmp_path / "model")) == model_preset("tiny") == generator.preset
    batch = [tiny_job(job_id="a", actions=keys), tiny_job(), tiny_job(job_id="b", actions=keys)]
    with pytest.raises(JobInputError, match=r"^job a: .* takes the camera\njob b: .* takes the camera$"):
        check_control_modes(batch, generator.preset)
    assert control_mode_problem(tiny_job(), model_preset("lingbot-world-fast-act")) == (
        "job tiny: model lingbot-world-fast-act needs `actions`"
    )


def test_a_dit_of_no_preset_is_refused_naming_the_tensor(tmp_path):
    files = write_checkpoint("tiny", tmp_path / "model", seed=0, num_shards=1)
    (shard,) = sorted(files.dit.parent.glob("*.safetensors"))
    tensors = safetensors.torch.load_file(shard)
    name = next(name for name in tensors if name.endswith("ffn.0.weight"))
    tensors[name] = tensors[name][:-1]  # one row short
    safetensors.torch.save_file(tensors, shard)
    with pytest.raises(
        CheckpointError, match=rf"the tiny DiT \(the closest preset\):\n  {re.escape(name)} in "
    ):
        model_preset(str(tmp_path / "model"))


def test_plain_path_matches_the_fast_path():
    """The benchmark's yardstick (text K/V and camera modulation every pass, NCDHW convs) == the default."""
    fast = ChunkedGenerator(EngineSettings(model="tiny", dtype="float64"))
    plain = ChunkedGenerator(EngineSettings(model="tiny", dtype="float64", plain=True))
    assert plain.settings.plain and not plain.vae.channels_last
    a = all_frames(fast.create_runtime(tiny_job()))
    b = all_frames(plain.create_runtime(tiny_job()))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float64 rounding may flip a uint8 step


def test_cli_renders_a_manifest_and_reports(tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(job_row("cli-job")) + "\n")
    out = tmp_path / "out"
    assert cli_main(["render", "--manifest", str(manifest), "--out", str(out)]) == 0
    assert (out / "cli-job" / VIDEO).is_file() and (out / "cli-job" / MARKER).is_file()
    assert cli_main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cli-job" in printed and (out / "timings.png").is_file()


def test_cli_renders_the_other_jobs_when_one_fails(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(job_row(name)) + "\n" for name in ("first", "broken", "last")))
    real = Runtime.generate_next_chunk

    def device_lost_in_broken(self):
        if self.job.job_id == "broken":
            raise RuntimeError("device lost")
        return real(self)

    monkeypatch.setattr(Runtime, "generate_next_chunk", device_lost_in_broken)
    out = tmp_path / "out"
    assert cli_main(["render", "--manifest", str(manifest), "--out", str(out), "--no-write-video"]) == 1
    assert (out / "first" / MARKER).is_file() and (out / "last" / MARKER).is_file()
    assert not (out / "broken" / MARKER).exists()
    printed = capsys.readouterr()
    assert "RuntimeError: device lost" in printed.err  # the traceback of what was not an input error
    assert "broken: failed: device lost" in printed.err and "1 of 3 jobs failed: broken" in printed.err


def test_cli_refuses_what_cannot_run_before_rendering_anything(tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    keys = job_row("keys", actions=str(ASSETS / "actions.npy"))
    manifest.write_text(json.dumps(job_row("camera")) + "\n" + json.dumps(keys) + "\n")
    out = tmp_path / "out"
    render = ["render", "--manifest", str(manifest), "--out", str(out)]
    assert cli_main(render) == 2  # the camera model cannot take the key presses of one job: none renders
    assert "job keys: `actions` given, but model tiny takes the camera" in capsys.readouterr().err
    assert not out.exists()
    manifest.write_text(json.dumps(job_row("camera")) + "\n")
    refusals = [([*render, "--attention", "cudnn"], "attention 'cudnn' is a CUDA kernel")]
    if not torch.cuda.is_available():
        refusals.append(([*render, "--device", "cuda"], "device cuda, but this machine has no CUDA device"))
    (tmp_path / "file").write_text("")
    refusals.append(([*render[:-1], str(tmp_path / "file")], "not a folder"))
    (tmp_path / "nothing").mkdir()
    refusals.append((["report", str(tmp_path / "nothing")], "nothing: no timings.parquet files under it"))
    refusals.append(([*render, "--device", "gpu"], "device must be cpu, cuda or cuda:N, got 'gpu'"))
    for argv, message in refusals:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("worldgen: error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_one_shared_generator_renders_into_every_output_folder(tmp_path, monkeypatch):
    """Where a batch keeps its prompt embeddings is no part of the model: two batches with their own output
    folders in one process load the model once, and each folder gets its own prompt cache."""
    monkeypatch.setattr("worldgen.generator._SHARED", {})  # as in a fresh process: nothing loaded yet
    loads = generator_loads()
    settings, job = EngineSettings(model="tiny"), tiny_job(frame_num=5, height=32, width=32)  # 1 chunk
    outs = [tmp_path / "a", tmp_path / "b"]
    generators = [shared_generator(settings) for _ in outs]
    for generator, out in zip(generators, outs, strict=True):
        assert render_job(generator, job, out, write_video=False, progress=False)["status"] == "rendered"
    assert generators[0] is generators[1] and generator_loads() == loads + 1
    cached = [sorted(p.relative_to(out) for p in (out / PROMPT_CACHE).rglob("*.safetensors")) for out in outs]
    assert len(cached[0]) == 1 and cached[0] == cached[1]  # the job's one prompt, stored in each folder


def test_a_model_folder_loads_in_the_run_layout_and_renders(tmp_path):
    write_checkpoint("tiny", tmp_path / "model", seed=0, num_shards=2)
    folder = ChunkedGenerator(EngineSettings(model=str(tmp_path / "model"), dtype="bfloat16"))
    assert folder.preset.name == "tiny" and folder.files is not None
    assert folder.dit.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert folder.dit.time_embedding[0].weight.dtype == torch.float32
    runtime = folder.create_runtime(tiny_job())
    assert runtime.generate_next_chunk().frames.shape == (1 + 4, 48, 64, 3)


def test_unknown_models_are_named():
    with pytest.raises(ValueError, match="neither a preset"):
        ChunkedGenerator(EngineSettings(model="no-such-model"))


def test_fast_path_switches_default_on_for_bf16_on_cuda():
    """Unset, compile and the fused kernels are on where they serve (a bf16 model on CUDA), off on a CPU, in
    float32 and on the plain path; the GELU epilogue stays off with fp8 layers. Given, a switch is kept."""
    switches = ("compile", "triton_kernels", "gelu_epilogue")

    def resolved(**fields: object) -> tuple[bool, ...]:
        settings = EngineSettings(**fields).resolved()
        return tuple(getattr(settings, name) for name in switches)

    assert resolved(device="cuda") == (True, True, True)
    assert resolved(device="cuda", fp8=True) == (True, True, False)
    assert resolved() == resolved(device="cuda", dtype="float32") == (False, False, False)
    assert resolved(device="cuda", plain=True, vae_dtype="float32") == (False, False, False)
    assert resolved(device="cuda", compile=False, gelu_epilogue=False) == (False, True, False)
    assert resolved(dtype="bfloat16", compile=True) == (True, False, False)
    for fields in (
        {"device": "cuda"},
        {"device": "cuda", "fp8": True},
        {"device": "cuda", "plain": True},
        {},
    ):
        once = EngineSettings(**fields).resolved()
        assert once.resolved() == once  # resolving is final: a flow's resolved settings travel to workers
    # They round the frames, they do not change them: a render's settings hash leaves them out.
    job = tiny_job()
    all_off = EngineSettings(
        device="cuda", compile=False, triton_kernels=False, gelu_epilogue=False, fp8_fast_accum=False
    )
    assert render_settings_hash(job, EngineSettings(device="cuda")) == render_settings_hash(job, all_off)


def test_fast_path_switches_are_checked_and_recorded(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fp8 layers run in a bfloat16 model"):
        EngineSettings(fp8=True).resolved()  # a CPU defaults to float32
    with pytest.raises(ValueError, match="plain path"):
        EngineSettings(plain=True, compile=True).resolved()
    with pytest.raises(ValueError, match="'fa4' runs a bfloat16 model on CUDA, not bfloat16 on cpu"):
        EngineSettings(dtype="bfloat16", attention="fa4").resolved()
    for backend in ("fa3", "fp8"):
        with pytest.raises(ValueError, match=f"'{backend}' runs a bfloat16 model on CUDA, not float32 on"):
            EngineSettings(attention=backend).resolved()
    if not torch.cuda.is_available():
        assert EngineSettings(device="cuda", attention="fp8").resolved().dtype == "bfloat16"  # no GPU asked
        with pytest.raises(ValueError, match=r"device cuda:1, but this machine has no CUDA device"):
            ChunkedGenerator(EngineSettings(device="cuda:1"))
        # Past that check (as on a machine with one GPU), what the settings need is checked before any load.
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        # A CUDA device that is not there has no FlashAttention-3.
        with pytest.raises(ValueError, match=r"'fp8' runs FlashAttention-3 \(pip install 'worldgen\[fa3\]"):
            ChunkedGenerator(
                EngineSettings(device="cuda", attention="fp8", compile=False, triton_kernels=False)
            )
    for device in ("mps", "meta", "gpu", "cuda:x"):  # the last two torch cannot even parse
        with pytest.raises(ValueError, match=f"device must be cpu, cuda or cuda:N, got '{device}'"):
            EngineSettings(device=device).resolved()
    with pytest.raises(ValueError, match="attention 'cudnn' is a CUDA kernel; on cpu, use auto"):
        EngineSettings(attention="cudnn").resolved()
    with pytest.raises(ValueError, match="unknown attention backend 'fa2'"):
        EngineSettings(attention="fa2").resolved()
    with pytest.raises(ValueError, match="gelu_epilogue: CUDA kernels, but the device is cpu"):
        EngineSettings(triton_kernels=True, gelu_epilogue=True).resolved()
    with pytest.raises(ValueError, match="gelu_epilogue is for the bf16 FFN; with fp8 layers leave it off"):
        EngineSettings(device="cuda", fp8=True, gelu_epilogue=True).resolved()
    if importlib.util.find_spec("triton") is None:  # a CPU wheel of torch: refused before any model loads
        # The CUDA defaults need triton; the error says how to run without.
        with pytest.raises(
            ValueError,
            match=r"compile and triton_kernels on CUDA need the triton package.*"
            "turn off --no-compile --no-triton-kernels",
        ):
            ChunkedGenerator(EngineSettings(device="cuda"))
        with pytest.raises(
            ValueError,
            match=r"^triton_kernels on CUDA needs .* --no-triton-kernels "
            r"\(EngineSettings: triton_kernels=False\)$",
        ):
            ChunkedGenerator(EngineSettings(device="cuda", compile=False))
    with pytest.raises(ValueError, match="no fused kernels"):
        EngineSettings(device="cuda", plain=True, gelu_epilogue=True).resolved()
    monkeypatch.undo()
    fp8 = ChunkedGenerator(EngineSettings(model="tiny", dtype="bfloat16", fp8=True, fp8_fast_accum=False))
    layers = [module for module in fp8.dit.modules() if isinstance(module, Fp8Linear)]
    assert layers and not any(layer.fast_accum for layer in layers)
    result = render_job(fp8, tiny_job(), tmp_path, progress=False)
    table = read_timings(tmp_path / "tiny" / TIMINGS)
    assert result["status"] == "rendered" and set(table.column("fp8").to_pylist()) == {True}
    settings = json.loads((tmp_path / "tiny" / MARKER).read_text())["settings"]
    assert settings["fp8"] is True and settings["fp8_fast_accum"] is False


def test_overlapped_decode_gives_the_same_chunks(generator, tmp_path):
    """Decoding chunk i while the DiT makes chunk i+1 changes when work happens, not what comes out."""
    job = tiny_job(frame_num=21, chunk_size=2)  # 6 latent frames -> 3 chunks
    overlapped = ChunkedGenerator(EngineSettings(model="tiny", overlap=True))
    plain_chunks = list(generator.create_runtime(job).chunks())
    overlap_chunks = list(overlapped.create_runtime(job).chunks())
    assert [c.index for c in overlap_chunks] == [0, 1, 2]
    for a, b in zip(plain_chunks, overlap_chunks, strict=True):
        assert np.array_equal(a.frames, b.frames) and a.kv_frames == b.kv_frames
        assert set(b.seconds) == {"denoise", "update_cache", "decode", "generate_next_chunk"}
    result = render_job(overlapped, job, tmp_path, progress=False)
    assert result["video_frames"] == 21 and read_timings(tmp_path / "tiny" / TIMINGS).num_rows == 3


def test_a_finished_job_is_known_without_a_model(generator, tmp_path):
    job, engine = tiny_job(), generator.settings
    assert finished_result(job, tmp_path, engine) is None
    render_job(generator, job, tmp_path, progress=False)
    assert finished_result(job, tmp_path, engine)["status"] == "skipped"
    assert finished_result(job, tmp_path, dataclasses.replace(engine, weights_seed=1)) is None  # other model
    (tmp_path / "tiny" / VIDEO).unlink()
    assert finished_result(job, tmp_path, engine) is None  # a marker whose outputs are gone does not count

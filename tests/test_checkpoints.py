"""Strict checkpoint loading: round trips in every layout, and a clear error for every kind of bad file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from worldgen.checkpoints import (
    DIT_INDEX_FILE,
    DIT_SUBFOLDER,
    TEXT_ENCODER_FILE,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    VAE_FILE,
    CheckpointError,
    ModelFiles,
    build_on_meta,
    load_checkpoint,
    save_pth,
    save_safetensors,
    save_sharded,
    scan_checkpoint,
)


class Toy(nn.Module):
    """Float weights of several shapes plus an integer buffer, which must keep its dtype."""

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("positions", torch.arange(5))


def toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Toy().state_dict()


def load_toy(source: Path, dtype: torch.dtype = torch.float32) -> Toy:
    return load_checkpoint(build_on_meta(Toy), source, "cpu", dtype, "the toy model")


def write(layout: str, state: dict[str, torch.Tensor], folder: Path) -> Path:
    if layout == "sharded":
        return save_sharded(state, folder, num_shards=3)
    if layout == "safetensors":
        save_safetensors(state, folder / "toy.safetensors")
        return folder / "toy.safetensors"
    save_pth(state, folder / "toy.pth")
    return folder / "toy.pth"


LAYOUTS = ["sharded", "safetensors", "pth"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_restores_every_tensor_and_casts_floats(tmp_path, layout, dtype):
    state = toy_state()
    model = load_toy(write(layout, state, tmp_path), dtype)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        expected = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert loaded[name].dtype == expected.dtype, name
        assert torch.equal(loaded[name], expected), name
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_sharded_write_splits_into_the_requested_shards_with_an_index(tmp_path):
    state = toy_state()
    index = save_sharded(state, tmp_path, num_shards=3)
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert index.name == DIT_INDEX_FILE
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(weight_map) == sorted(state)
    assert {info.file.name for info in scan_checkpoint(index).values()} == set(shards)
    with pytest.raises(ValueError, match=r"num_shards"):
        save_sharded(state, tmp_path / "too-many", num_shards=len(state) + 1)


def test_a_missing_shard_is_named(tmp_path):
    index = save_sharded(toy_state(), tmp_path, num_shards=3)
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"shard diffusion_pytorch_model-00002-of-00003\S* .* is missing"
    ):
        load_toy(index)


def test_a_truncated_shard_is_named(tmp_path):
    index = save_sharded(toy_state(), tmp_path, num_shards=3)
    shard = tmp_path / "diffusion_pytorch_model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a readable safetensors file"):
        load_toy(index)


def test_a_corrupted_pth_is_named(tmp_path):
    path = tmp_path / "toy.pth"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match=r"cannot read .*toy.pth"):
        load_toy(path)


def test_an_index_that_disagrees_with_its_shards_is_named(tmp_path):
    index = save_sharded(toy_state(), tmp_path, num_shards=2)
    content = json.loads(index.read_text())
    content["weight_map"]["norm.bias"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"puts norm.bias in diffusion_pytorch_model-00001-of-00002"):
        load_toy(index)
    del content["weight_map"]["norm.bias"]
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"holds norm.bias, which .* does not list"):
        load_toy(index)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_renamed_tensor_is_reported_missing_and_unexpected(tmp_path, layout):
    state = toy_state()
    state["blocks.1.weigth"] = state.pop("blocks.1.weight")
    with pytest.raises(CheckpointError) as error:
        load_toy(write(layout, state, tmp_path))
    assert "missing tensors: blocks.1.weight" in str(error.value)
    assert "unexpected tensors: blocks.1.weigth (in " in str(error.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_wrong_shape_names_the_tensor_the_file_and_both_shapes(tmp_path, layout):
    state = toy_state()
    state["blocks.2.weight"] = torch.zeros(16, 17)
    source = write(layout, state, tmp_path)
    with pytest.raises(
        CheckpointError, match=r"blocks.2.weight in \S+ has shape \[16, 17\]; expected \[16, 16\]"
    ):
        load_toy(source)


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("embed.weight", torch.zeros(16, 8, dtype=torch.int32), "embed.weight in .* has dtype torch.int32"),
        (
            "norm.weight",
            torch.zeros(16, dtype=torch.float8_e4m3fn),
            "norm.weight in .* has dtype torch.float8",
        ),
        ("positions", torch.zeros(5), "positions in .* has dtype torch.float32; expected torch.int64"),
    ],
)
def test_a_wrong_dtype_names_the_tensor(tmp_path, name, bad, message):
    state = toy_state()
    state[name] = bad
    with pytest.raises(CheckpointError, match=message):
        load_toy(write("safetensors", state, tmp_path))


def test_another_models_checkpoint_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(
        {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.bias": torch.zeros(4)}, path
    )
    with pytest.raises(CheckpointError, match=r"does not hold the toy model: .*it looks like the Wan VAE"):
        load_toy(path)


def test_unknown_formats_and_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format"):
        load_toy(tmp_path / "toy.ckpt")
    with pytest.raises(CheckpointError, match=r"toy.pth does not exist"):
        load_toy(tmp_path / "toy.pth")


def make_folder(root: Path, dit_in_subfolder: bool = True) -> Path:
    dit_dir = root / DIT_SUBFOLDER if dit_in_subfolder else root
    save_sharded(toy_state(), dit_dir, num_shards=2)
    for name in (VAE_FILE, TEXT_ENCODER_FILE, f"{TOKENIZER_DIR}/{TOKENIZER_FILE}"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


@pytest.mark.parametrize("dit_in_subfolder", [True, False])
def test_model_folder_finds_the_dit_in_the_release_subfolder_or_at_the_top(tmp_path, dit_in_subfolder):
    files = ModelFiles.locate(make_folder(tmp_path, dit_in_subfolder))
    expected_dir = tmp_path / DIT_SUBFOLDER if dit_in_subfolder else tmp_path
    assert files.dit == expected_dir / DIT_INDEX_FILE
    assert files.vae == tmp_path / VAE_FILE
    assert files.tokenizer == tmp_path / "google" / "umt5-xxl" / "tokenizer.json"


def test_model_folder_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        ModelFiles.locate(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no DiT checkpoint"):
        ModelFiles.locate(tmp_path)
    make_folder(tmp_path)
    (tmp_path / VAE_FILE).unlink()
    (tmp_path / TOKENIZER_DIR / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"lacks Wan2.1_VAE.pth, google/umt5-xxl/tokenizer.json"):
        ModelFiles.locate(tmp_path)


def test_model_folder_refuses_ambiguous_dit_files(tmp_path):
    save_safetensors(toy_state(), tmp_path / "a.safetensors")
    save_safetensors(toy_state(), tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"several DiT checkpoints: a.safetensors, b.safetensors"):
        ModelFiles.locate(tmp_path)


# A model of ~200 MB in bf16, written as ~400 MB of float32 shards, loaded in a fresh process whose peak
# resident memory (VmHWM, which counts memory-mapped file pages too) is compared with the model size.
_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from worldgen.checkpoints import build_on_meta, load_checkpoint, save_sharded

    def build():
        return nn.Sequential(*(nn.Linear(2048, 2048, bias=False) for _ in range(24)))

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    folder, mode = sys.argv[1], sys.argv[2]
    if mode == "write":
        save_sharded(build().state_dict(), folder, num_shards=8)
    else:
        model = build_on_meta(build)
        try:  # reset the high-water mark so import-time transients do not count (Linux >= 4.0)
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass
        before = status("VmRSS")
        model = load_checkpoint(model, folder + "/diffusion_pytorch_model.safetensors.index.json",
                                "cpu", torch.bfloat16)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(status("VmHWM") - before, model_bytes)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_loading_shards_peaks_below_one_and_a_half_model_sizes(tmp_path):
    def run(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(tmp_path), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    run("write")
    peak_growth, model_bytes = map(int, run("load").split())
    assert model_bytes == 24 * 2048 * 2048 * 2
    assert peak_growth < 1.5 * model_bytes, f"peak grew by {peak_growth / model_bytes:.2f} model sizes"

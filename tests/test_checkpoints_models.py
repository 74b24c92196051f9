"""Whole models through the real loading path: the release folder layout written by `write_checkpoint`,
every model in every file layout, and clear refusals of the wrong model or preset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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
    build_tokenizer,
    load_dit,
    load_models,
    load_text_encoder,
    load_vae,
    save_pth,
    save_safetensors,
    save_sharded,
    scan_checkpoint,
    write_checkpoint,
)
from worldgen.cli import main
from worldgen.config import PRESETS
from worldgen.models.dit import CausalDiT
from worldgen.models.text import UMT5Encoder
from worldgen.models.vae import WanVAE

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    write_checkpoint("tiny", folder, seed=0)
    return folder


def stored_tensors(source: Path) -> dict[str, torch.Tensor]:
    """What a checkpoint holds, read independently of the loader."""
    files = {info.file for info in scan_checkpoint(source).values()}
    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
        else:
            tensors.update(torch.load(file, weights_only=True))
    return tensors


def assert_holds(
    model: nn.Module, stored: dict[str, torch.Tensor], dtype: torch.dtype | dict[str, torch.dtype]
) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys()
    for name, tensor in stored.items():
        expected = dtype if isinstance(dtype, torch.dtype) else dtype[name]
        assert loaded[name].dtype == expected, name
        assert torch.equal(loaded[name], tensor.to(expected)), name


def dit_run_layout(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """What the DiT loads as: token-wise matmul weights in `dtype`, the modulation path in float32."""
    with torch.device("meta"):
        model = CausalDiT(TINY.dit).set_compute_dtype(dtype)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    assert {torch.float32, dtype} == set(dtypes.values()) or dtype == torch.float32
    return dtypes


def test_written_folder_has_the_release_layout(tiny_folder):
    shards = sorted(p.name for p in (tiny_folder / DIT_SUBFOLDER).glob("*.safetensors"))
    assert shards == [f"diffusion_pytorch_model-{i:05d}-of-00016.safetensors" for i in range(1, 17)]
    for name in (
        f"{DIT_SUBFOLDER}/{DIT_INDEX_FILE}",
        VAE_FILE,
        TEXT_ENCODER_FILE,
        f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
    ):
        assert (tiny_folder / name).is_file(), name
    files = ModelFiles.locate(tiny_folder)
    # Stored as released: the DiT and the VAE in float32, the text encoder in bf16.
    assert {info.dtype for info in scan_checkpoint(files.dit).values()} == {torch.float32}
    assert {info.dtype for info in scan_checkpoint(files.vae).values()} == {torch.float32}
    assert {info.dtype for info in scan_checkpoint(files.text_encoder).values()} == {torch.bfloat16}
    assert not list(tiny_folder.rglob("*.tmp")), "temporary files are renamed into place"


def test_load_models_restores_what_the_folder_holds(tiny_folder):
    models = load_models(tiny_folder, "tiny", "cpu", dtype=torch.bfloat16)
    assert isinstance(models.dit, CausalDiT) and isinstance(models.vae, WanVAE)
    assert_holds(models.dit, stored_tensors(models.files.dit), dit_run_layout(torch.bfloat16))
    assert_holds(models.vae, stored_tensors(models.files.vae), torch.float32)
    assert models.vae.latent_mean.device.type == "cpu"  # non-persistent buffers rebuilt after loading
    encoder = load_text_encoder(
        models.files.text_encoder, models.files.tokenizer, TINY.text, "cpu", torch.float32
    )
    assert_holds(encoder.model, stored_tensors(models.files.text_encoder), torch.float32)
    assert encoder.encode_prompts(["a castle in the mist"]).shape == (1, TINY.text.text_len, TINY.text.dim)


def test_write_checkpoint_is_deterministic_in_its_seed(tiny_folder, tmp_path):
    write_checkpoint("tiny", tmp_path / "same", seed=0, num_shards=2)
    write_checkpoint("tiny", tmp_path / "other", seed=1, num_shards=2)
    reference = stored_tensors(ModelFiles.locate(tiny_folder).dit)
    same = stored_tensors(ModelFiles.locate(tmp_path / "same").dit)
    other = stored_tensors(ModelFiles.locate(tmp_path / "other").dit)
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    assert not torch.equal(reference["blocks.0.self_attn.q.weight"], other["blocks.0.self_attn.q.weight"])


def _tiny_text_loader(source: Path, dtype: torch.dtype) -> nn.Module:
    tokenizer = source.parent / TOKENIZER_FILE
    build_tokenizer(TINY.text.vocab).save(str(tokenizer))
    return load_text_encoder(source, tokenizer, TINY.text, "cpu", dtype).model


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[Path, torch.dtype], nn.Module]]] = {
    "dit": (lambda: CausalDiT(TINY.dit), lambda source, dtype: load_dit(source, TINY.dit, "cpu", dtype)),
    "vae": (lambda: WanVAE(TINY.vae), lambda source, dtype: load_vae(source, TINY.vae, "cpu", dtype)),
    "text": (lambda: UMT5Encoder(TINY.text), _tiny_text_loader),
}


@pytest.mark.parametrize("layout", ["sharded", "safetensors", "pth"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_model_round_trips_through_every_layout(tmp_path, model_name, layout):
    build, load = MODELS[model_name]
    torch.manual_seed(3)
    state = build().state_dict()
    if layout == "sharded":
        source = save_sharded(state, tmp_path / "model", num_shards=4)
    elif layout == "safetensors":
        source = tmp_path / "model.safetensors"
        save_safetensors(state, source)
    else:
        source = tmp_path / "model.pth"
        save_pth(state, source)
    expected = dit_run_layout(torch.bfloat16) if model_name == "dit" else torch.bfloat16
    assert_holds(load(source, torch.bfloat16), state, expected)


def test_a_vae_given_for_the_dit_is_named_as_such(tiny_folder):
    with pytest.raises(
        CheckpointError, match=r"Wan2.1_VAE.pth does not hold the DiT: .*looks like the Wan VAE"
    ):
        load_dit(tiny_folder / VAE_FILE, TINY.dit, "cpu", torch.float32)
    with pytest.raises(
        CheckpointError, match=r"does not hold the Wan VAE: .*looks like the umT5 text encoder"
    ):
        load_vae(tiny_folder / TEXT_ENCODER_FILE, TINY.vae, "cpu")


def test_a_folder_of_another_preset_names_the_mismatched_shapes(tiny_folder):
    with pytest.raises(CheckpointError) as error:
        load_models(tiny_folder, "lingbot-world-fast", "cpu")
    message = str(error.value)
    assert "does not match the DiT" in message
    assert "blocks.0.cam_injector_layer1.weight in " in message
    assert "has shape [64, 64]; expected [5120, 5120]" in message
    assert "more mis-shaped or mis-typed tensors" in message  # long lists are cut short
    assert "missing tensors: blocks.10." in message  # the tiny DiT has 2 of the 40 blocks


def test_a_camera_checkpoint_is_refused_by_the_action_model(tmp_path):
    torch.manual_seed(0)
    save_safetensors(CausalDiT(TINY.dit).state_dict(), tmp_path / "cam.safetensors")
    act = replace(TINY.dit, control_type="act")
    with pytest.raises(
        CheckpointError, match=r"patch_embedding_wancamctrl.weight in \S+ has shape \[64, 1536\]"
    ):
        load_dit(tmp_path / "cam.safetensors", act, "cpu", torch.float32)


def test_cli_writes_a_checkpoint_that_loads(tmp_path, capsys):
    assert main(["checkpoint", "write", "--preset", "tiny", "--shards", "3", str(tmp_path / "out")]) == 0
    assert "tiny" in capsys.readouterr().out
    models = load_models(tmp_path / "out", TINY, "cpu", dtype=torch.float32)
    assert models.files.dit.parent == tmp_path / "out" / DIT_SUBFOLDER
    assert len(set(scan_checkpoint(models.files.dit)[n].file for n in models.dit.state_dict())) == 3

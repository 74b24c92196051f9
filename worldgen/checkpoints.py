"""Load real checkpoints strictly, and write random ones in the same on-disk layout.

The model folder users point `--model` at is the LingBot-World release layout (a Wan2.2-I2V-A14B style
folder with the Fast DiT in its own subfolder):

    MODEL/
      lingbot_world_fast/                                   the causal DiT, float32, 16 shards
        diffusion_pytorch_model.safetensors.index.json
        diffusion_pytorch_model-00001-of-00016.safetensors ...
      Wan2.1_VAE.pth                                        the VAE state dict
      models_t5_umt5-xxl-enc-bf16.pth                       the umT5 encoder, Wan layout, bf16
      google/umt5-xxl/tokenizer.json                        the tokenizer (other files there are ignored)

The DiT may also sit at the folder top (as in a plain download of the lingbot-world-fast repository), as
one `*.safetensors.index.json` with its shards or as a single `*.safetensors` file.

Loading builds the model on the meta device, checks every tensor's name, shape and dtype against the
checkpoint headers before reading any data, then materialises one file (shard) at a time from memory-mapped
storage, casting on the way, so two full copies of the weights never coexist.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from worldgen.config import DiTConfig, ModelPreset, TextConfig, VAEConfig, get_preset
from worldgen.files import atomic_output

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from worldgen.models.text import TextEncoder

DIT_SUBFOLDER = "lingbot_world_fast"
DIT_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
DIT_SHARD_FILE = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
DIT_NUM_SHARDS = 16
VAE_FILE = "Wan2.1_VAE.pth"
TEXT_ENCODER_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TOKENIZER_FILE = "tokenizer.json"

# Float dtypes a checkpoint may store; anything else (ints, bools, scaled fp8) would be cast into garbage.
LOADABLE_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# One tensor that only a given model has: names the model a wrong folder or file actually holds.
_SIGNATURE_TENSORS = {
    "patch_embedding.weight": "a DiT",
    "encoder.conv1.weight": "the Wan VAE",
    "token_embedding.weight": "the umT5 text encoder",
}
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a string for dtypes torch does not know


# ---------------------------------------------------------------------------------------------- reading


def _read_pth(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        # mmap: tensors stay on disk until touched; weights_only: a checkpoint cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict (name -> tensor)")
    return state


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118
            return {
                name: TensorInfo(
                    path, tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())
                )
                for name, s in slices.items()
            }
    except Exception as error:  # safetensors raises its own error types for torn or foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def _sharded_header(index_path: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{index_path} is not a safetensors index (a json with 'weight_map')"
        ) from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    infos: dict[str, TensorInfo] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise CheckpointError(f"shard {shard_name} listed in {index_path} is missing")
        header = _safetensors_header(shard)
        listed = {name for name, file in weight_map.items() if file == shard_name}
        if absent := sorted(listed - header.keys()):
            raise CheckpointError(
                f"{index_path} puts {_names(absent)} in {shard_name}, but that shard does not hold them"
            )
        if unlisted := sorted(header.keys() - listed):
            raise CheckpointError(f"{shard} holds {_names(unlisted)}, which {index_path.name} does not list")
        infos.update(header)
    return infos


def scan_checkpoint(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's file, shape and dtype, read from headers only (no tensor data is loaded)."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _sharded_header(path)
    if path.suffix == ".safetensors":
        return _safetensors_header(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} does not exist")
        return {name: TensorInfo(path, tuple(t.shape), t.dtype) for name, t in _read_pth(path).items()}
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .index.json or .pth)")


@contextmanager
def _open_tensors(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter for the tensors of one file, valid while the context is open (memory-mapped)."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            yield handle.get_tensor
    else:
        yield _read_pth(path).__getitem__


# ---------------------------------------------------------------------------------------------- checking


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _dtype_problem(name: str, info: TensorInfo, expected: torch.dtype) -> str | None:
    if expected.is_floating_point:
        if info.dtype not in LOADABLE_FLOAT_DTYPES:
            return f"{name} in {info.file} has dtype {info.dtype}; expected a float dtype (float32/bf16/fp16)"
    elif info.dtype != expected:
        return f"{name} in {info.file} has dtype {info.dtype}; expected {expected}"
    return None


def check_checkpoint(module: nn.Module, infos: Mapping[str, TensorInfo], source: Path, what: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected, mis-shaped or mis-typed tensor."""
    expected = module.state_dict(keep_vars=True)
    matching = expected.keys() & infos.keys()
    # Another model, not another size of this one: most names are foreign both ways.
    if len(matching) < len(expected) / 2 and len(matching) < len(infos) / 2:
        held = next((model for key, model in _SIGNATURE_TENSORS.items() if key in infos), None)
        raise CheckpointError(
            f"{source} does not hold {what}: only {len(matching)} of its {len(expected)} tensors are there"
            + (f"; it looks like {held}" if held else "")
            + f" (it holds {_names(sorted(infos))})"
        )
    problems = []
    if missing := sorted(expected.keys() - infos.keys()):
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected := sorted(infos.keys() - expected.keys()):
        files = sorted({str(infos[name].file) for name in unexpected})
        problems.append(f"unexpected tensors: {_names(unexpected)} (in {', '.join(files)})")
    mismatched = []
    for name in sorted(matching):
        info, target = infos[name], expected[name]
        if info.shape != tuple(target.shape):
            mismatched.append(
                f"{name} in {info.file} has shape {list(info.shape)}; expected {list(target.shape)}"
            )
        if problem := _dtype_problem(name, info, target.dtype):
            mismatched.append(problem)
    problems += mismatched[:_MAX_LISTED]
    if len(mismatched) > _MAX_LISTED:
        problems.append(f"and {len(mismatched) - _MAX_LISTED} more mis-shaped or mis-typed tensors")
    if problems:
        raise CheckpointError(f"{source} does not match {what}:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- loading


def load_checkpoint(
    module: nn.Module,
    source: Path,
    device: torch.device | str,
    dtype: torch.dtype | None,
    what: str = "the model",
) -> nn.Module:
    """Fill a module built on the meta device from `source` (index json, .safetensors or .pth), strictly.

    Float tensors are cast to `dtype` on load, or with `dtype=None` each to the dtype of the module's own
    (meta) tensor, so a mixed-precision layout is reached without a full copy in another dtype. One file's
    tensors are materialised at a time. The module is returned in eval mode without gradients: loaded models
    are for inference.
    """
    source = Path(source)
    infos = scan_checkpoint(source)
    check_checkpoint(module, infos, source, what)
    own_dtypes = {name: tensor.dtype for name, tensor in module.state_dict().items()}
    files: dict[Path, list[str]] = {}
    for name, info in infos.items():
        files.setdefault(info.file, []).append(name)
    for file, names in files.items():
        with _open_tensors(file) as get_tensor:
            part = {}
            for name in names:
                tensor = get_tensor(name)
                target = (dtype or own_dtypes[name]) if tensor.is_floating_point() else tensor.dtype
                part[name] = tensor.to(device=device, dtype=target)
            module.load_state_dict(part, strict=False, assign=True)
    if left := [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]:
        raise CheckpointError(
            f"{what}: {_names(left)} still on the meta device after loading {source} "
            "(non-persistent buffers must be computed outside __init__ or rebuilt after loading)"
        )
    return module.eval().requires_grad_(False)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model folder (see the module docstring for the layout)."""

    root: Path
    dit: Path  # an index json or a single .safetensors file
    vae: Path
    text_encoder: Path
    tokenizer: Path  # tokenizer.json

    @classmethod
    def locate(cls, folder: Path) -> ModelFiles:
        root = Path(folder)
        if not root.is_dir():
            raise CheckpointError(f"model folder {root} does not exist or is not a folder")
        subfolder = root / DIT_SUBFOLDER
        dit = _find_dit(subfolder if subfolder.is_dir() else root)
        files = cls(
            root, dit, root / VAE_FILE, root / TEXT_ENCODER_FILE, root / TOKENIZER_DIR / TOKENIZER_FILE
        )
        required = (files.vae, files.text_encoder, files.tokenizer)
        if missing := [str(p.relative_to(root)) for p in required if not p.is_file()]:
            raise CheckpointError(f"model folder {root} lacks {', '.join(missing)}")
        return files


def _find_dit(directory: Path) -> Path:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    singles = sorted(directory.glob("*.safetensors"))
    if len(indexes) > 1 or (not indexes and len(singles) > 1):
        found = indexes if indexes else singles
        raise CheckpointError(f"{directory} holds several DiT checkpoints: {_names([f.name for f in found])}")
    if not indexes and not singles:
        raise CheckpointError(
            f"no DiT checkpoint in {directory}: expected {DIT_SUBFOLDER}/{DIT_INDEX_FILE} with its shards "
            "(or one .safetensors file)"
        )
    return (indexes or singles)[0]


def load_dit(source: Path, config: DiTConfig, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The DiT in its run layout: token-wise matmul weights in `dtype`, the modulation path in float32."""
    from worldgen.models.dit import CausalDiT

    model = build_on_meta(lambda: CausalDiT(config)).set_compute_dtype(dtype)
    return load_checkpoint(model, source, device, None, "the DiT")


def load_vae(
    source: Path, config: VAEConfig, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> nn.Module:
    from worldgen.models.vae import WanVAE

    return load_checkpoint(build_on_meta(lambda: WanVAE(config)), source, device, dtype, "the Wan VAE")


def load_text_encoder(
    checkpoint: Path, tokenizer_file: Path, config: TextConfig, device: torch.device | str, dtype: torch.dtype
) -> TextEncoder:
    from worldgen.models.text import PromptTokenizer, TextEncoder, UMT5Encoder

    tokenizer = PromptTokenizer.from_file(tokenizer_file, config.text_len)  # first: it loads in a moment
    model = load_checkpoint(
        build_on_meta(lambda: UMT5Encoder(config)), checkpoint, device, dtype, "the umT5 text encoder"
    )
    return TextEncoder(model, tokenizer)


def text_encoder_identity(files: ModelFiles, config: TextConfig) -> str:
    """Names the encoder for the prompt cache: changes when its weights, tokenizer or config change."""
    stats = [(p.resolve(), p.stat()) for p in (files.text_encoder, files.tokenizer)]
    parts = [f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" for path, st in stats]
    return "|".join([*parts, repr(config)])


@dataclass
class LoadedModels:
    dit: nn.Module
    vae: nn.Module
    files: ModelFiles


def load_models(
    folder: Path,
    preset: str | ModelPreset,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype = torch.float32,
) -> LoadedModels:
    """The DiT and the VAE of a model folder. The text encoder is loaded on demand (`load_text_encoder`,
    typically through `worldgen.models.text.embed_prompts`) so it need not stay resident."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    files = ModelFiles.locate(folder)
    dit = load_dit(files.dit, preset.dit, device, dtype)
    vae = load_vae(files.vae, preset.vae, device, vae_dtype)
    return LoadedModels(dit, vae, files)


# ---------------------------------------------------------------------------------------------- writing


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    with atomic_output(path) as temp:
        save_file({name: t.contiguous() for name, t in state.items()}, temp)


def save_pth(state: Mapping[str, torch.Tensor], path: Path) -> None:
    with atomic_output(path) as temp:
        torch.save(dict(state), temp)


def save_sharded(
    state: Mapping[str, torch.Tensor],
    folder: Path,
    num_shards: int,
    index_file: str = DIT_INDEX_FILE,
    shard_file: str = DIT_SHARD_FILE,
) -> Path:
    """Split `state` (in order) into `num_shards` safetensors files of similar size plus an index json."""
    names = list(state)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be between 1 and {len(names)} (the number of tensors)")
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    # Shard k ends before the first tensor whose middle lies past k/num_shards of the bytes, but every
    # shard keeps at least one tensor.
    midpoints = [before + size / 2 for before, size in zip(accumulate(sizes, initial=0), sizes, strict=False)]
    total, ends = sum(sizes), []
    for shard in range(1, num_shards):
        end = bisect_left(midpoints, total * shard / num_shards)
        ends.append(min(max(end, (ends[-1] if ends else 0) + 1), len(names) - (num_shards - shard)))
    shards = [names[start:end] for start, end in zip([0, *ends], [*ends, len(names)], strict=True)]
    weight_map = {}
    for index, shard_names in enumerate(shards, start=1):
        file_name = shard_file.format(index=index, count=num_shards)
        save_safetensors({n: state[n] for n in shard_names}, Path(folder) / file_name)
        weight_map.update(dict.fromkeys(shard_names, file_name))
    index_path = Path(folder) / index_file
    with atomic_output(index_path) as temp:
        temp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index_path


# Words the tiny test tokenizer knows whole; everything else splits into single characters.
_TINY_TOKENIZER_WORDS = """\
the a an of and in on at to with from by for into through past over under around against along across
its his her their it is are was be as this that while then than near far away toward towards up down
video presents shows camera view slow fast moving moves walks flying flies soaring journey scene shot
forest jungle castle stone stones city street road river lake sea ocean beach mountain mountains hill
valley sky clouds cloud sun light night day morning evening sunset sunrise rain snow wind fog mist misty
tree trees grass flowers water waterfall waterfalls island islands building buildings house bridge tower
old ancient gothic modern distant bright dark soft warm cold blue green red white black golden gray
large small tall wide long deep calm serene quiet steady steadily clear clearer floating standing
first person pan panoramic sweep turn turns left right forward backward rider hands bird birds
people man woman car cars train boat details backdrop atmosphere ambient timeless stillness
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A small umT5-like tokenizer (Unigram, `▁` word marks, pad 0, </s> 1, unk 2, </s> appended).

    Hand-made rather than trained, so the same vocabulary comes out on every machine and version.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = [chr(code) for code in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    pieces += [(c, -10.0) for c in chars] + [(f"▁{c}", -9.0) for c in chars]
    if vocab_size < len(pieces):
        raise ValueError(f"a tokenizer needs a vocabulary of at least {len(pieces)} tokens, not {vocab_size}")
    words = _TINY_TOKENIZER_WORDS.split()[: vocab_size - len(pieces)]
    pieces += [(f"▁{word}", -5.0) for word in words]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


def _random_state(model: nn.Module, dtype: torch.dtype, what: str) -> dict[str, torch.Tensor]:
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in model.state_dict().items()}
    if bad := [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]:
        raise RuntimeError(f"{what} initialises {_names(bad)} to non-finite values")
    return state


def write_checkpoint(
    preset_name: str, out_dir: Path, seed: int = 0, num_shards: int = DIT_NUM_SHARDS
) -> ModelFiles:
    """Write a randomly initialised model folder in the release layout (see the module docstring).

    The DiT goes to float32 shards with an index, the VAE to a float32 .pth, the text encoder to a bf16 .pth
    (as released), plus a tokenizer.json sized to the preset's vocabulary. Every file is written atomically.
    The models are built in memory at float32, so this is meant for small presets.
    """
    from worldgen.models.dit import CausalDiT
    from worldgen.models.text import UMT5Encoder
    from worldgen.models.vae import WanVAE

    preset = get_preset(preset_name)
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit_state = _random_state(CausalDiT(preset.dit), torch.float32, "the DiT")
        save_sharded(dit_state, out / DIT_SUBFOLDER, num_shards)
        del dit_state
        save_pth(_random_state(WanVAE(preset.vae), torch.float32, "the VAE"), out / VAE_FILE)
        save_pth(
            _random_state(UMT5Encoder(preset.text), torch.bfloat16, "the text encoder"),
            out / TEXT_ENCODER_FILE,
        )
    tokenizer = build_tokenizer(preset.text.vocab)
    with atomic_output(out / TOKENIZER_DIR / TOKENIZER_FILE) as temp:
        tokenizer.save(str(temp))
    return ModelFiles.locate(out)

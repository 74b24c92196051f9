"""Model presets and generation settings.

Presets are a dict of frozen configs (gpt-fast style): the full-size LingBot-World-Fast models in camera
and action mode, and a `tiny` preset that runs the same code with small dimensions on a CPU.
`Job` is the engine's view of one manifest row; it is a plain dataclass so the engine imports without
pydantic (the manifest layer validates rows into it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

ControlType = Literal["cam", "act"]

# Per-channel statistics of the Wan2.1 VAE latent space (published with the model).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Camera control: 6 Plücker channels folded 8x8 into 384 channels; action control: 7 channels folded 8x8.
CONTROL_CHANNELS: dict[str, int] = {"cam": 6 * 64, "act": 7 * 64}


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36  # 16 noisy latent + 4 mask + 16 conditioning latent
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    control_type: ControlType = "cam"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def control_channels(self) -> int:
        """Channels of the control tensor at latent resolution (before the 1x2x2 patch)."""
        return CONTROL_CHANNELS[self.control_type]


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD

    # 8x spatial and 4x temporal compression follow from dim_mult and temporal_downsample.
    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class TextConfig:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    text_len: int = 512


@dataclass(frozen=True)
class ModelPreset:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextConfig


_FULL_DIT = DiTConfig()
_FULL_VAE = VAEConfig()
_FULL_TEXT = TextConfig()
# The tiny text encoder's vocabulary is the one of the tokenizer the project writes for tests and the demo.
_TINY_TEXT = TextConfig(vocab=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32)
_TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=_TINY_TEXT.dim)
_TINY_VAE = VAEConfig(dim=8)

PRESETS: dict[str, ModelPreset] = {
    "lingbot-world-fast": ModelPreset("lingbot-world-fast", _FULL_DIT, _FULL_VAE, _FULL_TEXT),
    "lingbot-world-fast-act": ModelPreset(
        "lingbot-world-fast-act", replace(_FULL_DIT, control_type="act"), _FULL_VAE, _FULL_TEXT
    ),
    "tiny": ModelPreset("tiny", _TINY_DIT, _TINY_VAE, _TINY_TEXT),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# LingBot-World-Fast v1: 4 steps at these indices of the 1000-entry shifted sigma table.
DEFAULT_TIMESTEP_INDICES = (0, 179, 358, 679)
DEFAULT_SHIFT = 10.0
DEFAULT_MAX_AREA = 832 * 480


@dataclass(frozen=True)
class Job:
    """One video to render: the public job contract of DESIGN.md, with paths already resolved."""

    job_id: str
    prompt: str
    image: str
    frame_num: int
    poses: str | None = None
    intrinsics: str | None = None
    actions: str | None = None
    intrinsics_size: tuple[int, int] = (832, 480)  # (width, height) of the calibration
    chunk_size: int = 3
    local_attn_size: int = 21  # latent frames incl. the current chunk; -1 = whole video
    sink_size: int = 3
    seed: int = 0
    max_area: int = DEFAULT_MAX_AREA
    height: int | None = None
    width: int | None = None
    fps: int = 16
    timestep_indices: tuple[int, ...] = field(default=DEFAULT_TIMESTEP_INDICES)
    shift: float = DEFAULT_SHIFT


PATH_FIELDS = ("image", "poses", "intrinsics", "actions")  # input files, resolved against the manifest
_HASH_VERSION = 1  # bump when the meaning of the settings hash changes, so every job re-renders


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job's resolved settings as a JSON-safe dict (tuples become lists)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(job).items()}


def job_from_dict(data: dict[str, Any]) -> Job:
    """The inverse of `job_to_dict`."""
    tuples = {name: tuple(value) for name, value in data.items() if isinstance(value, list)}
    return Job(**{**data, **tuples})


def job_settings_hash(job: Job) -> str:
    """sha256 hex of the job's settings and the contents of its input files.

    Paths enter through their files' contents, not their names: moving the inputs keeps the hash, editing
    one changes it, as does changing any setting.
    """
    settings = job_to_dict(job)
    for name in PATH_FIELDS:
        if settings[name] is not None:
            with open(settings[name], "rb") as file:
                settings[name] = hashlib.file_digest(file, "sha256").hexdigest()
    payload = json.dumps({"version": _HASH_VERSION, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()

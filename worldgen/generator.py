"""The chunked generator: models loaded once, one `Runtime` per video, one chunk per call.

    generator = ChunkedGenerator(EngineSettings(model="tiny", device="cpu"))
    runtime = generator.create_runtime(job, folder)  # text, conditioning latent, control, KV cache
    while not runtime.done:
        chunk = runtime.generate_next_chunk()        # denoise (4 passes) -> cache update -> VAE decode
        chunk.frames                                 # uint8 [T, H, W, 3] on the host
    # or: for chunk in runtime.chunks(): ...        # the same, pipelined when EngineSettings.overlap

Per chunk i over latent frames [f0, f0 + chunk_size): fresh Gaussian noise, 4 DiT passes with re-noising
between them, one more pass on the clean latent at timestep 0 that only writes clean K/V into the rolling
cache, then the streaming VAE decodes the chunk (9 video frames for chunk 0 of 3 latent frames, 12 after).

`folder` keeps the prompt embeddings (a render uses `OUT/.prompt-cache`; None keeps none on disk).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from worldgen.checkpoints import (
    ModelFiles,
    build_tokenizer,
    check_checkpoint,
    load_dit,
    load_text_encoder,
    load_vae,
    scan_checkpoint,
    text_encoder_identity,
)
from worldgen.compile import compile_dit, warmup
from worldgen.config import PRESETS, Job, ModelPreset, get_preset
from worldgen.control import (
    control_trajectory,
    latent_frame_count,
    load_actions,
    load_intrinsics,
    load_poses,
    output_size,
    video_frame_count,
)
from worldgen.models.attention import check_backend, flash_usable
from worldgen.models.dit import CausalDiT
from worldgen.models.random_init import materialize_random, random_dit, random_vae
from worldgen.models.text import (
    PromptEmbeddingCache,
    PromptTokenizer,
    TextEncoder,
    UMT5Encoder,
    embed_prompts,
)
from worldgen.models.vae import WanVAE, to_uint8_frames
from worldgen.profiling import (
    StageTimer,
    device_environment,
    named_range,
    peak_memory_bytes,
    reset_peak_memory,
)
from worldgen.quant import quantize_dit
from worldgen.schedule import make_schedule, predict_x0, renoise
from worldgen.timing import ChunkTiming, RunInfo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
MASK_CHANNELS = 4  # the first latent frame's 4 video sub-frames are given (the image), the rest generated


class JobInputError(ValueError):
    """A job's inputs cannot be rendered (bad image, trajectory or control mode): retrying cannot help."""


@dataclass(frozen=True)
class EngineSettings:
    """How to run the model (what to render is the `Job`)."""

    model: str = "tiny"  # a preset name (seeded random weights) or a model folder (see checkpoints.py)
    device: str = "cpu"
    dtype: str | None = None  # DiT compute dtype; None: bfloat16 on CUDA, float32 on CPU
    # VAE dtype; None: float64 with a float64 DiT, float32 on the plain path and on CPU, else bfloat16.
    vae_dtype: str | None = None
    # auto | cudnn | flash | efficient | math | default (PyTorch picks) | fa4 | fa3 | fp8: models/attention.py
    attention: str = "auto"
    # The benchmark's yardstick: text K/V and camera modulation recomputed every pass, NCDHW Conv3d inputs.
    plain: bool = False
    # The fast path's switches. None: on for a bf16 model on CUDA off the plain path (`resolved()`), where
    # each gives the same frames up to rounding; fp8 changes them by more (~3% of a latent), so it is opt-in.
    compile: bool | None = None  # torch.compile every DiT block (worldgen/compile.py)
    fp8: bool = False  # e4m3 row-scaled matmuls for the DiT's token-wise layers (worldgen/quant.py)
    # Their kernel's fast accumulation (quant.py): 10-14% faster GEMMs on an H200; off sums as exactly as
    # bf16 GEMMs do. Like compile, it rounds differently but computes the same: recorded, not hashed.
    fp8_fast_accum: bool = True
    # Triton kernels (worldgen/models/triton_kernels.py): the DiT's q/k RMSNorm + RoPE, K written straight
    # into the cache; with fp8, each fp8 layer's input quantisation fused with the norm/GELU before it;
    # the VAE's RMSNorm + SiLU
    triton_kernels: bool | None = None
    gelu_epilogue: bool | None = None  # the FFN's bias + GELU in cuBLASLt's GEMM epilogue; None: not with fp8
    overlap: bool = False  # decode chunk i on a side stream while the DiT generates chunk i+1
    weights_seed: int = 0  # seed of the random weights of a preset

    def resolved(self) -> EngineSettings:
        """These settings with the defaults that depend on the device filled in, and checked: the settings a
        run uses and records. Change a switch on the unresolved settings, not on these (a default filled in
        here, gelu_epilogue say, may not hold for the changed ones)."""
        device = parse_device(self.device)
        dtype = self.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        vae_dtype = self.vae_dtype or _default_vae_dtype(dtype, device, self.plain)
        if vae_dtype not in DTYPES:
            raise ValueError(f"vae_dtype must be one of {', '.join(DTYPES)}, got {vae_dtype!r}")
        if self.model not in PRESETS and not Path(self.model).is_dir():
            raise ValueError(
                f"model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder"
            )
        # From the device's name, not its presence: a flow resolves on its own host, which may have no GPU
        # (the Ray runner); the worker that runs the model checks what it needs there (triton).
        fast = device.type == "cuda" and dtype == "bfloat16" and not self.plain
        settings = replace(
            self,
            device=str(device),
            dtype=dtype,
            vae_dtype=vae_dtype,
            attention=check_backend(self.attention),
            compile=fast if self.compile is None else self.compile,
            triton_kernels=fast if self.triton_kernels is None else self.triton_kernels,
            gelu_epilogue=fast and not self.fp8 if self.gelu_epilogue is None else self.gelu_epilogue,
            fp8_fast_accum=self.fp8 and self.fp8_fast_accum,  # what ran: no fp8 GEMMs, no fast accumulation
        )
        settings._check()
        return settings

    def _check(self) -> None:
        """Raise ValueError where resolved settings contradict each other or the device."""
        device = torch.device(self.device).type
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention in ("cudnn", "efficient") and device != "cuda":
            raise ValueError(f"attention {self.attention!r} is a CUDA kernel; on {device}, use auto")
        if self.fp8 and self.dtype != "bfloat16":
            raise ValueError(f"fp8 layers run in a bfloat16 model, not {self.dtype}")
        if self.attention in ("fa4", "fa3", "fp8") and (device != "cuda" or self.dtype != "bfloat16"):
            raise ValueError(
                f"attention {self.attention!r} runs a bfloat16 model on CUDA, not {self.dtype} on {device}"
            )
        fused = [name for name in ("triton_kernels", "gelu_epilogue") if getattr(self, name)]
        if fused and device != "cuda":
            raise ValueError(f"{' and '.join(fused)}: CUDA kernels, but the device is {device}")
        if self.gelu_epilogue and self.fp8:
            # Its GEMM is an fp8 one, whose GELU already fuses into the next quantisation (torch.compile's
            # kernel, or the Triton one with triton_kernels).
            raise ValueError("gelu_epilogue is for the bf16 FFN; with fp8 layers leave it off")
        if self.plain and (self.compile or self.fp8 or self.attention == "fp8" or fused):
            raise ValueError(
                "the plain path is the uncompiled bf16 yardstick: no compile, no fp8, no fused kernels"
            )
        if self.plain and self.vae_dtype == "bfloat16":
            raise ValueError("the plain path is the yardstick: its VAE runs in float32, not bfloat16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_device(name: str) -> torch.device:
    """`name` as a torch device; a ValueError, not torch's RuntimeError, for a name it cannot parse."""
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}") from error


def _default_vae_dtype(dtype: str, device: torch.device, plain: bool) -> str:
    if dtype == "float64":
        return "float64"  # tests: everything in float64
    # The plain path keeps the released float32 VAE; a CPU has no fast bf16 convolutions.
    return "float32" if plain or device.type != "cuda" else "bfloat16"


@dataclass(frozen=True)
class Chunk:
    """One generated chunk: its frames on the host and what it cost."""

    index: int
    first_latent_frame: int
    latent_frames: int
    kv_frames: int  # latent frames the chunk attended to (its own included)
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latent: torch.Tensor  # the chunk's clean latent x0 [1, 16, F, h, w], on the device
    seconds: dict[str, float]  # denoise, update_cache, decode, generate_next_chunk
    peak_memory_bytes: int | None

    def timing_row(self, run: RunInfo, write_seconds: float, warmup_chunks: int) -> ChunkTiming:
        """This chunk's Parquet row: what the generator measured plus the time spent writing its frames."""
        seconds = self.seconds
        return ChunkTiming.from_run(
            run,
            chunk_index=self.index,
            first_latent_frame=self.first_latent_frame,
            latent_frames=self.latent_frames,
            video_frames=len(self.frames),
            kv_frames=self.kv_frames,
            is_warmup=self.index < warmup_chunks,
            generate_next_chunk_seconds=seconds["generate_next_chunk"],
            denoise_seconds=seconds["denoise"],
            update_cache_seconds=seconds["update_cache"],
            decode_seconds=seconds["decode"],
            write_seconds=write_seconds,
            total_seconds=seconds["generate_next_chunk"] + write_seconds,
            peak_memory_bytes=self.peak_memory_bytes,
        )


@dataclass(frozen=True)
class _Latent:
    """A chunk between its DiT passes and its decode."""

    index: int
    first_latent_frame: int
    latent_frames: int
    kv_frames: int
    latent: torch.Tensor
    seconds: dict[str, float]  # denoise, update_cache
    device: torch.device

    def chunk(self, frames: np.ndarray, decode_seconds: float, chunk_seconds: float) -> Chunk:
        return Chunk(
            index=self.index,
            first_latent_frame=self.first_latent_frame,
            latent_frames=self.latent_frames,
            kv_frames=self.kv_frames,
            frames=frames,
            latent=self.latent,
            seconds={**self.seconds, "decode": decode_seconds, "generate_next_chunk": chunk_seconds},
            peak_memory_bytes=peak_memory_bytes(self.device),
        )


def _detect_preset(dit_checkpoint: Path) -> ModelPreset:
    """The preset whose DiT has exactly the checkpoint's tensor names and shapes; where none has, the
    CheckpointError of the closest one names the tensors that differ."""
    infos = scan_checkpoint(dit_checkpoint)
    shapes = {(name, tuple(info.shape)) for name, info in infos.items()}
    agreeing = {}
    for preset in PRESETS.values():
        with torch.device("meta"):
            model = CausalDiT(preset.dit)
        expected = {(name, tuple(t.shape)) for name, t in model.state_dict().items()}
        if expected == shapes:
            return preset
        agreeing[preset.name] = (len(expected & shapes), model)
    closest = max(agreeing, key=lambda name: agreeing[name][0])
    check_checkpoint(agreeing[closest][1], infos, dit_checkpoint, f"the {closest} DiT (the closest preset)")
    raise AssertionError("unreachable: the shapes differ, so check_checkpoint raised")


def model_preset(model: str) -> ModelPreset:
    """The preset `model` names, or the one a model folder's DiT matches (by its tensor names and shapes:
    no weights are read)."""
    return get_preset(model) if model in PRESETS else _detect_preset(ModelFiles.locate(Path(model)).dit)


def control_mode_problem(job: Job, preset: ModelPreset) -> str | None:
    """What is wrong when `job` drives the model with the other control: key presses (`actions`) for a
    camera model, or none for an action model; None when nothing is. Needs no model: a batch checks every
    job up front."""
    control_type, name = preset.dit.control_type, preset.name
    if control_type == "act" and job.actions is None:
        return f"job {job.job_id}: model {name} needs `actions`"
    if control_type == "cam" and job.actions is not None:
        return f"job {job.job_id}: `actions` given, but model {name} takes the camera"
    return None


def check_control_modes(jobs: list[Job], preset: ModelPreset) -> None:
    """Raise JobInputError naming every job of a batch that `preset` cannot render (control_mode_problem)."""
    problems = [problem for job in jobs if (problem := control_mode_problem(job, preset))]
    if problems:
        raise JobInputError("\n".join(problems))


class ChunkedGenerator:
    """The DiT and the VAE, loaded once and reused by every job; the text encoder only while encoding."""

    def __init__(self, settings: EngineSettings, models: tuple[CausalDiT, WanVAE] | None = None) -> None:
        """Load the models `settings.model` names, or take `models` (already built for that preset) as
        they are: several generators may share one set of weights (the benchmark's plain and fast paths).
        Each generator applies its attention backend and VAE layout to the models it is built with; a VAE
        of another dtype than `settings.vae_dtype` is converted into a copy, the given one left as it is."""
        self.settings = settings = settings.resolved()
        self.device = torch.device(settings.device)
        # Checked here, where the model runs, not in `resolved()`: a flow resolves settings on its own host.
        # Inductor's GPU code is Triton too; on a CPU it compiles C++.
        on_cuda = self.device.type == "cuda"
        if on_cuda and (self.device.index or 0) >= (count := torch.cuda.device_count()):
            found = f"{count} CUDA device{'s' * (count != 1)}" if count else "no CUDA device"
            raise ValueError(f"device {self.device}, but this machine has {found} (--device cpu runs here)")
        needs_triton = [name for name in ("compile", "triton_kernels") if getattr(settings, name) and on_cuda]
        if needs_triton and importlib.util.find_spec("triton") is None:
            flags = " ".join(f"--no-{name.replace('_', '-')}" for name in needs_triton)
            fields = ", ".join(f"{name}=False" for name in needs_triton)
            verb = "need" if len(needs_triton) > 1 else "needs"
            raise ValueError(
                f"{' and '.join(needs_triton)} on CUDA {verb} the triton package (PyTorch's CUDA wheels "
                f"bring it); without it, turn off {flags} (EngineSettings: {fields})"
            )
        if settings.attention in ("fa3", "fp8") and not flash_usable("fa3", self.device):
            raise ValueError(
                f"attention {settings.attention!r} runs FlashAttention-3 (pip install 'worldgen[fa3]') on a "
                f"Hopper GPU; {self.device} has no Hopper GPU or the package does not import"
            )
        self.dtype = DTYPES[settings.dtype]
        vae_dtype = DTYPES[settings.vae_dtype]
        # The DiT is built or loaded straight into its run layout (bf16 matmul weights, fp32 modulation):
        # no float32 copy of 18.5 B parameters. float64 (tests) starts from float32 and is cast below.
        load_dtype = torch.float32 if self.dtype == torch.float64 else self.dtype
        if settings.model in PRESETS:
            self.preset, self.files = get_preset(settings.model), None
            # Built on the device: a full-size model never passes through host memory.
            # The random VAE is drawn in float32 whatever it runs in: every vae_dtype has the same weights.
            self.dit, vae = models or (
                random_dit(self.preset.dit, self.device, load_dtype, settings.weights_seed),
                random_vae(self.preset.vae, self.device, seed=settings.weights_seed),
            )
            self.encoder_identity = f"random:{self.preset.name}:seed{settings.weights_seed}"
        elif models is not None:
            raise ValueError("prebuilt models go with a preset name as `model`, not a model folder")
        else:
            self.files = ModelFiles.locate(Path(settings.model))
            self.preset = _detect_preset(self.files.dit)
            self.dit = load_dit(self.files.dit, self.preset.dit, self.device, load_dtype)
            vae = load_vae(self.files.vae, self.preset.vae, self.device, vae_dtype)
            self.encoder_identity = text_encoder_identity(self.files, self.preset.text)
        # Never converted in place: a VAE given in `models` may be another generator's (the benchmark's plain
        # path keeps float32 while the fast path decodes in bf16). A copy is cheap: 0.5 GB in float32.
        self.vae = vae if vae.dtype == vae_dtype else vae.converted(vae_dtype)
        # float64 runs the DiT in float64 (tests); otherwise its matmuls run in `dtype`.
        if self.dtype == torch.float64:
            self.dit.double()
        else:
            self.dit.set_compute_dtype(self.dtype)
        self.dit.attention_backend = settings.attention
        self.dit.triton_kernels = settings.triton_kernels
        self.dit.gelu_epilogue = settings.gelu_epilogue
        self.dit.eval().requires_grad_(False)
        self.vae.eval().requires_grad_(False)
        self.vae.set_channels_last(not settings.plain)
        self.vae.set_triton_norms(settings.triton_kernels)
        if settings.fp8:
            quantize_dit(self.dit, fast_accum=settings.fp8_fast_accum)
        if settings.compile:
            compile_dit(self.dit)
        self.compile_seconds: dict[tuple[int, int, int], float] = {}  # per (frames, h, w) chunk shape

    def _load_text_encoder(self) -> TextEncoder:
        if self.files is not None:
            return load_text_encoder(
                self.files.text_encoder, self.files.tokenizer, self.preset.text, self.device, self._text_dtype
            )
        with torch.device("meta"):
            model = UMT5Encoder(self.preset.text).to(self._text_dtype)
        materialize_random(model, self.device, self.settings.weights_seed + 1)
        tokenizer = PromptTokenizer.from_tokenizer(
            build_tokenizer(self.preset.text.vocab), self.preset.text.text_len
        )
        return TextEncoder(model, tokenizer)

    @property
    def _text_dtype(self) -> torch.dtype:
        # umT5 is released in bf16; a CPU runs it in float32 (bf16 matmuls there are slow and inexact).
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def embed_prompts(self, prompts: list[str], prompt_cache: Path | None = None) -> list[torch.Tensor]:
        """Text embeddings [text_len, text_dim] (host); each distinct prompt encoded once and, with a
        `prompt_cache` folder, kept there under this generator's encoder identity (None: nothing on disk).

        The folder is an argument, not a setting: where embeddings are kept does not change the model, so
        batches writing to different output folders share one loaded generator."""
        cache = None if prompt_cache is None else PromptEmbeddingCache(prompt_cache, self.encoder_identity)
        return embed_prompts(prompts, self._load_text_encoder, cache)

    def create_runtime(self, job: Job, prompt_cache: Path | None = None) -> Runtime:
        """A new video's state; its text embedding comes through `embed_prompts(..., prompt_cache)`."""
        with named_range("create_runtime"):
            runtime = Runtime(self, job, prompt_cache)
            self._compile_for(runtime)
            return runtime

    def _compile_for(self, runtime: Runtime) -> None:
        """Compile the blocks for this video's chunk shape now, so no chunk pays for it (timed apart)."""
        stride = self.vae.config.spatial_stride
        shape = (runtime.job.chunk_size, runtime.height // stride, runtime.width // stride)
        if self.settings.compile and shape not in self.compile_seconds:
            frames, height, width = shape
            report = warmup(
                self.dit,
                latent_frames=frames,
                latent_height=height,
                latent_width=width,
                dtype=runtime.compute_dtype,
            )
            self.compile_seconds[shape] = report.compile_seconds


_SHARED: dict[EngineSettings, ChunkedGenerator] = {}
_SHARED_LOCK = threading.Lock()
_shared_loads = 0


def shared_generator(settings: EngineSettings) -> ChunkedGenerator:
    """One generator per process and settings, loaded on first use and reused by every later job, whatever
    output folder it renders into."""
    global _shared_loads
    settings = settings.resolved()
    with _SHARED_LOCK:
        if settings not in _SHARED:
            _SHARED[settings] = ChunkedGenerator(settings)
            _shared_loads += 1
        return _SHARED[settings]


def generator_loads() -> int:
    """How many generators `shared_generator` has loaded in this process: a batch worker should show 1."""
    return _shared_loads


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """RGB image -> [1, 3, 1, H, W] in [-1, 1], bicubic resize without crop (as upstream)."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except OSError as error:
        raise JobInputError(f"image {path}: cannot be read ({error})") from error
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1.0
    resized = F.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False)
    return resized[:, :, None]


class Runtime:
    """The state of one video being generated: caches, conditioning, control, noise and the chunk cursor."""

    def __init__(self, generator: ChunkedGenerator, job: Job, prompt_cache: Path | None = None) -> None:
        self.generator, self.job = generator, job
        dit, vae, device = generator.dit, generator.vae, generator.device
        self.latent_frames = latent_frame_count(job.frame_num, job.chunk_size)
        self.video_frames = video_frame_count(self.latent_frames)
        self.num_chunks = self.latent_frames // job.chunk_size
        self.height, self.width = self._output_size()
        self.schedule = make_schedule(job.timestep_indices, job.shift)
        self.control = self._control_trajectory()
        compute = generator.dtype if generator.dtype == torch.float64 else torch.float32

        text = generator.embed_prompts([job.prompt], prompt_cache)[0][None].to(device, compute)
        self.text = text if generator.settings.plain else dit.prepare_text(text)
        self.y = self._conditioning(compute)
        stride = vae.config.spatial_stride
        self.cache = dit.make_kv_cache(
            batch_size=1,
            latent_height=self.height // stride,
            latent_width=self.width // stride,
            chunk_size=job.chunk_size,
            local_attn_size=job.local_attn_size,
            sink_size=job.sink_size,
            num_frames=self.latent_frames,
        )
        # A whole chunk per decoder call: on an H200 at 832x480, bf16, one latent frame per call keeps 3.9 GB
        # of activations instead of 5.9 GB but takes 0.217 s per chunk instead of 0.192 (docs/benchmarks.md).
        self.decoder = vae.decode_stream().start()
        # Initial noise and re-noising draw from two generators derived from the seed, on the device.
        self.noise = torch.Generator(device).manual_seed(job.seed)
        self.renoise_noise = torch.Generator(device).manual_seed(job.seed + 1)
        self.latent_shape = (1, vae.config.z_dim, job.chunk_size, *self.y.shape[3:])
        self.compute_dtype = compute
        self.next_chunk = 0  # the next chunk the DiT generates
        self.decoded_chunks = 0  # may trail next_chunk by one when decoding overlaps the DiT
        # The control tensor of a chunk is NumPy work on the host (~0.3 s at 832x480): build chunk i+1's
        # while the device runs chunk i, in pinned memory so its upload does not synchronise.
        self._host_control = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"control-{job.job_id}")
        self._next_control = self._host_control.submit(self._control_on_host, 0)

    @property
    def done(self) -> bool:
        return self.next_chunk >= self.num_chunks

    def _output_size(self) -> tuple[int, int]:
        job = self.job
        if job.height is not None and job.width is not None:
            return job.height, job.width
        try:
            with Image.open(job.image) as image:
                width, height = image.size
        except OSError as error:
            raise JobInputError(f"image {job.image}: cannot be read ({error})") from error
        return output_size(height, width, job.max_area)

    def _control_trajectory(self):
        job = self.job
        if problem := control_mode_problem(job, self.generator.preset):
            raise JobInputError(problem)
        try:
            return control_trajectory(
                load_poses(job.poses),
                load_intrinsics(job.intrinsics),
                frame_num=job.frame_num,
                chunk_size=job.chunk_size,
                height=self.height,
                width=self.width,
                intrinsics_size=job.intrinsics_size,
                actions=load_actions(job.actions) if job.actions else None,
            )
        except (ValueError, OSError) as error:
            raise JobInputError(f"job {job.job_id}: {error}") from error

    @torch.no_grad()
    def _conditioning(self, dtype: torch.dtype) -> torch.Tensor:
        """y = cat[mask, VAE latent of (image, zeros...)] for every latent frame, [1, 20, L, h, w].

        The zero frames are encoded chunk by chunk through the streaming encoder, so a long video never
        materialises its full pixel tensor.
        """
        vae, device, chunk = self.generator.vae, self.generator.device, self.job.chunk_size
        image = load_image(self.job.image, self.height, self.width).to(device, vae.dtype)
        stride = vae.config.temporal_stride
        latents = []
        with vae.encode_stream() as stream:
            latents.append(stream.encode(image))
            zeros = image.new_zeros(1, 3, stride * chunk, self.height, self.width)
            for first in range(1, self.latent_frames, chunk):
                frames = min(chunk, self.latent_frames - first)
                latents.append(stream.encode(zeros[:, :, : stride * frames]))
        latent = torch.cat(latents, dim=2).to(dtype)
        mask = torch.zeros_like(latent[:, :MASK_CHANNELS])
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latent], dim=1)

    def _control_on_host(self, chunk_index: int) -> torch.Tensor:
        first = chunk_index * self.job.chunk_size
        control = self.control.tensor(first, first + self.job.chunk_size, self.compute_dtype)[None]
        return control.pin_memory() if self.generator.device.type == "cuda" else control

    @torch.no_grad()
    def generate_next_chunk(self) -> Chunk:
        """The next chunk, start to finish: its DiT passes, then its decode."""
        started = time.perf_counter()
        with named_range("generate_next_chunk"):
            latent = self._generate_latent()
            frames, decode_seconds = self._decode(latent.latent)
        return latent.chunk(frames, decode_seconds, time.perf_counter() - started)

    def chunks(self) -> Iterator[Chunk]:
        """Every remaining chunk, in order.

        With `EngineSettings.overlap`, chunk i is decoded on a side stream by a worker thread while the DiT
        generates chunk i+1, and the caller writes chunk i-1 meanwhile; `generate_next_chunk` seconds are
        then the chunk period (the time spent in here between two chunks), and `decode` the decode's own.
        """
        if not self.generator.settings.overlap:
            while not self.done:
                yield self.generate_next_chunk()
            return
        stream = torch.cuda.Stream(self.generator.device) if self.generator.device.type == "cuda" else None
        pending: tuple[_Latent, Future[tuple[np.ndarray, float]]] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae-decode") as decoder:
            period_started = time.perf_counter()
            while pending or not self.done:
                launched = None
                if not self.done:
                    with torch.no_grad(), named_range("generate_next_chunk"):
                        latent = self._generate_latent()
                    ready = None
                    if stream is not None:  # the side stream waits for the DiT; the latent stays alive for it
                        ready = torch.cuda.Event()
                        ready.record()
                        latent.latent.record_stream(stream)
                    launched = (latent, decoder.submit(self._decode_on, stream, ready, latent.latent))
                if pending:
                    frames, decode_seconds = pending[1].result()
                    yield pending[0].chunk(frames, decode_seconds, time.perf_counter() - period_started)
                    period_started = time.perf_counter()
                pending = launched

    def _decode_on(
        self, stream: torch.cuda.Stream | None, ready: torch.cuda.Event | None, latent: torch.Tensor
    ) -> tuple[np.ndarray, float]:
        if stream is None:
            return self._decode(latent)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            return self._decode(latent)

    @torch.no_grad()
    def _generate_latent(self) -> _Latent:
        """The DiT part of the next chunk: 4 denoising passes, then the cache-update pass."""
        if self.done:
            raise RuntimeError(f"job {self.job.job_id}: all {self.num_chunks} chunks are already generated")
        index, chunk = self.next_chunk, self.job.chunk_size
        first, stop = index * chunk, (index + 1) * chunk
        generator, dit, device = self.generator, self.generator.dit, self.generator.device
        timer = StageTimer(device)
        reset_peak_memory(device)
        y = self.y[:, :, first:stop]
        control = self._next_control.result().to(device, non_blocking=True)
        if index + 1 < self.num_chunks:
            self._next_control = self._host_control.submit(self._control_on_host, index + 1)
        with named_range("denoise_chunk"), timer.stage("denoise"):
            # Camera modulation once per chunk, reused by all 5 passes (the plain path recomputes it).
            if not generator.settings.plain:
                control = dit.prepare_control(control)
            latent = self._denoise(y, control, first)
        with named_range("kv_cache_update_forward"), timer.stage("update_cache"):
            if generator.settings.plain:  # a whole forward at timestep 0, its velocity discarded
                dit(latent, 0, y, self.text, control, cache=self.cache, first_latent_frame=first)
            else:  # the same K/V, without the work that only feeds the velocity
                dit.update_cache(latent, y, self.text, control, cache=self.cache, first_latent_frame=first)
        self.next_chunk += 1
        if self.done:
            self._host_control.shutdown()
        return _Latent(index, first, chunk, self.cache.visible_frames, latent, timer.seconds, device)

    @torch.no_grad()
    def _decode(self, latent: torch.Tensor) -> tuple[np.ndarray, float]:
        """A chunk's frames on the host, and the seconds its decode took; closes the stream after the last."""
        timer = StageTimer(self.generator.device)
        with named_range("vae_decode"), timer.stage("decode"):
            frames = to_uint8_frames(self.decoder.decode(latent))
        self.decoded_chunks += 1
        if self.decoded_chunks == self.num_chunks:
            self.decoder.finish()
        return frames, timer.seconds["decode"]

    def _denoise(self, y: torch.Tensor, control: Any, first: int) -> torch.Tensor:
        """The denoising passes of one chunk; returns its clean latent x0."""
        dit, sigmas = self.generator.dit, self.schedule.sigmas
        x = self._gaussian(self.noise)
        for step, (timestep, sigma) in enumerate(zip(self.schedule.timesteps, sigmas, strict=True)):
            velocity = dit(x, timestep, y, self.text, control, cache=self.cache, first_latent_frame=first)
            x0 = predict_x0(x, velocity.to(x.dtype), sigma)
            if step + 1 < len(sigmas):
                x = renoise(x0, self._gaussian(self.renoise_noise), sigmas[step + 1])
        return x0

    def _gaussian(self, rng: torch.Generator) -> torch.Tensor:
        noise = torch.randn(
            self.latent_shape, generator=rng, device=self.generator.device, dtype=torch.float32
        )
        return noise.to(self.compute_dtype)

    def run_info(self, run_id: str) -> RunInfo:
        """What every timing row of this video shares: identity, resolved settings, environment."""
        job, engine = self.job, self.generator.settings
        return RunInfo(
            run_id=run_id,
            job_id=job.job_id,
            model=self.settings["model"],
            height=self.height,
            width=self.width,
            frame_num=job.frame_num,
            chunk_size=job.chunk_size,
            local_attn_size=job.local_attn_size,
            sink_size=job.sink_size,
            steps=len(self.schedule),
            seed=job.seed,
            dtype=engine.dtype,
            attention=engine.attention,
            compile=engine.compile,
            fp8=engine.fp8,
            triton_kernels=engine.triton_kernels,
            gelu_epilogue=engine.gelu_epilogue,
            started_at=datetime.now(UTC),
            **device_environment(self.generator.device),
        )

    @cached_property
    def settings(self) -> dict[str, Any]:
        """The resolved settings of this video, for the timing table and the done-marker."""
        job, engine = self.job, self.generator.settings
        return {
            "model": self.generator.preset.name if self.generator.files is None else engine.model,
            "height": self.height,
            "width": self.width,
            "latent_frames": self.latent_frames,
            "video_frames": self.video_frames,
            "chunks": self.num_chunks,
            "steps": len(self.schedule),
            "timesteps": list(self.schedule.timesteps),
            "dtype": engine.dtype,
            "vae_dtype": engine.vae_dtype,
            "attention": engine.attention,
            "plain": engine.plain,
            "compile": engine.compile,
            "fp8": engine.fp8,
            "fp8_fast_accum": engine.fp8_fast_accum,
            "triton_kernels": engine.triton_kernels,
            "gelu_epilogue": engine.gelu_epilogue,
            "overlap": engine.overlap,
            "device": engine.device,
            "seed": job.seed,
        }

"""Stage timers, the named ranges, the env-driven torch profiler, and kernel-time attribution by family.

- `StageTimer` measures seconds per stage with the device synchronised at both stage edges, so a stage's
  time is the time its GPU work took, not the time it took to enqueue it.
- `named_range(name)` marks one of RANGE_NAMES for torch profiler traces (record_function) and Nsight
  (NVTX). Inside `profile_ranges(trace_dir)`, the ranges selected by `WORLDGEN_PROFILE` also run the torch
  profiler and write one Chrome trace per occurrence.
- `summarize_trace` groups GPU kernel time (CPU op self time when the trace has no GPU) into families.
- `energy_meter(device)` reads the GPU's energy counter (NVML) in joules: on a GPU held at its power cap,
  time follows energy, so the benchmark reports joules per chunk beside the seconds.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import worldgen

RANGE_NAMES = (
    "workloop",
    "create_runtime",
    "generate_next_chunk",
    "denoise_chunk",
    "kv_cache_update_forward",
    "vae_decode",
)

PROFILE_ENV = "WORLDGEN_PROFILE"
RECORD_SHAPES_ENV = "WORLDGEN_TORCH_PROFILER_RECORD_SHAPES"
PROFILE_MEMORY_ENV = "WORLDGEN_TORCH_PROFILER_PROFILE_MEMORY"
WITH_STACK_ENV = "WORLDGEN_TORCH_PROFILER_WITH_STACK"

_FLAG_VALUES = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on this thread's current stream: a stage timed on one stream is not
    billed for work overlapping it on another (the VAE decode of the previous chunk, say)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StageTimer:
    """Seconds per named stage; entering a stage again adds to its total."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        # Synchronise on entry so earlier queued work is not billed here, and on exit so this stage's is.
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on a CUDA device since the last reset; None where torch keeps no peak."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def energy_meter(device: torch.device) -> Callable[[], float | None] | None:
    """A function that reads the GPU's energy counter in joules (NVML's total energy consumption since the
    driver loaded, in mJ; None for a read that fails), or None where there is no counter to read: a CPU, no
    NVML library (libnvidia-ml, which the NVIDIA driver installs), a GPU without the counter (before Volta),
    or a MIG slice (NVML does not know its uuid as a GPU's). The counter moves in steps of about 100 ms on an
    H200: a chunk's joules are good to about a tenth of a second's worth, a mean over many chunks better."""
    if device.type != "cuda":
        return None
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        init, by_uuid = nvml.nvmlInit_v2, nvml.nvmlDeviceGetHandleByUUID
        read_counter = nvml.nvmlDeviceGetTotalEnergyConsumption
    except (OSError, AttributeError):  # no library, or one without these symbols
        return None
    init.restype = by_uuid.restype = read_counter.restype = ctypes.c_int  # nvmlReturn_t, 0 = success
    by_uuid.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    read_counter.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulonglong)]
    handle = ctypes.c_void_p()
    # By uuid: NVML numbers the GPUs whatever CUDA_VISIBLE_DEVICES shows this process.
    uuid = device_environment(device)["gpu"] or ""
    if init() or by_uuid(uuid.encode(), ctypes.byref(handle)):
        return None

    def joules() -> float | None:
        millijoules = ctypes.c_ulonglong()  # one per call: readers on several threads share nothing
        return None if read_counter(handle, ctypes.byref(millijoules)) else millijoules.value / 1e3

    return joules if joules() is not None else None


def device_environment(device: torch.device) -> dict[str, str | None]:
    """The environment fields of a timing row (timing.RunInfo) for `device`."""
    device_name, gpu = device.type, None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        # The uuid names the same GPU whatever CUDA_VISIBLE_DEVICES renumbers it to (one job per GPU);
        # written as nvidia-smi and CUDA_VISIBLE_DEVICES write it.
        uuid = str(properties.uuid)
        device_name, gpu = properties.name, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return {
        "device_name": device_name,
        "gpu": gpu,
        "host": socket.gethostname(),
        "torch_version": torch.__version__,
        "worldgen_version": worldgen.__version__,
    }


def parse_flag(name: str, environ: Mapping[str, str], default: bool = True) -> bool:
    """A boolean env flag: 1/0/true/false/yes/no/on/off in any case; unset or empty -> default.

    Any other value falls back to the default with a warning rather than stopping a render.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    value = _FLAG_VALUES.get(raw.lower())
    if value is None:
        warnings.warn(
            f"{name}={raw!r} is not one of 1/0/true/false/yes/no/on/off; using the default ({default})",
            RuntimeWarning,
            stacklevel=2,
        )
        return default
    return value


def parse_ranges(raw: str) -> frozenset[str]:
    """The ranges named in a WORLDGEN_PROFILE value: a comma list of RANGE_NAMES, or `*` for all."""
    names = {part.strip().lower() for part in raw.split(",")} - {""}
    if "*" in names:
        return frozenset(RANGE_NAMES)
    unknown = sorted(names - set(RANGE_NAMES))
    if unknown:
        raise ValueError(
            f"{PROFILE_ENV}: unknown range(s) {unknown}; known ranges: {', '.join(RANGE_NAMES)}, *"
        )
    return frozenset(names)


@dataclass(frozen=True)
class ProfilerSettings:
    ranges: frozenset[str] = frozenset()  # empty: the profiler never runs
    record_shapes: bool = True
    profile_memory: bool = True
    with_stack: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProfilerSettings:
        environ = os.environ if environ is None else environ
        return cls(
            ranges=parse_ranges(environ.get(PROFILE_ENV, "")),
            record_shapes=parse_flag(RECORD_SHAPES_ENV, environ),
            profile_memory=parse_flag(PROFILE_MEMORY_ENV, environ),
            with_stack=parse_flag(WITH_STACK_ENV, environ),
        )


@dataclass
class RangeProfiler:
    """Runs the torch profiler around the selected ranges; one Chrome trace per range occurrence.

    Ranges nested inside a range being profiled are part of its trace: the torch profiler cannot nest.
    """

    trace_dir: Path
    settings: ProfilerSettings
    traces: list[Path] = field(default_factory=list)
    last_profile: profile | None = None
    _occurrences: dict[str, int] = field(default_factory=dict)
    _running: bool = False

    @contextmanager
    def capture(self, name: str) -> Iterator[None]:
        if self._running or name not in self.settings.ranges:
            yield
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._running = True
        try:
            with profile(
                activities=activities,
                record_shapes=self.settings.record_shapes,
                profile_memory=self.settings.profile_memory,
                with_stack=self.settings.with_stack,
            ) as prof:
                yield
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # kernels still running at stop would be missing from the trace
        finally:
            self._running = False
        occurrence = self._occurrences.get(name, 0)
        self._occurrences[name] = occurrence + 1
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"{name}-{occurrence:04d}.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)
        self.last_profile = prof


_ACTIVE_PROFILER: ContextVar[RangeProfiler | None] = ContextVar("worldgen_range_profiler", default=None)


@contextmanager
def profile_ranges(
    trace_dir: str | os.PathLike[str], settings: ProfilerSettings | None = None
) -> Iterator[RangeProfiler]:
    """Profile the `named_range`s selected by `settings` (default: from the environment) within the block."""
    profiler = RangeProfiler(Path(trace_dir), ProfilerSettings.from_env() if settings is None else settings)
    token = _ACTIVE_PROFILER.set(profiler)
    try:
        yield profiler
    finally:
        _ACTIVE_PROFILER.reset(token)


@contextmanager
def _nvtx_range(name: str) -> Iterator[None]:
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


@contextmanager
def named_range(name: str) -> Iterator[None]:
    """One of RANGE_NAMES, visible in torch profiler traces and (on CUDA) in Nsight as an NVTX range."""
    if name not in RANGE_NAMES:
        raise ValueError(f"unknown range {name!r}; known ranges: {', '.join(RANGE_NAMES)}")
    profiler = _ACTIVE_PROFILER.get()
    with (
        profiler.capture(name) if profiler else nullcontext(),
        record_function(name),
        _nvtx_range(name) if torch.cuda.is_available() else nullcontext(),
    ):
        yield


# Kernel/op name -> family, first match wins (names are lower-cased). Attention and conv come before
# matmul because fused attention and implicit-GEMM convolution kernels also carry gemm/cutlass names;
# `fused` (torch.compile's Triton kernels, named after the ops they fuse: `triton_poi_fused__to_copy_add_..`)
# comes before layout/copy, and layout/copy before elementwise because copies run through the generic
# elementwise kernels.
FAMILY_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern))
    for family, pattern in (
        ("memcpy", r"^mem(cpy|set)\b"),
        ("attention", r"attention|attn|flash|fmha|sdpa|softmax"),
        ("conv", r"conv(?!ert)|fprop|dgrad|wgrad|winograd"),
        (
            "matmul",
            r"gemm|gemv|cublas|cutlass|nvjet|wgmma|aten::(mm|bmm|addmm|addbmm|baddbmm|matmul|linear|_scaled_mm)$",
        ),
        ("norm", r"norm(?!al)|rowwisemoments"),  # not aten::normal_, the noise sampler
        ("fused", r"^triton_(poi|red|per)_"),
        (
            "layout/copy",
            r"copy|transpose|permute|contiguous|clone|catarray|aten::(cat|stack|pad|constant_pad_nd|index\w*|"
            r"gather|scatter|slice\w*|roll|flip|repeat\w*|expand|as_strided|unfold|im2col|col2im)$",
        ),
        (
            "elementwise",
            r"elementwise|pointwise|aten::(add|sub|mul|div|neg|exp|rsqrt|sqrt|pow|silu|gelu|sigmoid|"
            r"tanh|sin|cos|where|clamp|lerp|addcmul|fill|zero|masked_fill)_?$",
        ),
    )
)
FAMILIES = (*(family for family, _ in FAMILY_RULES), "other")


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, rule in FAMILY_RULES if rule.search(lowered)), "other")


@dataclass(frozen=True)
class FamilyTime:
    family: str
    seconds: float
    count: int  # kernels (or ops) in the family
    share: float  # of the summed time


@dataclass(frozen=True)
class KernelTime:
    name: str  # cut to KERNEL_NAME_CHARS
    family: str
    seconds: float
    count: int


KERNEL_NAME_CHARS = 160
TOP_KERNELS = 20


@dataclass(frozen=True)
class TraceSummary:
    source: str  # "gpu kernels" or "cpu ops (self time)"
    families: list[FamilyTime]  # every family, largest first
    kernels: list[KernelTime]  # the TOP_KERNELS names with the most time, largest first

    @property
    def total_seconds(self) -> float:
        return sum(f.seconds for f in self.families)

    def format(self) -> str:
        lines = [f"{'family':<12} {'ms':>11} {'share':>7} {'count':>7}   ({self.source})"]
        lines += [
            f"{f.family:<12} {f.seconds * 1e3:>11.3f} {f.share:>7.1%} {f.count:>7}" for f in self.families
        ]
        lines.append(f"{'total':<12} {self.total_seconds * 1e3:>11.3f}")
        return "\n".join(lines)


def _group(durations_us: Iterable[tuple[str, float]], source: str) -> TraceSummary:
    name_seconds: Counter[str] = Counter()
    name_calls: Counter[str] = Counter()
    for name, duration_us in durations_us:
        name_seconds[name] += duration_us * 1e-6
        name_calls[name] += 1
    seconds = dict.fromkeys(FAMILIES, 0.0)
    counts = dict.fromkeys(FAMILIES, 0)
    kernels = []
    for name, calls in name_calls.items():
        family = kernel_family(name)
        seconds[family] += name_seconds[name]
        counts[family] += calls
        kernels.append(KernelTime(name[:KERNEL_NAME_CHARS], family, name_seconds[name], calls))
    total = sum(seconds.values())
    families = [FamilyTime(f, seconds[f], counts[f], seconds[f] / total if total else 0.0) for f in FAMILIES]
    top = sorted(kernels, key=lambda k: -k.seconds)[:TOP_KERNELS]
    return TraceSummary(source, sorted(families, key=lambda f: -f.seconds), top)


_GPU_SOURCE, _CPU_SOURCE = "gpu kernels", "cpu ops (self time)"
_GPU_TRACE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def _cpu_self_times(ops: list[dict[str, Any]]) -> Iterator[tuple[str, float]]:
    # Trace files hold inclusive durations of nested ops; self time = duration - direct children's.
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for op in ops:
        by_thread.setdefault((op.get("pid"), op.get("tid")), []).append(op)
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda op: (op["ts"], -op["dur"]))
        self_us = [float(op["dur"]) for op in thread_ops]
        open_ops: list[int] = []
        for i, op in enumerate(thread_ops):
            while open_ops and thread_ops[open_ops[-1]]["ts"] + thread_ops[open_ops[-1]]["dur"] <= op["ts"]:
                open_ops.pop()
            if open_ops:
                self_us[open_ops[-1]] -= op["dur"]
            open_ops.append(i)
        yield from ((op["name"], max(us, 0.0)) for op, us in zip(thread_ops, self_us, strict=True))


def _summarize_trace_file(path: Path) -> TraceSummary:
    try:
        events = json.loads(path.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a Chrome trace JSON with 'traceEvents': {err}") from err
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [(e["name"], float(e["dur"])) for e in complete if e.get("cat") in _GPU_TRACE_CATEGORIES]
    if kernels:
        return _group(kernels, _GPU_SOURCE)
    return _group(_cpu_self_times([e for e in complete if e.get("cat") == "cpu_op"]), _CPU_SOURCE)


def _summarize_profile(prof: profile) -> TraceSummary:
    # Device-side events (kernels, memcpy, memset) carry the device's type (`activity_type` is newer than
    # torch 2.11). Ranges (record_function) appear on the GPU timeline too, as user annotations spanning
    # their kernels: counting them would count those kernels twice.
    events = [e for e in prof.events() if not e.is_user_annotation]
    kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        return _group(kernels, _GPU_SOURCE)
    cpu_ops = (
        (e.name, e.self_cpu_time_total)
        for e in events
        if e.device_type == DeviceType.CPU and not getattr(e, "is_python_function", False)  # torch >= 2.12
    )
    return _group(cpu_ops, _CPU_SOURCE)


def summarize_trace(source: profile | str | os.PathLike[str]) -> TraceSummary:
    """Kernel time per family from a finished torch profiler or a Chrome trace file.

    GPU kernels (and memcpy/memset) when the trace has any, else CPU op self time.
    """
    return _summarize_profile(source) if isinstance(source, profile) else _summarize_trace_file(Path(source))

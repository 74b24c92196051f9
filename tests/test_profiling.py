"""Profiler flags and range selection, stage timers, named ranges in traces, kernel families."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from helpers import cuda_test

import worldgen.profiling as profiling_module
from worldgen.profiling import (
    FAMILIES,
    PROFILE_ENV,
    PROFILE_MEMORY_ENV,
    RANGE_NAMES,
    RECORD_SHAPES_ENV,
    WITH_STACK_ENV,
    ProfilerSettings,
    StageTimer,
    device_environment,
    energy_meter,
    kernel_family,
    named_range,
    parse_flag,
    peak_memory_bytes,
    profile_ranges,
    summarize_trace,
)

FLAGS = (RECORD_SHAPES_ENV, PROFILE_MEMORY_ENV, WITH_STACK_ENV)


@pytest.mark.parametrize(
    "raw, expected",
    [("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" ON ", True),
     ("0", False), ("false", False), ("False", False), ("NO", False), ("off", False), ("Off", False)],
)  # fmt: skip
@pytest.mark.parametrize("name", FLAGS)
def test_flags_accept_the_documented_values(name, raw, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_flag(name, {name: raw}) is expected
        settings = ProfilerSettings.from_env({name: raw})
    attribute = {RECORD_SHAPES_ENV: "record_shapes", PROFILE_MEMORY_ENV: "profile_memory"}
    assert getattr(settings, attribute.get(name, "with_stack")) is expected


@pytest.mark.parametrize("raw", ["2", "y", "enable", "nope", "-1", "truee"])
@pytest.mark.parametrize("default", [True, False])
def test_invalid_flag_values_fall_back_to_the_default_with_a_warning(raw, default):
    with pytest.warns(RuntimeWarning, match=f"{WITH_STACK_ENV}='{raw}'"):
        assert parse_flag(WITH_STACK_ENV, {WITH_STACK_ENV: raw}, default) is default


def test_flags_default_to_on_and_the_profiler_to_off():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ProfilerSettings.from_env({}) == ProfilerSettings(frozenset(), True, True, True)
        assert ProfilerSettings.from_env({name: "" for name in (PROFILE_ENV, *FLAGS)}).with_stack is True
    with pytest.warns(RuntimeWarning):
        settings = ProfilerSettings.from_env({PROFILE_MEMORY_ENV: "maybe", RECORD_SHAPES_ENV: "off"})
    assert (settings.record_shapes, settings.profile_memory, settings.with_stack) == (False, True, True)


@pytest.mark.parametrize(
    "raw, expected",
    [("", set()), ("*", set(RANGE_NAMES)), ("vae_decode", {"vae_decode"}),
     (" denoise_chunk , VAE_DECODE,", {"denoise_chunk", "vae_decode"}), ("workloop,*", set(RANGE_NAMES))],
)  # fmt: skip
def test_profile_range_selection(raw, expected):
    assert ProfilerSettings.from_env({PROFILE_ENV: raw}).ranges == expected


def test_unknown_profile_range_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"WORLDGEN_PROFILE: unknown range\(s\) \['denoise'\]"):
        ProfilerSettings.from_env({PROFILE_ENV: "denoise,vae_decode"})
    with pytest.raises(ValueError, match="unknown range 'decode'"), named_range("decode"):
        pass


def test_stage_timer_accumulates_per_stage():
    timer = StageTimer("cpu")
    with timer.stage("denoise"):
        torch.ones(8).sum()
    first = timer.seconds["denoise"]
    with timer.stage("denoise"):
        pass
    with timer.stage("decode"):
        pass
    assert set(timer.seconds) == {"denoise", "decode"}
    assert timer.seconds["denoise"] >= first >= 0.0
    with pytest.raises(RuntimeError), timer.stage("write"):
        raise RuntimeError("boom")
    assert "write" not in timer.seconds  # a failed stage is not a measurement


def test_cpu_environment_has_no_gpu_or_peak_memory():
    cpu = torch.device("cpu")
    environment = device_environment(cpu)
    assert environment["device_name"] == "cpu" and environment["gpu"] is None
    assert environment["torch_version"] == torch.__version__ and environment["host"]
    assert peak_memory_bytes(cpu) is None
    assert energy_meter(cpu) is None


class _FakeNvml:
    """libnvidia-ml's three calls (plain functions, as ctypes' are, so their restype/argtypes can be set),
    each answering with a set return code (0 = success)."""

    def __init__(self, init: int = 0, by_uuid: int = 0, counter: tuple[int, ...] = (0,)) -> None:
        reads = 0

        def read_counter(handle: object, millijoules: object) -> int:  # counter: codes of successive reads
            nonlocal reads
            reads += 1
            millijoules._obj.value = 1500 * reads  # byref(x)._obj is the c_ulonglong passed
            return counter[min(reads, len(counter)) - 1]

        def by_uuid_call(uuid: bytes, handle: object) -> int:
            assert uuid == b"GPU-test"
            return by_uuid

        self.nvmlInit_v2 = lambda: init
        self.nvmlDeviceGetHandleByUUID = by_uuid_call
        self.nvmlDeviceGetTotalEnergyConsumption = read_counter


@pytest.mark.parametrize(
    ("nvml", "reads"),
    [
        (_FakeNvml(counter=(0, 0, 15)), [3.0, None]),  # works, then one read fails: None for that read
        (_FakeNvml(init=1), None),  # NVML does not start
        (_FakeNvml(by_uuid=6), None),  # the uuid is not a GPU NVML knows (a MIG slice, say)
        (_FakeNvml(counter=(3,)), None),  # no energy counter on this GPU (NVML_ERROR_NOT_SUPPORTED)
        (OSError("libnvidia-ml.so.1: cannot open shared object file"), None),  # no driver library
    ],
)
def test_energy_meter_reads_joules_or_says_there_is_none(monkeypatch, nvml, reads) -> None:
    """Without a GPU: NVML stood in for, each way it can answer."""

    def load(name: str) -> _FakeNvml:
        if isinstance(nvml, Exception):
            raise nvml
        return nvml

    monkeypatch.setattr(profiling_module.ctypes, "CDLL", load)
    monkeypatch.setattr(profiling_module, "device_environment", lambda device: {"gpu": "GPU-test"})
    meter = energy_meter(torch.device("cuda"))
    if reads is None:
        assert meter is None
    else:
        assert meter is not None and [meter(), meter()] == reads  # the first read was the check's


@cuda_test
def test_gpu_energy_meter_counts_the_joules_of_work() -> None:
    """NVML's counter rises over a burst of matmuls by joules that make a plausible power for a GPU."""
    device = torch.device("cuda")
    meter = energy_meter(device)
    assert meter is not None, "no NVML energy counter on this GPU"
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    joules, started = meter(), time.perf_counter()
    while time.perf_counter() - started < 1.0:  # the counter updates every few tens of ms
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()
    spent, seconds = meter() - joules, time.perf_counter() - started
    assert 20 < spent / seconds < 2000, (spent, seconds)


def _tiny_workload() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    q = torch.nn.functional.layer_norm(torch.nn.functional.linear(x, torch.randn(32, 32)), (32,))
    attended = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.nn.functional.conv2d(attended.transpose(1, 2).contiguous()[:, :, None], torch.randn(4, 32, 1, 3))


def test_selected_ranges_write_traces_with_kernel_families(tmp_path):
    settings = ProfilerSettings.from_env({PROFILE_ENV: "denoise_chunk"})
    with profile_ranges(tmp_path / "traces", settings) as profiler, named_range("workloop"):
        for _ in range(2):
            with named_range("generate_next_chunk"), named_range("denoise_chunk"):
                _tiny_workload()
            with named_range("vae_decode"):  # not selected: no trace
                _tiny_workload()
    with named_range("denoise_chunk"):  # outside profile_ranges: never profiled
        _tiny_workload()

    names = ["denoise_chunk-0000.json", "denoise_chunk-0001.json"]
    assert [p.name for p in profiler.traces] == names
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == names
    events = json.loads(profiler.traces[0].read_text())["traceEvents"]
    annotations = {e["name"] for e in events if e.get("cat") == "user_annotation"}
    assert "denoise_chunk" in annotations and "vae_decode" not in annotations
    assert any(e.get("cat") == "cpu_op" and e.get("args", {}).get("Input Dims") for e in events)  # shapes

    from_file = summarize_trace(profiler.traces[-1])
    from_profile = summarize_trace(profiler.last_profile)
    for summary in (from_file, from_profile):
        assert summary.source == "cpu ops (self time)"
        assert [f.family for f in summary.families] == sorted(
            FAMILIES, key=lambda f: -summary_seconds(summary, f)
        )
        for family in ("matmul", "attention", "conv", "norm", "layout/copy"):
            assert summary_seconds(summary, family) > 0, family
        assert sum(f.share for f in summary.families) == pytest.approx(1.0)
    # The file's nesting-derived self times match the profiler's own.
    for family in FAMILIES:
        assert summary_seconds(from_file, family) == pytest.approx(
            summary_seconds(from_profile, family), rel=1e-3
        )
    table = from_file.format()
    assert "family" in table.splitlines()[0] and "cpu ops" in table
    assert {line.split()[0] for line in table.splitlines()[1:]} == {*FAMILIES, "total"}


def summary_seconds(summary, family: str) -> float:
    return next(f.seconds for f in summary.families if f.family == family)


def test_a_range_inside_a_profiled_range_is_part_of_its_trace(tmp_path):
    settings = ProfilerSettings(frozenset({"generate_next_chunk", "denoise_chunk"}), False, False, False)
    with profile_ranges(tmp_path, settings) as profiler:
        with named_range("generate_next_chunk"), named_range("denoise_chunk"):
            _tiny_workload()
        with named_range("denoise_chunk"):
            pass
    assert [p.name for p in profiler.traces] == ["generate_next_chunk-0000.json", "denoise_chunk-0000.json"]
    events = json.loads(profiler.traces[0].read_text())["traceEvents"]
    assert {"generate_next_chunk", "denoise_chunk"} <= {
        e["name"] for e in events if e.get("cat") == "user_annotation"
    }


def test_gpu_kernels_take_precedence_over_cpu_ops_in_a_trace_file(tmp_path):
    def kernel(name, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": 0, "dur": dur, "pid": 0, "tid": 7}

    events = [
        kernel("aten::mm", 900.0, cat="cpu_op"),
        kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", 300.0),
        kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", 500.0),
        kernel("Memcpy HtoD (Pageable -> Device)", 50.0, cat="gpu_memcpy"),
        kernel("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", 150.0),
        kernel("denoise_chunk", 2000.0, cat="gpu_user_annotation"),
        # torch.compile's fused kernels are named after their ops; `_to_copy` makes them no copy.
        kernel("triton_poi_fused__to_copy_add_mul_0", 20.0),
        kernel("triton_poi_fused__to_copy_add_mul_0", 25.0),
        kernel("triton_red_fused_native_layer_norm_1", 10.0),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = summarize_trace(path)
    assert summary.source == "gpu kernels"
    seconds = {f.family: f.seconds for f in summary.families}
    assert seconds["attention"] == pytest.approx(500e-6)
    assert seconds["matmul"] == pytest.approx(300e-6)
    assert seconds["elementwise"] == pytest.approx(150e-6)
    assert seconds["memcpy"] == pytest.approx(50e-6)
    assert seconds["fused"] == pytest.approx(45e-6) and seconds["layout/copy"] == 0
    assert seconds["norm"] == pytest.approx(10e-6)
    assert summary.total_seconds == pytest.approx(1055e-6)
    assert [f.family for f in summary.families][:4] == ["attention", "matmul", "elementwise", "memcpy"]
    top = [(k.family, k.count, round(k.seconds * 1e6)) for k in summary.kernels]
    assert top == [
        ("attention", 1, 500), ("matmul", 1, 300), ("elementwise", 1, 150), ("memcpy", 1, 50),
        ("fused", 2, 45), ("norm", 1, 10),
    ]  # fmt: skip


def test_bad_trace_file_is_named(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"trace\.json: not a Chrome trace"):
        summarize_trace(path)


# Real kernel and op names (template arguments shortened) and the family they belong to.
@pytest.mark.parametrize(
    "name, family",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2>", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::linear", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::_softmax", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
        ("aten::convolution", "conv"),
        ("aten::_convert_weight_to_int4pack", "other"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "norm"),
        ("aten::native_group_norm", "norm"),
        ("aten::normal_", "other"),
        ("void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda>", "layout/copy"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4, 64>", "layout/copy"),
        ("aten::copy_", "layout/copy"),
        ("aten::index_select", "layout/copy"),
        ("triton_poi_fused_add_mul_silu_0", "fused"),
        ("triton_poi_fused__to_copy_clamp_1", "fused"),
        ("aten::mul", "elementwise"),
        ("aten::add_", "elementwise"),
        ("Memset (Device)", "memcpy"),
        ("aten::empty", "other"),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps<float>>>", "other"),
    ],
)
def test_kernel_family_rules(name, family):
    assert kernel_family(name) == family

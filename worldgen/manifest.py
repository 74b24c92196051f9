"""Manifests: files of jobs (JSONL or YAML) validated into `worldgen.config.Job`, with line-numbered errors.

JSONL holds one job per line (blank lines and `#` comment lines are skipped). YAML holds a list of jobs, or
a mapping with `defaults` (fields shared by every job) and `jobs` (the list). A .json file holds one job.
Paths are relative to the manifest file and come out absolute. `load_manifest` checks every row against
the schema (types, unknown and missing keys), then against what the engine can render (files, array
shapes, frame counts, sizes, window, schedule), and raises one `ManifestError` naming every problem as
`FILE:LINE: field: reason`, so that nothing is rendered from a manifest with a bad row. The orchestration
layer imports this module; the engine itself takes `Job`s and needs no pydantic.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from worldgen.config import DEFAULT_SHIFT, PATH_FIELDS, Job
from worldgen.control import (
    SIZE_MULTIPLE,
    TEMPORAL_STRIDE,
    check_actions,
    check_intrinsics,
    check_poses,
    latent_frame_count,
    output_size,
    video_frame_count,
)
from worldgen.schedule import make_schedule, shifted_sigmas
from worldgen.timing import TIMING_SCHEMA

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic_core import ErrorDetails

JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
# job_id names the job's output folder: a plain name on every file system, never a path or a dot name.
_SAFE_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SAFE_JOB_ID_RULE = "use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NPY_MAGIC = b"\x93NUMPY"
# Timing rows store these job fields in int32 columns: a larger value would render the whole video, then fail
# to write its timings.
_INT32_FIELDS = tuple(
    column.name for column in TIMING_SCHEMA if column.name in JOB_FIELDS and column.type == pa.int32()
)
_INT32_MAX = 2**31 - 1
# What PIL raises for a file it cannot decode: OSError (truncated data, unknown format), ValueError and
# SyntaxError (broken headers and chunks), DecompressionBombError (more pixels than PIL agrees to decode).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@functools.cache
def _job_schema() -> type[BaseModel]:
    """The pydantic mirror of `Job`, generated from the dataclass so that the two cannot drift apart.

    Strict: a manifest saying frame_num "17" or seed true is wrong, not something to coerce. Built on first
    use, so that importing this module (the engine's render code takes the settings hash from here) needs
    no pydantic.
    """
    from pydantic import ConfigDict, Field, create_model

    def spec(f: dataclasses.Field) -> tuple[Any, Any]:
        annotation = typing.get_type_hints(Job)[f.name]
        if f.default is not dataclasses.MISSING:
            return annotation, f.default
        if f.default_factory is not dataclasses.MISSING:
            return annotation, Field(default_factory=f.default_factory)
        return annotation, ...

    config = ConfigDict(extra="forbid", strict=True)
    return create_model("JobSchema", __config__=config, **{f.name: spec(f) for f in dataclasses.fields(Job)})


class RowError(NamedTuple):
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


class ManifestError(ValueError):
    """Every problem of a manifest, one `FILE:LINE: field: reason` line each, ordered by line."""

    def __init__(self, errors: Iterable[RowError]) -> None:
        self.errors = tuple(sorted(errors, key=lambda error: error.line))  # stable: a row's order stays
        super().__init__("\n".join(map(str, self.errors)))


class _Row(NamedTuple):
    line: int
    data: Any
    duplicate_keys: Sequence[str] = ()  # keys given twice; JSON and YAML parsers would keep the last


# --------------------------------------------------------------------------------------------- public


def load_manifest(path: str | Path) -> list[Job]:
    """The jobs of a .jsonl, .yaml/.yml or one-job .json manifest, paths absolute.

    Raises ManifestError listing every problem when any row is bad (then no job is returned).
    """
    path = Path(path)
    file = str(path)
    parsers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".yaml": _yaml_rows, ".yml": _yaml_rows}
    parse = parsers.get(path.suffix.lower())
    if parse is None:
        raise ManifestError(
            [RowError(file, 1, "manifest", "unsupported format; use .jsonl, .yaml, .yml or .json")]
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise ManifestError([RowError(file, 1, "manifest", f"cannot read the file ({error})")]) from error
    except UnicodeDecodeError as error:
        raise ManifestError([_not_utf8(file, error)]) from error
    rows, errors = parse(text, file)
    jobs = _validate_rows(rows, path.parent.resolve(), file, errors)
    if errors:
        raise ManifestError(errors)
    if not jobs:
        raise ManifestError([RowError(file, 1, "manifest", "no jobs")])
    return jobs


def check_job(job: Job) -> list[tuple[str, str]]:
    """What keeps a well-typed job from rendering, as (field, reason) pairs; empty when it can render.

    Paths are read as they are (load_manifest has made them absolute).
    """
    problems: list[tuple[str, str]] = []
    if not _SAFE_JOB_ID.fullmatch(job.job_id):
        problems.append(("job_id", f"{job.job_id!r} is not a safe folder name: {_SAFE_JOB_ID_RULE}"))
    _check_sizes(job, problems)
    _check_image(job, problems)
    _check_controls(job, problems)
    _check_schedule(job, problems)
    return problems


# -------------------------------------------------------------------------------------------- parsing


def _not_utf8(file: str, error: UnicodeDecodeError) -> RowError:
    """The bad bytes at their line and column (the codec's own message gives an offset into the file)."""
    before = error.object[: error.start]  # what decoded fine (without a BOM: utf-8-sig strips it first)
    line_start = before.rfind(b"\n") + 1
    column = len(before[line_start:].decode("utf-8")) + 1
    shown = " ".join(f"0x{byte:02x}" for byte in error.object[error.start : error.end])
    reason = f"cannot read the file as UTF-8: {error.reason} {shown} at column {column}"
    return RowError(file, before.count(b"\n") + 1, "manifest", reason)


def _jsonl_rows(text: str, file: str) -> tuple[list[_Row], list[RowError]]:
    rows, errors = [], []
    # Split on newlines only: str.splitlines would also split at U+2028, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip() and not line.strip().startswith("#"):
            _parse_json(line, number, file, rows, errors)
    return rows, errors


def _json_rows(text: str, file: str) -> tuple[list[_Row], list[RowError]]:
    """A .json file holds one job (what `worldgen render --job` takes)."""
    rows: list[_Row] = []
    errors: list[RowError] = []
    _parse_json(text, 1, file, rows, errors)
    return rows, errors


def _parse_json(text: str, first_line: int, file: str, rows: list[_Row], errors: list[RowError]) -> None:
    """Parse one JSON value that starts on `first_line` into a row at the line where the value begins."""
    duplicates: list[str] = []
    try:
        data = json.loads(text, object_pairs_hook=functools.partial(_dict_noting_duplicates, duplicates))
    except json.JSONDecodeError as error:
        reason = f"invalid JSON: {error.msg} at column {error.colno}"
        errors.append(RowError(file, first_line + error.lineno - 1, "row", reason))
        return
    leading = text[: len(text) - len(text.lstrip())]
    rows.append(_Row(first_line + leading.count("\n"), data, duplicates))


def _dict_noting_duplicates(duplicates: list[str], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object_pairs_hook: the object as a dict, noting keys given twice (json keeps the last)."""
    keys = [key for key, _ in pairs]
    duplicates.extend(key for i, key in enumerate(keys) if key in keys[:i])
    return dict(pairs)


def _yaml_rows(text: str, file: str) -> tuple[list[_Row], list[RowError]]:
    """Rows of a YAML manifest, each at the line of its list item (read from the composed node tree)."""
    rows: list[_Row] = []
    errors: list[RowError] = []
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as error:  # not a MarkedYAMLError: it has a position, not a mark
        return rows, [_yaml_reader_error(file, text, error)]
    try:
        root = loader.get_single_node()
        if root is None:
            return rows, errors
        defaults_node, jobs_node = None, root
        if isinstance(root, yaml.MappingNode):
            sections = {
                key.value: (key, value) for key, value in root.value if isinstance(key, yaml.ScalarNode)
            }
            for key in _duplicate_keys(root):
                errors.append(_at(file, key, key.value, "given more than once"))
            for key, _ in root.value:
                if key.value not in ("defaults", "jobs"):
                    errors.append(_at(file, key, str(key.value), "unknown key; use defaults and jobs"))
            defaults_node = sections.get("defaults", (None, None))[1]
            jobs_node = sections.get("jobs", (root, None))[1]
            if jobs_node is None:
                errors.append(_at(file, root, "jobs", "missing: a list of jobs under `jobs:`"))
                return rows, errors
        if not isinstance(jobs_node, yaml.SequenceNode):
            errors.append(_at(file, jobs_node, "jobs", "expected a list of jobs"))
            return rows, errors
        defaults = _yaml_defaults(loader, defaults_node, file, errors)
        for item in jobs_node.value:
            duplicates = [key.value for key in _duplicate_keys(item)]  # before merge keys are flattened
            try:
                data = loader.construct_object(item, deep=True)
            except yaml.MarkedYAMLError as error:
                errors.append(_yaml_error(file, error))
                continue
            if isinstance(data, dict):
                data = {**defaults, **data}
            rows.append(_Row(item.start_mark.line + 1, data, duplicates))
    except yaml.MarkedYAMLError as error:
        errors.append(_yaml_error(file, error))
    finally:
        loader.dispose()
    return rows, errors


def _yaml_defaults(
    loader: yaml.SafeLoader, node: yaml.Node | None, file: str, errors: list[RowError]
) -> dict[str, Any]:
    """The shared fields; a bad key is reported once, at its own line, instead of in every job."""
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        errors.append(_at(file, node, "defaults", "expected a mapping of job fields"))
        return {}
    for key in _duplicate_keys(node):
        errors.append(_at(file, key, key.value, "given more than once in defaults"))
    defaults = loader.construct_object(node, deep=True)
    key_nodes = {key.value: key for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
    for name in list(defaults):
        where = key_nodes.get(str(name), node)
        if name == "job_id":
            errors.append(_at(file, where, "job_id", "must be set in each job, not in defaults"))
        elif name not in JOB_FIELDS:
            errors.append(_at(file, where, str(name), _unknown_field(str(name))))
        else:
            continue
        del defaults[name]
    return defaults


def _duplicate_keys(node: yaml.Node) -> list[yaml.ScalarNode]:
    """The key nodes of a mapping that repeat an earlier key (parsers would silently keep the last)."""
    if not isinstance(node, yaml.MappingNode):
        return []
    # Merge keys (`<<: *shared`) are YAML's own override mechanism, not duplicates.
    keys = [key for key, _ in node.value if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG]
    return [key for i, key in enumerate(keys) if key.value in {earlier.value for earlier in keys[:i]}]


def _yaml_error(file: str, error: yaml.MarkedYAMLError) -> RowError:
    mark = error.problem_mark or error.context_mark
    reason = str(error.problem or error.context)
    if error.problem and error.context and error.context_mark:  # where the broken construct began
        reason += f" ({error.context} at line {error.context_mark.line + 1})"
    return RowError(file, mark.line + 1 if mark else 1, "yaml", reason)


def _yaml_reader_error(file: str, text: str, error: yaml.reader.ReaderError) -> RowError:
    """A character YAML does not accept anywhere (control characters), at its line and column."""
    line_start = text.rfind("\n", 0, error.position) + 1
    column = error.position - line_start + 1
    reason = f"unacceptable character #x{error.character:04x} at column {column}: {error.reason}"
    return RowError(file, text.count("\n", 0, error.position) + 1, "yaml", reason)


def _at(file: str, node: yaml.Node, field: str, reason: str) -> RowError:
    return RowError(file, node.start_mark.line + 1, field, reason)


# ----------------------------------------------------------------------------------------- validation


def _validate_rows(rows: list[_Row], base_dir: Path, file: str, errors: list[RowError]) -> list[Job]:
    jobs = []
    first_use: dict[str, tuple[int, str, int]] = {}  # case-folded job_id -> (row index, job_id, line)
    for index, row in enumerate(rows):
        problems = [(key, "given more than once in this job") for key in row.duplicate_keys]
        if isinstance(row.data, dict):
            job, found = _validate_row(row.data, base_dir)
            problems += found
            job_id = row.data.get("job_id")
            if isinstance(job_id, str):
                # Output folders of ids that differ only in case collide on case-insensitive file systems.
                first_index, first_id, first_line = first_use.setdefault(
                    job_id.casefold(), (index, job_id, row.line)
                )
                if first_index != index:
                    same = "" if first_id == job_id else f" (as {first_id!r})"
                    problems.append(("job_id", f"{job_id!r} is already used on line {first_line}{same}"))
        else:
            job = None
            kind = "null" if row.data is None else type(row.data).__name__
            problems.append(("row", f"expected a mapping of job fields, got {kind}"))
        errors.extend(RowError(file, row.line, field, reason) for field, reason in problems)
        if job is not None and not problems:
            jobs.append(job)
    return jobs


def _validate_row(data: dict[str, Any], base_dir: Path) -> tuple[Job | None, list[tuple[str, str]]]:
    # JSON and YAML have no tuples; the schema's sequences are tuples.
    from pydantic import ValidationError

    data = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    try:
        fields = _job_schema().model_validate(data)
    except ValidationError as error:
        return None, [_schema_problem(detail) for detail in error.errors()]
    job = Job(**dict(fields))
    paths = {name: getattr(job, name) for name in PATH_FIELDS if getattr(job, name) is not None}
    job = dataclasses.replace(
        job, **{name: str((base_dir / Path(path).expanduser()).resolve()) for name, path in paths.items()}
    )
    return job, check_job(job)


def _schema_problem(detail: ErrorDetails) -> tuple[str, str]:
    name, *index = detail["loc"]
    field = str(name) + "".join(f"[{i}]" for i in index)
    if detail["type"] == "extra_forbidden":
        return field, _unknown_field(str(name))
    if detail["type"] == "missing":
        return field, "missing item" if index else "required field is missing"
    value = detail["input"]
    shown = json.dumps(list(value) if isinstance(value, tuple) else value, default=repr)
    return field, f"{detail['msg'][0].lower()}{detail['msg'][1:]}, got {shown}"


def _unknown_field(name: str) -> str:
    close = difflib.get_close_matches(name, JOB_FIELDS, n=1)
    return "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")


def _check_sizes(job: Job, problems: list[tuple[str, str]]) -> None:
    _check_bounds(job, problems)
    window, least_window = job.local_attn_size, job.sink_size + job.chunk_size
    if window != -1 and window < 1:
        problems.append(("local_attn_size", f"must be -1 (the whole video) or >= 1, got {window}"))
    elif window != -1 and window < least_window:
        reason = f"{window} latent frames cannot hold sink_size + chunk_size = {least_window}"
        problems.append(("local_attn_size", f"{reason}; use >= {least_window} or -1"))

    if job.frame_num >= 1 and job.chunk_size >= 1:
        try:
            latent_frame_count(job.frame_num, job.chunk_size)
        except ValueError:
            latent_frames = (job.frame_num - 1) // TEMPORAL_STRIDE + 1
            reason = f"{job.frame_num} frames give {latent_frames} latent frames, fewer than one chunk"
            problems.append(("frame_num", f"{reason}; use >= {video_frame_count(job.chunk_size)}"))

    for name, other in (("height", "width"), ("width", "height")):
        value = getattr(job, name)
        if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
            problems.append((name, f"{value} is not a positive multiple of {SIZE_MULTIPLE}"))
        if value is None and getattr(job, other) is not None:
            problems.append((name, f"missing: {other} is given, so {name} must be too (or neither)"))


def _check_bounds(job: Job, problems: list[tuple[str, str]]) -> None:
    for name, least in (("frame_num", 1), ("chunk_size", 1), ("sink_size", 0), ("fps", 1), ("max_area", 1)):
        if getattr(job, name) < least:
            problems.append((name, f"must be >= {least}, got {getattr(job, name)}"))
    for name in _INT32_FIELDS:
        value = getattr(job, name)
        if value is not None and value > _INT32_MAX:
            problems.append((name, f"must be <= {_INT32_MAX} (timing rows store it as int32), got {value}"))
    if not 0 <= job.seed < 2**63:
        problems.append(("seed", f"must be in [0, 2**63), got {job.seed}"))
    if min(job.intrinsics_size) < 1:
        problems.append(("intrinsics_size", f"must be positive, got {list(job.intrinsics_size)}"))


def _check_image(job: Job, problems: list[tuple[str, str]]) -> None:
    if not Path(job.image).is_file():
        problems.append(("image", f"no such file: {job.image}"))
        return
    stat = os.stat(job.image)
    try:
        size = _decoded_image_size(job.image, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
    except _IMAGE_ERRORS as error:
        problems.append(("image", f"cannot read {job.image} as an image ({error})"))
        return
    if job.height is None and job.width is None and job.max_area >= 1:
        _check_max_area(job, *size, problems)


@functools.lru_cache(maxsize=1024)
def _decoded_image_size(path: str, file_version: tuple[int, int, int]) -> tuple[int, int]:
    """(width, height) of an image that decodes in full; PIL's error where it does not.

    The header alone would pass a truncated file that then fails mid-render. Cached by `file_version` (inode,
    size and modification time), so that the many jobs of one image decode it once and an edit re-reads it;
    a failure is not cached (a network file system's hiccup is read again).
    """
    with Image.open(path) as image:
        image.load()
        return image.size


def _check_max_area(job: Job, width: int, height: int, problems: list[tuple[str, str]]) -> None:
    """The video size that max_area gives the image must exist and fit the timing rows' int32."""
    try:
        video_height, video_width = output_size(height, width, job.max_area)
    except ValueError:
        reason = f"{job.max_area} is too small for the {width}x{height} image"
        problems.append(("max_area", f"{reason}: a side would be under {SIZE_MULTIPLE} pixels"))
        return
    if max(video_height, video_width) > _INT32_MAX:
        reason = f"{job.max_area} gives the {width}x{height} image a {video_width}x{video_height} video"
        problems.append(("max_area", f"{reason}: a side would be over {_INT32_MAX} pixels"))


def _check_controls(job: Job, problems: list[tuple[str, str]]) -> None:
    if job.poses is None and job.intrinsics is None and job.actions is None:
        problems.append(("poses", "no control given: set poses + intrinsics (and actions in action mode)"))
        return
    # Action mode feeds the camera rays of poses + intrinsics to the model too: both are needed in every mode.
    checks = (("poses", check_poses), ("intrinsics", check_intrinsics), ("actions", check_actions))
    for name, check in checks:
        path = getattr(job, name)
        if path is None:
            if name != "actions":
                problems.append((name, "missing: every job needs poses and intrinsics (action mode too)"))
            continue
        array, reason = _load_array(path, name, check)
        if reason:
            problems.append((name, reason))
        elif name != "intrinsics" and job.frame_num >= 1:  # only row 0 of the intrinsics is used
            needed = video_frame_count((job.frame_num - 1) // TEMPORAL_STRIDE + 1)
            if len(array) < needed:
                reason = f"{job.frame_num} frames need {needed} rows of {name}, but {path} has {len(array)}"
                problems.append(("frame_num", reason))


def _load_array(
    path: str, name: str, check: Callable[[np.ndarray, str], np.ndarray]
) -> tuple[np.ndarray | None, str | None]:
    """The array of a .npy file that passed `check`, or why it cannot be used."""
    if not Path(path).is_file():
        return None, f"no such file: {path}"
    with open(path, "rb") as file:
        magic = file.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        kind = "an .npz archive" if magic.startswith(b"PK") else "not a .npy file"
        return None, f"{path} is {kind}; expected one .npy array"
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        return None, f"cannot read {path} as a .npy array ({error})"
    if array.dtype.kind not in "biuf":
        return None, f"{path} holds {array.dtype} values, not numbers"
    try:
        check(array, name)
    except ValueError as error:
        return None, f"{path}: {str(error).removeprefix(f'{name}: ')}"
    return array, None


def _check_schedule(job: Job, problems: list[tuple[str, str]]) -> None:
    checks = (
        ("timestep_indices", lambda: make_schedule(job.timestep_indices, DEFAULT_SHIFT)),
        ("shift", lambda: shifted_sigmas(job.shift)),
    )
    for name, check in checks:
        try:
            check()
        except ValueError as error:
            problems.append((name, str(error).removeprefix(f"{name} ")))

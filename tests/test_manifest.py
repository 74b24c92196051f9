"""Manifest loading: exact `FILE:LINE: field: reason` errors for every bad row, resolved jobs, the hash."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worldgen.config import Job, job_settings_hash, job_to_dict
from worldgen.control import check_actions, check_intrinsics, check_poses, latent_frame_count
from worldgen.manifest import ManifestError, load_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
ASSETS = MANIFESTS / "assets"
DROP = object()  # an override that removes the key from the row
INT32_BOUND = "must be <= 2147483647 (timing rows store it as int32)"

GOOD = {
    "job_id": "good",
    "prompt": "a red house",
    "image": "image.png",
    "poses": "poses.npy",
    "intrinsics": "intrinsics.npy",
    "frame_num": 17,
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A manifest folder: copies of the committed assets plus broken variants of them."""
    for asset in ASSETS.iterdir():
        shutil.copy(asset, tmp_path / asset.name)
    poses = np.load(ASSETS / "poses.npy")
    np.save(tmp_path / "short_poses.npy", poses[:10])
    np.save(tmp_path / "flat_poses.npy", poses[:, :3])
    scaled = poses.copy()
    scaled[3, :3, :3] *= 2
    np.save(tmp_path / "scaled_poses.npy", scaled)
    np.save(tmp_path / "intrinsics3.npy", np.full((5, 3), 500.0))
    np.save(tmp_path / "short_actions.npy", np.load(ASSETS / "actions.npy")[:10])
    np.savez(tmp_path / "archive.npz", poses=poses)
    png = (ASSETS / "image.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[:400])  # a whole header, then the pixels stop
    (tmp_path / "broken.png").write_bytes(broken_png(png))
    return tmp_path.resolve()


def broken_png(png: bytes) -> bytes:
    """The PNG with its pixel data split over two chunks, the second under a name no chunk may have."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    start = png.index(b"IDAT") - 4
    length = int.from_bytes(png[start : start + 4], "big")
    pixels = png[start + 8 : start + 8 + length]
    return (
        png[:start] + chunk(b"IDAT", pixels[:100]) + chunk(b"ID-T", pixels[100:]) + png[start + 12 + length :]
    )


def write_jsonl(path: Path, *rows: dict | str) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def bad_row(overrides: dict) -> dict:
    row = {**GOOD, "job_id": "bad", **overrides}
    return {key: value for key, value in row.items() if value is not DROP}


# (overrides of a good row, or a raw line) -> the expected "field: reason" lines; {dir} is the folder.
BAD_JSONL_ROWS = [
    pytest.param({"bogus": 1}, ["bogus: unknown field"], id="unknown-key"),
    pytest.param(
        {"frame_nums": 17}, ["frame_nums: unknown field (did you mean 'frame_num'?)"], id="misspelt-key"
    ),
    pytest.param({"prompt": DROP}, ["prompt: required field is missing"], id="missing-field"),
    pytest.param(
        {"frame_num": "17"}, ['frame_num: input should be a valid integer, got "17"'], id="string-for-int"
    ),
    pytest.param({"seed": True}, ["seed: input should be a valid integer, got true"], id="bool-for-int"),
    pytest.param({"height": 96.0}, ["height: input should be a valid integer, got 96.0"], id="float-for-int"),
    pytest.param({"prompt": None}, ["prompt: input should be a valid string, got null"], id="null-prompt"),
    pytest.param(
        {"intrinsics_size": [832]},
        ["intrinsics_size[1]: missing item"],
        id="short-intrinsics-size",
    ),
    pytest.param(
        {"timestep_indices": [0, "179"]},
        ['timestep_indices[1]: input should be a valid integer, got "179"'],
        id="string-in-list",
    ),
    pytest.param({"image": "missing.png"}, ["image: no such file: {dir}/missing.png"], id="missing-image"),
    pytest.param(
        {"image": "poses.npy"},
        ["image: cannot read {dir}/poses.npy as an image (cannot identify image file '{dir}/poses.npy')"],
        id="unreadable-image",
    ),
    pytest.param(
        {"image": "truncated.png"},
        ["image: cannot read {dir}/truncated.png as an image (image file is truncated)"],
        id="truncated-image",
    ),
    pytest.param(
        {"image": "broken.png"},
        ["image: cannot read {dir}/broken.png as an image (broken PNG file (chunk b'ID-T'))"],
        id="broken-image",
    ),
    pytest.param({"poses": "nope.npy"}, ["poses: no such file: {dir}/nope.npy"], id="missing-poses"),
    pytest.param(
        {"poses": "flat_poses.npy"},
        ["poses: {dir}/flat_poses.npy: expected shape [N, 4, 4] camera-to-world matrices, got [41, 3, 4]"],
        id="poses-shape",
    ),
    pytest.param(
        {"poses": "scaled_poses.npy"},
        [
            "poses: {dir}/scaled_poses.npy: frame 3 is not a rigid rotation (max |R^T R - I| = 3.00e+00, "
            "|det R - 1| = 7.00e+00, tolerance 0.001)"
        ],
        id="poses-not-rigid",
    ),
    pytest.param(
        {"intrinsics": "intrinsics3.npy"},
        ["intrinsics: {dir}/intrinsics3.npy: expected shape [N, 4] of (fx, fy, cx, cy), got [5, 3]"],
        id="intrinsics-shape",
    ),
    pytest.param(
        {"intrinsics": "archive.npz"},
        ["intrinsics: {dir}/archive.npz is an .npz archive; expected one .npy array"],
        id="npz-archive",
    ),
    pytest.param(
        {"actions": "image.png"},
        ["actions: {dir}/image.png is not a .npy file; expected one .npy array"],
        id="actions-not-npy",
    ),
    pytest.param(
        {"actions": "intrinsics.npy"},
        ["actions: {dir}/intrinsics.npy: row 0 is not multi-hot (values must be 0 or 1)"],
        id="actions-not-multi-hot",
    ),
    pytest.param(
        {"poses": "short_poses.npy"},
        ["frame_num: 17 frames need 17 rows of poses, but {dir}/short_poses.npy has 10"],
        id="frames-beyond-poses",
    ),
    pytest.param(
        {"actions": "short_actions.npy"},
        ["frame_num: 17 frames need 17 rows of actions, but {dir}/short_actions.npy has 10"],
        id="frames-beyond-actions",
    ),
    pytest.param(
        {"frame_num": 45},
        ["frame_num: 45 frames need 45 rows of poses, but {dir}/poses.npy has 41"],
        id="too-long",
    ),
    pytest.param({"frame_num": 0}, ["frame_num: must be >= 1, got 0"], id="no-frames"),
    pytest.param(
        {"frame_num": 5},
        ["frame_num: 5 frames give 2 latent frames, fewer than one chunk; use >= 9"],
        id="less-than-a-chunk",
    ),
    pytest.param(
        {"height": 95, "width": 160}, ["height: 95 is not a positive multiple of 16"], id="odd-height"
    ),
    pytest.param(
        {"height": 96, "width": 168}, ["width: 168 is not a positive multiple of 16"], id="width-not-16x"
    ),
    pytest.param(
        {"width": 160},
        ["height: missing: width is given, so height must be too (or neither)"],
        id="width-without-height",
    ),
    pytest.param(
        {"max_area": 100},
        ["max_area: 100 is too small for the 208x120 image: a side would be under 16 pixels"],
        id="max-area-too-small",
    ),
    pytest.param(
        {"local_attn_size": 5},
        ["local_attn_size: 5 latent frames cannot hold sink_size + chunk_size = 6; use >= 6 or -1"],
        id="window-below-sink-plus-chunk",
    ),
    pytest.param(
        {"local_attn_size": -2},
        ["local_attn_size: must be -1 (the whole video) or >= 1, got -2"],
        id="negative-window",
    ),
    pytest.param({"sink_size": -1}, ["sink_size: must be >= 0, got -1"], id="negative-sink"),
    pytest.param(
        {"local_attn_size": 2**31}, [f"local_attn_size: {INT32_BOUND}, got 2147483648"], id="huge-window"
    ),
    pytest.param(
        {"local_attn_size": -1, "sink_size": 2**31},
        [f"sink_size: {INT32_BOUND}, got 2147483648"],
        id="huge-sink",
    ),
    pytest.param(
        {"max_area": 10**30},
        [
            "max_area: 1000000000000000000000000000000 gives the 208x120 image a "
            "1316561177208752x759554525312736 video: a side would be over 2147483647 pixels"
        ],
        id="huge-max-area",
    ),
    pytest.param({"chunk_size": 0}, ["chunk_size: must be >= 1, got 0"], id="empty-chunk"),
    pytest.param({"max_area": -5}, ["max_area: must be >= 1, got -5"], id="negative-area"),
    pytest.param({"seed": -1}, ["seed: must be in [0, 2**63), got -1"], id="negative-seed"),
    pytest.param(
        {"intrinsics_size": [832, 0]},
        ["intrinsics_size: must be positive, got [832, 0]"],
        id="zero-calibration",
    ),
    pytest.param({"fps": 0}, ["fps: must be >= 1, got 0"], id="no-fps"),
    pytest.param(
        {"intrinsics": DROP},
        ["intrinsics: missing: every job needs poses and intrinsics (action mode too)"],
        id="poses-without-intrinsics",
    ),
    pytest.param(
        {"poses": DROP, "intrinsics": DROP, "actions": "actions.npy"},
        [
            "poses: missing: every job needs poses and intrinsics (action mode too)",
            "intrinsics: missing: every job needs poses and intrinsics (action mode too)",
        ],
        id="actions-without-camera",
    ),
    pytest.param(
        {"poses": DROP, "intrinsics": DROP},
        ["poses: no control given: set poses + intrinsics (and actions in action mode)"],
        id="no-control",
    ),
    pytest.param(
        {"timestep_indices": [0, 500, 400]},
        ["timestep_indices: must be strictly increasing, got (0, 500, 400)"],
        id="indices-not-increasing",
    ),
    pytest.param(
        {"timestep_indices": [0, 1000]},
        ["timestep_indices: must lie in [0, 1000), got (0, 1000)"],
        id="index-beyond-table",
    ),
    pytest.param({"timestep_indices": []}, ["timestep_indices: must not be empty"], id="no-steps"),
    pytest.param({"shift": 0}, ["shift: must be a finite number > 0, got 0.0"], id="zero-shift"),
    pytest.param(
        {"job_id": "../out"},
        [
            "job_id: '../out' is not a safe folder name: use 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        ],
        id="job-id-path",
    ),
    pytest.param({"job_id": "good"}, ["job_id: 'good' is already used on line 2"], id="duplicate-job-id"),
    pytest.param(
        {"job_id": "GOOD"}, ["job_id: 'GOOD' is already used on line 2 (as 'good')"], id="job-id-case-clash"
    ),
    pytest.param(
        json.dumps(bad_row({})).removesuffix("}") + ', "frame_num": 21}',
        ["frame_num: given more than once in this job"],
        id="key-twice",
    ),
    pytest.param(
        '{"job_id": "bad" "prompt": "p"}',
        ["row: invalid JSON: Expecting ',' delimiter at column 18"],
        id="bad-json",
    ),
    pytest.param("[1, 2]", ["row: expected a mapping of job fields, got list"], id="not-an-object"),
    pytest.param(
        {"height": 100, "width": 160, "fps": 0, "chunk_size": 6},
        [
            "fps: must be >= 1, got 0",
            "frame_num: 17 frames give 5 latent frames, fewer than one chunk; use >= 21",
            "height: 100 is not a positive multiple of 16",
        ],
        id="several-problems-in-one-row",
    ),
]


@pytest.mark.parametrize(("row", "expected"), BAD_JSONL_ROWS)
def test_bad_jsonl_row_is_reported_at_its_line(folder: Path, row: dict | str, expected: list[str]):
    manifest = write_jsonl(
        folder / "jobs.jsonl",
        "# a good job, then a bad one",
        GOOD,
        row if isinstance(row, str) else bad_row(row),
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert str(caught.value) == "\n".join(f"{manifest}:3: {line.format(dir=folder)}" for line in expected)


# YAML manifests -> the expected "LINE: field: reason" lines. Field errors point at the job's list item.
BAD_YAML = [
    pytest.param(
        """\
        defaults:
          image: image.png
          poses: poses.npy
          intrinsics: intrinsics.npy
          frame_nun: 17
          job_id: shared
          prompt: p
          prompt: q
        jobs:
          - job_id: a
            frame_num: 17
        """,
        [
            "5: frame_nun: unknown field (did you mean 'frame_num'?)",
            "6: job_id: must be set in each job, not in defaults",
            "8: prompt: given more than once in defaults",
        ],
        id="bad-defaults",
    ),
    pytest.param(
        """\
        defaults: {image: image.png, poses: poses.npy, intrinsics: intrinsics.npy, prompt: p}
        jobs:
          - job_id: a
            frame_num: 17
          - job_id: b
            frame_num: 17
            height: 100
            width: 160
          - job_id: a
            frame_num: 17
            fps: 16
            fps: 24
        """,
        [
            "5: height: 100 is not a positive multiple of 16",
            "9: fps: given more than once in this job",
            "9: job_id: 'a' is already used on line 3",
        ],
        id="errors-at-item-lines",
    ),
    pytest.param(
        """\
        defaults: {image: image.png, poses: poses.npy, intrinsics: intrinsics.npy, prompt: p, chunk_size: 0}
        jobs:
          - {job_id: a, frame_num: 17}
          - {job_id: b, frame_num: 17}
        """,
        ["3: chunk_size: must be >= 1, got 0", "4: chunk_size: must be >= 1, got 0"],
        id="bad-default-value-in-every-job",
    ),
    pytest.param(
        """\
        - job_id: a
          prompt: p
          image: image.png
          poses: poses.npy
          intrinsics: intrinsics.npy
          frame_num: seventeen
        - a string
        -
        - job_id: 7
        """,
        [
            '1: frame_num: input should be a valid integer, got "seventeen"',
            "7: row: expected a mapping of job fields, got str",
            "8: row: expected a mapping of job fields, got null",
            "9: job_id: input should be a valid string, got 7",
            "9: prompt: required field is missing",
            "9: image: required field is missing",
            "9: frame_num: required field is missing",
        ],
        id="list-form",
    ),
    pytest.param(
        """\
        - job_id: a
          prompt: [p
        """,
        ["3: yaml: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 2)"],
        id="syntax-error",
    ),
    pytest.param(
        """\
        - job_id: a
          prompt: !!python/object:os.system x
        - job_id: b
          prompt: p
        """,
        [
            "2: yaml: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object:os.system'",
            "3: image: required field is missing",
            "3: frame_num: required field is missing",
        ],
        id="unsafe-tag",
    ),
    pytest.param(
        """\
        job: []
        jobs: {job_id: a}
        """,
        ["1: job: unknown key; use defaults and jobs", "2: jobs: expected a list of jobs"],
        id="jobs-not-a-list",
    ),
    pytest.param(
        '- job_id: a\n  prompt: "p\x01"\n',
        ["2: yaml: unacceptable character #x0001 at column 13: special characters are not allowed"],
        id="control-character",
    ),
    pytest.param(
        "defaults: {prompt: p}\n", ["1: jobs: missing: a list of jobs under `jobs:`"], id="no-jobs-key"
    ),
    pytest.param("just text\n", ["1: jobs: expected a list of jobs"], id="scalar"),
    pytest.param("# nothing here\n", ["1: manifest: no jobs"], id="empty"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_YAML)
def test_bad_yaml_manifest_is_reported_at_its_lines(folder: Path, text: str, expected: list[str]):
    manifest = folder / "jobs.yaml"
    manifest.write_text(textwrap.dedent(text))
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert str(caught.value) == "\n".join(f"{manifest}:{line}" for line in expected)


def test_every_bad_row_is_reported_and_no_job_is_returned(folder: Path):
    manifest = write_jsonl(
        folder / "jobs.jsonl",
        bad_row({"job_id": "a", "fps": 0}),
        {**GOOD, "job_id": "b"},
        "",
        bad_row({"job_id": "c", "image": "gone.png"}),
        "# a comment",
        bad_row({"job_id": "d", "local_attn_size": 4}),
        {**GOOD, "job_id": "e"},
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert [(error.line, error.field) for error in caught.value.errors] == [
        (1, "fps"),
        (4, "image"),
        (6, "local_attn_size"),
    ]
    assert all(error.file == str(manifest) for error in caught.value.errors)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("jobs.txt", "unsupported format; use .jsonl, .yaml, .yml or .json"),
        ("absent.yaml", "cannot read the file ([Errno 2] No such file or directory: '{path}')"),
    ],
)
def test_unusable_manifest_file(folder: Path, name: str, reason: str):
    path = folder / name
    path.with_suffix(".txt").write_text(json.dumps(GOOD))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == f"{path}:1: manifest: {reason.format(path=path)}"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param(
            "jobs.jsonl",
            json.dumps(GOOD).encode() + b"\n\n# caf\xc3\xa9 \xff\n",
            "3: manifest: cannot read the file as UTF-8: invalid start byte 0xff at column 8",
            id="jsonl",
        ),
        pytest.param(
            "jobs.yaml",
            b"\xef\xbb\xbf- job_id: \xe2\x82\n",
            "1: manifest: cannot read the file as UTF-8: invalid continuation byte 0xe2 0x82 at column 11",
            id="yaml-after-a-bom",
        ),
    ],
)
def test_bytes_that_are_not_utf8_are_reported_at_their_line(
    folder: Path, name: str, content: bytes, expected: str
):
    manifest = folder / name
    manifest.write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert str(caught.value) == f"{manifest}:{expected}"


@pytest.mark.parametrize(
    "field", ["height", "width", "frame_num", "chunk_size", "local_attn_size", "sink_size"]
)
def test_fields_of_int32_timing_columns_are_bounded(folder: Path, field: str):
    def int32_problems(value: int) -> list[str]:
        manifest = write_jsonl(folder / "jobs.jsonl", {**GOOD, "height": 96, "width": 160, field: value})
        try:
            load_manifest(manifest)
        except ManifestError as error:  # other checks reject most such rows too (poses too short, ...)
            return [line for line in str(error).splitlines() if INT32_BOUND in line]
        return []

    assert int32_problems(2**31) == [f"{folder}/jobs.jsonl:1: {field}: {INT32_BOUND}, got 2147483648"]
    assert int32_problems(2**31 - 1) == []


def test_image_beyond_the_pixel_limit_of_pil_is_reported(folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    manifest = write_jsonl(folder / "jobs.jsonl", GOOD)
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    reason = "Image size (24960 pixels) exceeds limit of 2000 pixels, could be decompression bomb DOS attack."
    assert str(caught.value) == f"{manifest}:1: image: cannot read {folder}/image.png as an image ({reason})"


def test_each_image_is_decoded_once_until_it_changes(folder: Path, monkeypatch: pytest.MonkeyPatch):
    opened: list[str] = []
    open_image = Image.open

    def counting_open(path: str, *args, **kwargs) -> Image.Image:
        opened.append(Path(path).name)
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    shutil.copy(folder / "image.png", folder / "other.png")
    rows = [
        {**GOOD, "job_id": f"job{i}", "image": image}
        for i, image in enumerate(["image.png"] * 3 + ["other.png"])
    ]
    manifest = write_jsonl(folder / "jobs.jsonl", *rows)
    assert len(load_manifest(manifest)) == 4
    assert sorted(opened) == ["image.png", "other.png"]
    (folder / "image.png").write_bytes((folder / "truncated.png").read_bytes())
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert [(error.line, error.field) for error in caught.value.errors] == [
        (1, "image"),
        (2, "image"),
        (3, "image"),
    ]
    # A failure is not cached (a network file system's hiccup gets read again): each row tried it.
    assert sorted(opened) == ["image.png"] * 4 + ["other.png"]


# -------------------------------------------------------------------------------------------- good input


def test_window_longer_than_the_video_loads(folder: Path):
    """Such a window never slides: the engine renders it as the whole video, in the video's memory."""
    (job,) = load_manifest(write_jsonl(folder / "jobs.jsonl", {**GOOD, "local_attn_size": 2**31 - 1}))
    assert job.local_attn_size == 2**31 - 1


def test_jsonl_loads_jobs_with_paths_resolved_against_the_manifest(folder: Path):
    lists = folder / "lists"
    lists.mkdir()
    relative = {key: f"../{value}" for key, value in GOOD.items() if key in ("image", "poses", "intrinsics")}
    manifest = write_jsonl(
        lists / "jobs.jsonl",
        "# comment lines and blank lines are skipped",
        "",
        {**GOOD, **relative},
        "   # indented comment",
        {
            **GOOD,
            **relative,
            "job_id": "full",
            "image": str(folder / "image.png"),
            "actions": "../actions.npy",
            "intrinsics_size": [416, 240],
            "chunk_size": 2,
            "local_attn_size": -1,
            "sink_size": 0,
            "seed": 5,
            "height": 96,
            "width": 160,
            "fps": 24,
            "timestep_indices": [0, 250, 500, 750],
            "shift": 5,
        },
    )
    paths = {name: str(folder / f"{name}.npy") for name in ("poses", "intrinsics")}
    image = str(folder / "image.png")
    assert load_manifest(manifest) == [
        Job(job_id="good", prompt="a red house", image=image, frame_num=17, **paths),
        Job(
            job_id="full",
            prompt="a red house",
            image=image,
            frame_num=17,
            actions=str(folder / "actions.npy"),
            intrinsics_size=(416, 240),
            chunk_size=2,
            local_attn_size=-1,
            sink_size=0,
            seed=5,
            height=96,
            width=160,
            fps=24,
            timestep_indices=(0, 250, 500, 750),
            shift=5.0,
            **paths,
        ),
    ]


def test_yaml_defaults_are_shared_and_overridden(folder: Path):
    manifest = folder / "jobs.yml"
    manifest.write_text(
        textwrap.dedent(
            """\
            defaults:
              prompt: a red house
              image: image.png
              poses: poses.npy
              intrinsics: intrinsics.npy
              frame_num: 17
              intrinsics_size: [832, 480]
            jobs:
              - job_id: first
              - job_id: second
                frame_num: 21
                timestep_indices: [0, 250, 500, 750]
                actions: actions.npy
            """
        )
    )
    shared = Job(
        job_id="first",
        prompt="a red house",
        image=str(folder / "image.png"),
        frame_num=17,
        poses=str(folder / "poses.npy"),
        intrinsics=str(folder / "intrinsics.npy"),
    )
    assert load_manifest(manifest) == [
        shared,
        dataclasses.replace(
            shared,
            job_id="second",
            frame_num=21,
            timestep_indices=(0, 250, 500, 750),
            actions=str(folder / "actions.npy"),
        ),
    ]


def test_one_job_json_file_loads_and_reports_at_the_line_it_starts(folder: Path):
    job_file = folder / "job.json"
    job_file.write_text("\n" + json.dumps(GOOD, indent=2))
    assert load_manifest(job_file) == load_manifest(write_jsonl(folder / "jobs.jsonl", GOOD))
    job_file.write_text("\n" + json.dumps(bad_row({"fps": 0}), indent=2))
    with pytest.raises(ManifestError) as caught:
        load_manifest(job_file)
    assert str(caught.value) == f"{job_file}:2: fps: must be >= 1, got 0"
    job_file.write_text('{\n  "job_id": "a",\n  "prompt" "p"\n}')
    with pytest.raises(ManifestError) as caught:
        load_manifest(job_file)
    assert str(caught.value) == f"{job_file}:3: row: invalid JSON: Expecting ':' delimiter at column 12"


def test_yaml_list_and_jsonl_give_the_same_jobs(folder: Path):
    rows = [GOOD, {**GOOD, "job_id": "other", "seed": 3}]
    yaml_manifest = folder / "jobs.yaml"
    yaml_manifest.write_text("".join(f"- {json.dumps(row)}\n" for row in rows))  # JSON is YAML
    assert load_manifest(yaml_manifest) == load_manifest(write_jsonl(folder / "jobs.jsonl", *rows))


# ------------------------------------------------------------------------------------------ settings hash


def test_settings_hash_is_stable_and_follows_file_contents_not_paths(folder: Path, tmp_path_factory):
    manifest = write_jsonl(folder / "jobs.jsonl", GOOD)
    (job,) = load_manifest(manifest)
    assert job_settings_hash(job) == job_settings_hash(load_manifest(manifest)[0])
    assert len(job_settings_hash(job)) == 64

    moved = tmp_path_factory.mktemp("moved")
    for name in ("image.png", "poses.npy", "intrinsics.npy", "jobs.jsonl"):
        shutil.copy(folder / name, moved / name)
    (moved_job,) = load_manifest(moved / "jobs.jsonl")
    assert moved_job.image != job.image
    assert job_settings_hash(moved_job) == job_settings_hash(job)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"prompt": "a blue house"},
        {"frame_num": 21},
        {"local_attn_size": -1},
        {"height": 96, "width": 160},
        {"timestep_indices": [0, 250, 500, 750]},
        {"shift": 5.0},
        {"actions": "actions.npy"},
    ],
    ids=lambda change: ",".join(change),
)
def test_settings_hash_changes_with_any_setting(folder: Path, change: dict):
    (before,) = load_manifest(write_jsonl(folder / "a.jsonl", GOOD))
    (after,) = load_manifest(write_jsonl(folder / "b.jsonl", {**GOOD, **change}))
    assert job_settings_hash(after) != job_settings_hash(before)


def test_settings_hash_changes_when_an_input_file_changes(folder: Path):
    manifest = write_jsonl(folder / "jobs.jsonl", GOOD)
    (job,) = load_manifest(manifest)
    before = job_settings_hash(job)
    poses = np.load(folder / "poses.npy")
    poses[:, :3, 3] *= 2  # the same camera path at twice the speed: still valid
    np.save(folder / "poses.npy", poses)
    (reloaded,) = load_manifest(manifest)
    assert reloaded == job
    assert job_settings_hash(reloaded) != before


def test_job_to_dict_is_json_safe_and_round_trips(folder: Path):
    (job,) = load_manifest(write_jsonl(folder / "jobs.jsonl", {**GOOD, "height": 96, "width": 160}))
    settings = json.loads(json.dumps(job_to_dict(job)))
    assert settings["intrinsics_size"] == [832, 480] and settings["image"] == str(folder / "image.png")
    assert Job(**{key: tuple(v) if isinstance(v, list) else v for key, v in settings.items()}) == job


def test_engine_and_settings_hash_need_no_pydantic_prefect_or_yaml(folder: Path):
    """The engine (render path included) runs where only torch and its I/O libraries are installed."""
    (job,) = load_manifest(write_jsonl(folder / "jobs.jsonl", GOOD))
    code = (
        "import json, sys\n"
        "for name in ('pydantic', 'pydantic_core', 'prefect', 'yaml'): sys.modules[name] = None\n"
        "import worldgen.render, worldgen.cli\n"
        "from worldgen.config import Job, job_settings_hash\n"
        "settings = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[1]).items()}\n"
        "print(job_settings_hash(Job(**settings)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job_to_dict(job))],
        cwd=MANIFESTS.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == job_settings_hash(job)


# ------------------------------------------------------------------------------------ committed examples


def test_demo_manifest_loads_two_small_jobs_one_with_a_rolling_window():
    jobs = load_manifest(MANIFESTS / "demo.jsonl")
    assert len(jobs) == 2
    assert all(job.height * job.width <= 160 * 96 and job.frame_num <= 33 for job in jobs)
    windowed = [
        job
        for job in jobs
        if job.sink_size > 0 and 0 < job.local_attn_size < latent_frame_count(job.frame_num, job.chunk_size)
    ]
    assert len(windowed) == 1


def test_example_yaml_loads_with_defaults_and_an_action_job():
    jobs = load_manifest(MANIFESTS / "example.yaml")
    assert len({job.job_id for job in jobs}) == len(jobs) >= 3
    assert len({job.image for job in jobs}) == 1  # shared through `defaults`
    assert any(job.actions is not None for job in jobs)


def test_committed_assets_are_what_their_generator_writes():
    spec = importlib.util.spec_from_file_location("make_assets", MANIFESTS / "make_assets.py")
    make_assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_assets)
    with Image.open(ASSETS / "image.png") as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(make_assets.make_image()))
    assert (ASSETS / "image.png").stat().st_size < 8 * 1024
    poses = np.load(ASSETS / "poses.npy")
    np.testing.assert_array_equal(poses, make_assets.make_poses())
    np.testing.assert_array_equal(np.load(ASSETS / "actions.npy"), make_assets.make_actions())
    check_poses(poses)
    check_intrinsics(np.load(ASSETS / "intrinsics.npy"))
    check_actions(np.load(ASSETS / "actions.npy"))

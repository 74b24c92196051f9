"""Control tensors against an independent float64 NumPy oracle, frame/size rules, and bad-input errors.

The oracle interpolates rotations on SO(3) directly (R_i exp(t log(R_i^T R_i+1)), the short geodesic that a
sign-continuous quaternion slerp follows), inverts poses with np.linalg.inv, back-projects pixels with K^-1
and folds 8x8 blocks by strided slicing: none of it shares code or formulas with worldgen.control.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worldgen.control import (
    control_trajectory,
    fold_pixels,
    interpolate_poses,
    latent_frame_count,
    load_actions,
    load_intrinsics,
    load_poses,
    output_size,
    rotation_to_quaternion,
    video_frame_count,
)

# ------------------------------------------------------------------------------------------ the oracle


def _skew(w: np.ndarray) -> np.ndarray:
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def _so3_exp(rotvec: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(rotvec)
    if angle < 1e-12:
        return np.eye(3) + _skew(rotvec)
    k = _skew(rotvec / angle)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _so3_log(rotation: np.ndarray) -> np.ndarray:
    vee = np.array(
        [rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0], rotation[1, 0] - rotation[0, 1]]
    )
    angle = np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))
    return vee / 2 if angle < 1e-12 else vee * angle / (2 * np.sin(angle))


def oracle_resample(poses: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = []
    for position in positions:
        i = min(int(position), len(poses) - 2)
        t = position - i
        r0, r1 = poses[i, :3, :3], poses[i + 1, :3, :3]
        pose = np.eye(4)
        pose[:3, :3] = r0 @ _so3_exp(t * _so3_log(r0.T @ r1))
        pose[:3, 3] = poses[i, :3, 3] + t * (poses[i + 1, :3, 3] - poses[i, :3, 3])
        out.append(pose)
    return np.array(out)


def oracle_trajectory(poses: np.ndarray, frame_num: int, chunk_size: int) -> np.ndarray:
    latent = (frame_num - 1) // 4 + 1
    used = 4 * (latent - 1) + 1
    latent = latent // chunk_size * chunk_size
    positions = np.arange(latent) * ((used - 1) / (latent - 1))
    resampled = oracle_resample(poses[:used], positions)
    relative = np.linalg.inv(resampled[0]) @ resampled
    relative[0] = np.eye(4)
    stepwise = relative.copy()
    for i in range(1, latent):
        stepwise[i] = np.linalg.inv(relative[i - 1]) @ relative[i]
    largest = max(np.linalg.norm(pose[:3, 3]) for pose in stepwise)
    if largest > 0:
        stepwise[:, :3, 3] /= largest
    return stepwise


def oracle_plucker(stepwise: np.ndarray, k: np.ndarray, height: int, width: int) -> np.ndarray:
    fx, fy, cx, cy = k
    v, u = np.mgrid[0:height, 0:width] + 0.5
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    camera = pixels @ np.linalg.inv(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])).T
    camera /= np.linalg.norm(camera, axis=1, keepdims=True)
    frames = len(stepwise)
    features = np.empty((frames, height, width, 6))
    for f, pose in enumerate(stepwise):
        features[f, ..., :3] = pose[:3, 3]
        features[f, ..., 3:] = (pose[:3, :3] @ camera.T).T.reshape(height, width, 3)
    # Channel c*64 + 8*i + j at latent pixel (y, x) holds feature c of pixel (8y + i, 8x + j).
    out = np.empty((6, 8, 8, frames, height // 8, width // 8))
    for i in range(8):
        for j in range(8):
            out[:, i, j] = features[:, i::8, j::8].transpose(3, 0, 1, 2)
    return out.reshape(6 * 64, frames, height // 8, width // 8)


def orthonormalised(poses: np.ndarray) -> np.ndarray:
    """The nearest rotations (polar decomposition) of float32 file poses, so both sides see exact SO(3)."""
    u, _, vt = np.linalg.svd(poses[:, :3, :3].astype(np.float64))
    out = poses.astype(np.float64).copy()
    out[:, :3, :3] = u @ vt
    return out


def example(shared_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    folder = shared_dir / "data" / "lingbot-examples" / name
    return load_poses(folder / "poses.npy"), load_intrinsics(folder / "intrinsics.npy")


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["00", "01"])
def test_plucker_matches_oracle(shared_dir: Path, name: str) -> None:
    poses, intrinsics = example(shared_dir, name)
    poses = orthonormalised(poses)
    # 17 frames -> 5 latent frames, floored to 4 (chunks of 2): the 4 samples spread over 17 frames.
    trajectory = control_trajectory(poses, intrinsics, frame_num=17, chunk_size=2, height=480, width=832)
    expected = oracle_plucker(oracle_trajectory(poses, 17, 2), intrinsics[0], 480, 832)
    got = trajectory.tensor(dtype=torch.float64)
    assert got.shape == (384, 4, 60, 104)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    # The default float32 output, built per chunk, is the same tensor rounded.
    chunks = torch.cat([trajectory.tensor(start, start + 2) for start in (0, 2)], dim=1)
    assert chunks.dtype == torch.float32
    np.testing.assert_allclose(chunks.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "frame_num", "chunk_size"), [("00", 961, 3), ("01", 561, 4)])
def test_whole_trajectory_matches_oracle(
    shared_dir: Path, name: str, frame_num: int, chunk_size: int
) -> None:
    raw_poses, intrinsics = example(shared_dir, name)
    poses = orthonormalised(raw_poses)
    trajectory = control_trajectory(
        poses, intrinsics, frame_num=frame_num, chunk_size=chunk_size, height=480, width=832
    )
    expected = oracle_trajectory(poses, frame_num, chunk_size)
    assert trajectory.latent_frames == latent_frame_count(frame_num, chunk_size) == len(expected)
    np.testing.assert_allclose(trajectory.poses, expected, rtol=0, atol=1e-10)
    last = slice(len(expected) - chunk_size, len(expected))
    np.testing.assert_allclose(
        trajectory.tensor(last.start, last.stop, dtype=torch.float64).numpy(),
        oracle_plucker(expected[last], intrinsics[0], 480, 832),
        rtol=0,
        atol=1e-10,
    )
    # The float32 files themselves are accepted; their tiny non-orthogonality moves the result by ~1e-7.
    raw = control_trajectory(
        raw_poses, intrinsics, frame_num=frame_num, chunk_size=chunk_size, height=480, width=832
    )
    np.testing.assert_allclose(raw.poses, expected, rtol=0, atol=1e-6)


def test_intrinsics_scaled_from_calibration_size() -> None:
    poses = np.tile(np.eye(4), (9, 1, 1))
    intrinsics = np.array([[500.0, 400.0, 416.0, 240.0]])
    half = control_trajectory(poses, intrinsics, frame_num=9, chunk_size=3, height=240, width=416)
    np.testing.assert_allclose(half.intrinsics, [250.0, 200.0, 208.0, 120.0])
    other = control_trajectory(
        poses, intrinsics, frame_num=9, chunk_size=3, height=480, width=832, intrinsics_size=(416, 240)
    )
    np.testing.assert_allclose(other.intrinsics, [1000.0, 800.0, 832.0, 480.0])
    # A static camera: zero translations (left as they are, not divided by 0).
    control = half.tensor(dtype=torch.float64)
    assert torch.all(control[:192] == 0)
    np.testing.assert_allclose(
        control.numpy(), oracle_plucker(half.poses, half.intrinsics, 240, 416), atol=1e-12
    )


def _rotation_z(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    pose = np.eye(4)
    pose[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return pose


def test_slerp_keeps_sign_continuity() -> None:
    poses = np.stack([_rotation_z(0), _rotation_z(170), _rotation_z(340)])
    poses[:, :3, 3] = [[0, 0, 0], [2, 0, 0], [2, 4, 0]]
    quats = rotation_to_quaternion(poses[:, :3, :3])
    assert np.dot(quats[1], quats[2]) < 0  # the raw quaternions sit on opposite hemispheres
    got = interpolate_poses(poses, np.array([0.0, 0.5, 1.0, 1.5, 2.0]))
    # 170 -> 340 degrees is a 170-degree turn; halfway is 255 degrees, not 85 (the long way round).
    expected_rotations = [_rotation_z(a)[:3, :3] for a in (0, 85, 170, 255, 340)]
    np.testing.assert_allclose(got[:, :3, :3], expected_rotations, atol=1e-12)
    np.testing.assert_allclose(got[:, :3, 3], [[0, 0, 0], [1, 0, 0], [2, 0, 0], [2, 2, 0], [2, 4, 0]])
    np.testing.assert_allclose(got[:, 3], np.tile([0, 0, 0, 1.0], (5, 1)))


def test_fold_pixels_channel_order() -> None:
    features = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16, 24, 3)))
    folded = fold_pixels(features)
    assert folded.shape == (3 * 64, 2, 2, 3)
    for c, i, j, f, y, x in [(0, 0, 0, 0, 0, 0), (2, 7, 1, 1, 1, 2), (1, 3, 6, 0, 1, 0)]:
        assert folded[c * 64 + 8 * i + j, f, y, x] == features[f, 8 * y + i, 8 * x + j, c]


def _random_poses(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((count, 4)) * [4, 0.2, 0.2, 0.2]  # small turns around a steady heading
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    poses = np.tile(np.eye(4), (count, 1, 1))
    poses[:, :3, :3] = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )
    poses[:, :3, 3] = np.cumsum(rng.standard_normal((count, 3)), axis=0)
    return poses


@pytest.mark.parametrize(
    ("frame_num", "video_frames"), [(21, [0, 4, 8, 12, 16, 20]), (25, [0, 5, 10, 14, 19, 24])]
)
def test_action_tensor(frame_num: int, video_frames: list[int]) -> None:
    poses = _random_poses(30, seed=1)
    intrinsics = np.array([[20.0, 21.0, 12.0, 8.0]])
    actions = np.random.default_rng(2).integers(0, 2, size=(30, 4)).astype(np.float32)
    kwargs = {"frame_num": frame_num, "chunk_size": 3, "height": 16, "width": 24}
    acting = control_trajectory(poses, intrinsics, actions=actions, **kwargs).tensor()
    camera = control_trajectory(poses, intrinsics, **kwargs).tensor()
    assert acting.shape == (7 * 64, 6, 2, 3) and camera.shape == (6 * 64, 6, 2, 3)
    # [d, action]: the ray directions of camera mode, then each frame's keys at every pixel of every block.
    torch.testing.assert_close(acting[: 3 * 64], camera[3 * 64 :], rtol=0, atol=0)
    keys = acting[3 * 64 :].reshape(4, 64, 6, 2, 3)
    expected = torch.from_numpy(actions[video_frames].T)[:, None, :, None, None].expand_as(keys)
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)


def test_frame_counts_and_output_size() -> None:
    assert latent_frame_count(81, 3) == 21
    assert latent_frame_count(961, 3) == 240
    assert latent_frame_count(961, 1) == 241
    assert latent_frame_count(84, 3) == 21  # frames past the last 4n+1 are dropped
    assert video_frame_count(21) == 81 and video_frame_count(240) == 957
    assert output_size(480, 832, 832 * 480) == (480, 832)
    assert output_size(1080, 1920, 832 * 480) == (464, 832)
    assert output_size(720, 1280, 832 * 480) == (464, 832)
    assert output_size(832, 480, 832 * 480) == (832, 480)
    with pytest.raises(ValueError, match="fewer latent frames than one chunk"):
        latent_frame_count(5, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        latent_frame_count(0, 3)
    with pytest.raises(ValueError, match="too elongated"):
        output_size(1, 100000, 832 * 480)


def _with(array: np.ndarray, index: tuple, value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


POSES = _random_poses(9, seed=3)
K = np.array([[20.0, 21.0, 12.0, 8.0]])
ACTIONS = np.zeros((9, 4))
MIRROR_Z = np.diag([1.0, 1.0, -1.0, 1.0])
BAD_INPUTS = {
    "poses shape": ({"poses": POSES[:, :3]}, r"poses: expected shape \[N, 4, 4\]"),
    "poses nan": ({"poses": _with(POSES, (4, 0, 3), np.nan)}, r"poses: element \[4, 0, 3\] is NaN or inf"),
    "poses inf": ({"poses": _with(POSES, (2, 1, 1), np.inf)}, "poses: element .* NaN or inf"),
    "poses scaled": ({"poses": _with(POSES, (5, 0, 0), POSES[5, 0, 0] * 1.01)}, "frame 5 is not a rigid"),
    "poses mirrored": ({"poses": MIRROR_Z @ POSES}, r"frame 0 is not a rigid .* \|det R - 1\| = 2"),
    "poses last row": ({"poses": _with(POSES, (3, 3, 0), 0.5)}, r"frame 3 has a last row"),
    "too few poses": ({"poses": POSES, "frame_num": 13}, "9 poses, but frame_num 13 needs 13"),
    "intrinsics shape": ({"intrinsics": K[:, :3]}, r"intrinsics: expected shape \[N, 4\]"),
    "intrinsics fx": ({"intrinsics": _with(K, (0, 0), 0.0)}, "focal length"),
    "intrinsics fy": ({"intrinsics": _with(K, (0, 1), -3.0)}, "focal length"),
    "intrinsics nan": ({"intrinsics": _with(K, (0, 2), np.nan)}, "intrinsics: element"),
    "actions width": ({"actions": ACTIONS[:, :3]}, r"actions: expected shape \[N, 4\]"),
    "actions not multi-hot": ({"actions": _with(ACTIONS, (2, 1), 0.5)}, "row 2 is not multi-hot"),
    "actions nan": ({"actions": _with(ACTIONS, (1, 1), np.nan)}, "actions: element"),
    "too few actions": ({"actions": ACTIONS[:5]}, "actions: 5 rows, but frame_num 9 needs 9"),
    "height": ({"height": 20}, "multiples of 8"),
    "intrinsics_size": ({"intrinsics_size": (0, 480)}, "intrinsics_size"),
    "frame_num": ({"frame_num": 5}, "fewer latent frames than one chunk"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(case: str) -> None:
    overrides, message = BAD_INPUTS[case]
    inputs = {"poses": POSES, "intrinsics": K, "frame_num": 9, "chunk_size": 3, "height": 16, "width": 24}
    inputs.update(overrides)
    with pytest.raises(ValueError, match=message):
        control_trajectory(inputs.pop("poses"), inputs.pop("intrinsics"), **inputs)


def test_loaders_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "poses.npy"
    np.save(good, POSES.astype(np.float32))
    np.testing.assert_allclose(load_poses(good), POSES, atol=1e-6)
    bad_shape = tmp_path / "bad_poses.npy"
    np.save(bad_shape, POSES[:, :3])
    with pytest.raises(ValueError, match=rf"{bad_shape}: expected shape \[N, 4, 4\]"):
        load_poses(bad_shape)
    bad_k = tmp_path / "intrinsics.npy"
    np.save(bad_k, _with(K, (0, 0), -1.0))
    with pytest.raises(ValueError, match=rf"{bad_k}: row 0 has a focal length"):
        load_intrinsics(bad_k)
    not_npy = tmp_path / "action.npy"
    not_npy.write_text("w,a,s,d\n")
    with pytest.raises(ValueError, match=rf"{not_npy}: cannot read"):
        load_actions(not_npy)
    with pytest.raises(FileNotFoundError):
        load_actions(tmp_path / "missing.npy")

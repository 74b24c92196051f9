"""Control signals at latent resolution: camera poses -> Plücker tensor, WASD actions -> action tensor.

Also the frame-count and output-size rules they depend on. Inputs are NumPy arrays (or the .npy files of a
job), the computation is float64, and the tensors come out as torch tensors of the requested dtype.
The construction follows the public LingBot-World code (`wan/utils/cam_utils.py`, `WanI2VFast.generate`);
TeleFuser's `pipelines/lingbot_world_fast/control.py` builds the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldgen.config import DiTConfig

TEMPORAL_STRIDE = 4  # video frames per latent frame (the first latent frame holds a single frame)
SPATIAL_STRIDE = 8  # pixels per latent pixel; an 8x8 block of per-pixel features folds into channels
# An output height/width must fall on whole DiT patches of the VAE latent: 8x VAE stride x 2x2 patch.
SIZE_MULTIPLE = SPATIAL_STRIDE * DiTConfig().patch_size[1]
DEFAULT_INTRINSICS_SIZE = (832, 480)  # (width, height) the intrinsics are calibrated at
RIGID_TOLERANCE = 1e-3  # max |R^T R - I| and |det R - 1| of a pose rotation (float32 files reach ~1e-6)
ACTION_KEYS = "wasd"


def latent_frame_count(frame_num: int, chunk_size: int) -> int:
    """Latent frames of a `frame_num`-frame video, floored to whole chunks of `chunk_size` latent frames."""
    if frame_num < 1 or chunk_size < 1:
        raise ValueError(f"frame_num and chunk_size must be >= 1, got {frame_num} and {chunk_size}")
    latent_frames = (frame_num - 1) // TEMPORAL_STRIDE + 1
    latent_frames -= latent_frames % chunk_size
    if latent_frames == 0:
        raise ValueError(f"frame_num {frame_num} gives fewer latent frames than one chunk of {chunk_size}")
    return latent_frames


def video_frame_count(latent_frames: int) -> int:
    """Video frames decoded from `latent_frames` latent frames: 1 for the first, 4 for each later one."""
    return TEMPORAL_STRIDE * (latent_frames - 1) + 1


def output_size(image_height: int, image_width: int, max_area: int) -> tuple[int, int]:
    """(height, width) of the video: the image's aspect ratio at about `max_area` pixels, multiples of 16.

    lat_h = floor(sqrt(area * h / w) / 8 / 2) * 2 (lat_w alike), height = 8 * lat_h. Integer arithmetic
    (floor(sqrt(y)) == isqrt(floor(y))) keeps 832x480 at 832x480, where float rounding can drop it to 464.
    """
    if min(image_height, image_width, max_area) < 1:
        raise ValueError(
            f"image size and max_area must be positive, got {image_height}x{image_width}, {max_area}"
        )
    block = (2 * SPATIAL_STRIDE) ** 2
    lat_h = 2 * math.isqrt(max_area * image_height // (block * image_width))
    lat_w = 2 * math.isqrt(max_area * image_width // (block * image_height))
    if lat_h == 0 or lat_w == 0:
        raise ValueError(f"image {image_width}x{image_height} is too elongated for max_area {max_area}")
    return SPATIAL_STRIDE * lat_h, SPATIAL_STRIDE * lat_w


# ----------------------------------------------------------------------------------------------- inputs


def _finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        index = np.argwhere(~np.isfinite(array))[0].tolist()
        raise ValueError(f"{name}: element {index} is NaN or inf")


def check_poses(poses: np.ndarray, name: str = "poses") -> np.ndarray:
    """Camera-to-world matrices [N, 4, 4] with rigid rotations, as float64."""
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) == 0:
        raise ValueError(
            f"{name}: expected shape [N, 4, 4] camera-to-world matrices, got {list(poses.shape)}"
        )
    _finite(poses, name)
    bad = np.abs(poses[:, 3] - [0, 0, 0, 1]).max(axis=1) > RIGID_TOLERANCE
    if bad.any():
        raise ValueError(f"{name}: frame {int(np.argmax(bad))} has a last row other than [0, 0, 0, 1]")
    rotations = poses[:, :3, :3]
    orthogonality = np.abs(rotations.transpose(0, 2, 1) @ rotations - np.eye(3)).max(axis=(1, 2))
    determinant = np.abs(np.linalg.det(rotations) - 1)
    bad = np.maximum(orthogonality, determinant) > RIGID_TOLERANCE
    if bad.any():
        frame = int(np.argmax(bad))
        raise ValueError(
            f"{name}: frame {frame} is not a rigid rotation (max |R^T R - I| = {orthogonality[frame]:.2e}, "
            f"|det R - 1| = {determinant[frame]:.2e}, tolerance {RIGID_TOLERANCE})"
        )
    return poses


def check_intrinsics(intrinsics: np.ndarray, name: str = "intrinsics") -> np.ndarray:
    """Pinhole intrinsics [N, 4] (or [4]) of (fx, fy, cx, cy), focal lengths > 0, as float64 [N, 4]."""
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    if intrinsics.ndim == 1:
        intrinsics = intrinsics[None]
    if intrinsics.ndim != 2 or intrinsics.shape[1] != 4 or len(intrinsics) == 0:
        raise ValueError(f"{name}: expected shape [N, 4] of (fx, fy, cx, cy), got {list(intrinsics.shape)}")
    _finite(intrinsics, name)
    bad = (intrinsics[:, :2] <= 0).any(axis=1)
    if bad.any():
        raise ValueError(f"{name}: row {int(np.argmax(bad))} has a focal length fx or fy <= 0")
    return intrinsics


def check_actions(actions: np.ndarray, name: str = "actions") -> np.ndarray:
    """Multi-hot key states [N, 4] in (w, a, s, d) order, each 0 or 1, as float64."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != len(ACTION_KEYS) or len(actions) == 0:
        raise ValueError(
            f"{name}: expected shape [N, 4] of multi-hot (w, a, s, d), got {list(actions.shape)}"
        )
    _finite(actions, name)
    bad = ((actions != 0) & (actions != 1)).any(axis=1)
    if bad.any():
        raise ValueError(f"{name}: row {int(np.argmax(bad))} is not multi-hot (values must be 0 or 1)")
    return actions


def _load(path: str | Path) -> np.ndarray:
    # A missing file raises FileNotFoundError, which names it; content that is no .npy array raises here.
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise ValueError(f"{path}: cannot read as a .npy array ({error})") from error


def load_poses(path: str | Path) -> np.ndarray:
    return check_poses(_load(path), name=str(path))


def load_intrinsics(path: str | Path) -> np.ndarray:
    return check_intrinsics(_load(path), name=str(path))


def load_actions(path: str | Path) -> np.ndarray:
    return check_actions(_load(path), name=str(path))


# ----------------------------------------------------------------------------------------- trajectory


def rotation_to_quaternion(rotations: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z) [N, 4] of rotation matrices [N, 3, 3].

    4 q q^T is a symmetric matrix of R's entries; its column with the largest diagonal entry (4 q_k^2) is
    4 q_k q, the best-conditioned choice (Shepperd's method).
    """
    r = rotations
    trace = np.trace(r, axis1=1, axis2=2)
    # Entries of 4 q q^T, named by the quaternion components they multiply.
    wx, wy, wz = r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]
    xy, xz, yz = r[:, 0, 1] + r[:, 1, 0], r[:, 0, 2] + r[:, 2, 0], r[:, 1, 2] + r[:, 2, 1]
    xx, yy, zz = (1 + 2 * r[:, i, i] - trace for i in range(3))
    outer = np.stack(
        [
            np.stack([1 + trace, wx, wy, wz], -1),
            np.stack([wx, xx, xy, xz], -1),
            np.stack([wy, xy, yy, yz], -1),
            np.stack([wz, xz, yz, zz], -1),
        ],
        axis=1,
    )
    best = np.argmax(np.diagonal(outer, axis1=1, axis2=2), axis=1)
    column = outer[np.arange(len(r)), :, best]
    return column / np.linalg.norm(column, axis=1, keepdims=True)


def quaternion_to_rotation(quaternions: np.ndarray) -> np.ndarray:
    """Rotation matrices [N, 3, 3] of unit quaternions (w, x, y, z) [N, 4]."""
    w, x, y, z = quaternions.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def interpolate_poses(poses: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Poses [N, 4, 4] sampled at fractional `positions` in [0, N-1]: slerp rotations, lerp translations.

    q and -q are the same rotation; flipping each quaternion into the hemisphere of its predecessor
    (sign continuity) makes every slerp take the short arc.
    """
    quats = rotation_to_quaternion(poses[:, :3, :3])
    signs = np.where(np.sum(quats[1:] * quats[:-1], axis=1) < 0, -1.0, 1.0)
    quats[1:] *= np.cumprod(signs)[:, None]

    lower = np.clip(np.floor(positions).astype(int), 0, max(len(poses) - 2, 0))
    upper = np.minimum(lower + 1, len(poses) - 1)
    t = (positions - lower)[:, None]
    angle = np.arccos(np.clip(np.sum(quats[lower] * quats[upper], axis=1), -1.0, 1.0))[:, None]
    sin_angle = np.sin(angle)
    tiny = sin_angle < 1e-9  # (nearly) equal rotations: slerp's limit is the lerp
    safe_sin = np.where(tiny, 1.0, sin_angle)
    weight_lower = np.where(tiny, 1 - t, np.sin((1 - t) * angle) / safe_sin)
    weight_upper = np.where(tiny, t, np.sin(t * angle) / safe_sin)
    quats_t = weight_lower * quats[lower] + weight_upper * quats[upper]

    out = np.zeros((len(positions), 4, 4))
    out[:, :3, :3] = quaternion_to_rotation(quats_t / np.linalg.norm(quats_t, axis=1, keepdims=True))
    out[:, :3, 3] = (1 - t) * poses[lower, :3, 3] + t * poses[upper, :3, 3]
    out[:, 3, 3] = 1.0
    return out


def rigid_inverse(poses: np.ndarray) -> np.ndarray:
    out = np.zeros_like(poses)
    rotations_t = poses[:, :3, :3].transpose(0, 2, 1)
    out[:, :3, :3] = rotations_t
    out[:, :3, 3] = -(rotations_t @ poses[:, :3, 3:])[..., 0]
    out[:, 3, 3] = 1.0
    return out


def frame_to_frame(poses: np.ndarray) -> np.ndarray:
    """Motion of each frame in its predecessor's camera: [I, P_0^-1 P_1, ..., P_{n-2}^-1 P_{n-1}].

    Upstream first makes the poses relative to frame 0; that factor cancels in P_i^-1 P_{i+1}.
    Translations are then divided by their largest norm (when the camera moves at all).
    """
    out = np.empty_like(poses)
    out[0] = np.eye(4)
    out[1:] = rigid_inverse(poses[:-1]) @ poses[1:]
    largest = np.linalg.norm(out[:, :3, 3], axis=1).max()
    if largest > 0:
        out[:, :3, 3] /= largest
    return out


# ------------------------------------------------------------------------------------------- tensors


def fold_pixels(features: torch.Tensor) -> torch.Tensor:
    """[F, H, W, C] per-pixel features -> [C*64, F, H/8, W/8].

    Channel = c*64 + 8*row + col within the 8x8 block: einops "f (h c1) (w c2) c -> (c c1 c2) f h w", the
    order of LingBot-World and TeleFuser, which patch_embedding_wancamctrl's 384 (or 448) inputs expect.
    """
    frames, height, width, channels = features.shape
    s = SPATIAL_STRIDE
    blocks = features.reshape(frames, height // s, s, width // s, s, channels)
    return blocks.permute(5, 2, 4, 0, 1, 3).reshape(channels * s * s, frames, height // s, width // s)


def ray_directions(rotations: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """World-space unit rays [F, H, W, 3] through the pixel centres: normalize(K^-1 (u+.5, v+.5, 1)) R^T."""
    fx, fy, cx, cy = intrinsics
    x = (np.arange(width) + 0.5 - cx) / fx
    y = (np.arange(height) + 0.5 - cy) / fy
    camera = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 1.0), axis=-1)  # [H, W, 3]
    camera /= np.linalg.norm(camera, axis=-1, keepdims=True)
    # d = camera @ R^T for every frame, as one [H*W, 3] x [3, F*3] product (a batched 3x3 matmul is slow).
    return np.moveaxis(np.tensordot(camera, rotations, axes=([2], [2])), 2, 0)


@dataclass(frozen=True)
class ControlTrajectory:
    """The control of every latent frame; `tensor(start, stop)` builds any range of it (e.g. one chunk)."""

    poses: np.ndarray  # [L, 4, 4] frame-to-frame camera motion, translations normalised
    intrinsics: np.ndarray  # (fx, fy, cx, cy) at the output size
    height: int
    width: int
    actions: np.ndarray | None = None  # [L, 4] (w, a, s, d) in action mode

    @property
    def latent_frames(self) -> int:
        return len(self.poses)

    def tensor(
        self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Latent frames [start, stop) as [C, F, H/8, W/8].

        Camera mode: C = 6*64, Plücker (o, d). Action mode: C = 7*64, (d, action).
        """
        poses = self.poses[start:stop]
        directions = ray_directions(poses[:, :3, :3], self.intrinsics, self.height, self.width)
        if self.actions is None:  # camera mode: [o, d], o = the frame's translation at every pixel
            features = [np.broadcast_to(poses[:, None, None, :3, 3], directions.shape), directions]
        else:  # action mode: [d, a], a = the frame's key states at every pixel
            keys = self.actions[start:stop, None, None, :]
            features = [directions, np.broadcast_to(keys, (*directions.shape[:3], len(ACTION_KEYS)))]
        # Cast before folding: the fold's strided copy then moves the (smaller) output dtype.
        return fold_pixels(torch.from_numpy(np.concatenate(features, axis=-1)).to(dtype)).contiguous()


def control_trajectory(
    poses: np.ndarray,
    intrinsics: np.ndarray,
    *,
    frame_num: int,
    chunk_size: int,
    height: int,
    width: int,
    intrinsics_size: tuple[int, int] = DEFAULT_INTRINSICS_SIZE,
    actions: np.ndarray | None = None,
) -> ControlTrajectory:
    """Per-latent-frame control of a `frame_num`-frame job rendered at `height` x `width`.

    As LingBot-World's generate: the poses of the first ((frame_num-1)//4)*4+1 video frames are resampled at
    `latent_frame_count` evenly spaced positions: every 4th frame, unless flooring to whole chunks dropped
    latent frames, which spreads the rest over the same span (TeleFuser truncates to the rendered frames
    instead). Actions are taken at the nearest video frame (upstream's every 4th frame when none dropped).
    Intrinsics row 0 is scaled from its calibration size (width, height) to the output size.
    """
    poses = check_poses(poses)
    intrinsics = check_intrinsics(intrinsics)[0]
    if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE or min(height, width) <= 0:
        raise ValueError(
            f"height and width must be positive multiples of {SPATIAL_STRIDE}, got {height}x{width}"
        )
    calib_width, calib_height = intrinsics_size
    if min(calib_width, calib_height) <= 0:
        raise ValueError(f"intrinsics_size must be a positive [width, height], got {list(intrinsics_size)}")
    latent_frames = latent_frame_count(frame_num, chunk_size)
    used_frames = video_frame_count((frame_num - 1) // TEMPORAL_STRIDE + 1)
    if len(poses) < used_frames:
        raise ValueError(f"poses: {len(poses)} poses, but frame_num {frame_num} needs {used_frames}")
    positions = np.linspace(0, used_frames - 1, latent_frames)

    if actions is not None:
        actions = check_actions(actions)
        if len(actions) < used_frames:
            raise ValueError(f"actions: {len(actions)} rows, but frame_num {frame_num} needs {used_frames}")
        actions = actions[np.rint(positions).astype(int)]
    scale = np.array([width / calib_width, height / calib_height] * 2)
    return ControlTrajectory(
        poses=frame_to_frame(interpolate_poses(poses[:used_frames], positions)),
        intrinsics=intrinsics * scale,
        height=height,
        width=width,
        actions=actions,
    )

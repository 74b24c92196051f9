"""Streaming MP4 writer: frames and size read back, atomic rename, clean failure, size checks."""

from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import pytest

from worldgen.video import VideoWriter

HEIGHT, WIDTH = 48, 64


def smooth_frames(count: int, start: int = 0) -> np.ndarray:
    """Frames of smooth gradients that move with the frame index: H.264 keeps them close to the input."""
    t = np.arange(start, start + count)[:, None, None]
    y = np.arange(HEIGHT)[None, :, None]
    x = np.arange(WIDTH)[None, None, :]
    channels = [
        (2 * x + 3 * t) % 256,
        (3 * y + 5 * t) % 256,
        np.broadcast_to((x + y) * 2, (count, HEIGHT, WIDTH)),
    ]
    return np.stack(np.broadcast_arrays(*channels), axis=-1).astype(np.uint8)


def read_back(path) -> tuple[dict, np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])
    return meta, frames


def test_chunks_stream_into_one_mp4_with_every_frame(tmp_path):
    path = tmp_path / "video.mp4"
    chunks = [smooth_frames(1), smooth_frames(4, 1), smooth_frames(4, 5)]  # 4 * (3 - 1) + 1 frames
    with VideoWriter(path, height=HEIGHT, width=WIDTH, fps=16, crf=10, expected_frames=9) as writer:
        for frames in chunks:
            writer.write(frames)
        assert not path.exists() and len(list(tmp_path.iterdir())) == 1  # a temp file while writing
    assert writer.frames_written == 9
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]

    meta, frames = read_back(path)
    assert meta["size"] == (WIDTH, HEIGHT)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 16
    assert frames.shape == (9, HEIGHT, WIDTH, 3)
    expected = np.concatenate(chunks).astype(np.float64)
    assert np.abs(frames.astype(np.float64) - expected).mean() < 6.0  # lossy, but the same pictures
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 9


def test_a_torch_cpu_tensor_is_accepted_and_close_may_come_early(tmp_path):
    torch = pytest.importorskip("torch")
    with VideoWriter(tmp_path / "video.mp4", height=HEIGHT, width=WIDTH, fps=8) as writer:
        writer.write(torch.from_numpy(smooth_frames(3)))
        assert writer.close() == tmp_path / "video.mp4"  # leaving the block then has nothing left to do
    assert read_back(tmp_path / "video.mp4")[1].shape[0] == 3


def test_failure_mid_video_leaves_no_file(tmp_path):
    with (
        pytest.raises(RuntimeError, match="model failed"),
        VideoWriter(tmp_path / "video.mp4", height=HEIGHT, width=WIDTH, fps=16) as writer,
    ):
        writer.write(smooth_frames(4))
        raise RuntimeError("model failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames, problem",
    [
        (np.zeros((2, HEIGHT, WIDTH, 3), np.float32), "float32"),
        (np.zeros((2, HEIGHT, WIDTH + 2, 3), np.uint8), "(2, 48, 66, 3)"),
        (np.zeros((HEIGHT, WIDTH, 3), np.uint8), "(48, 64, 3)"),
    ],
)
def test_bad_frames_are_rejected_and_nothing_is_left(tmp_path, frames, problem):
    with (
        pytest.raises(ValueError, match=r"video\.mp4: frames must be uint8") as info,
        VideoWriter(tmp_path / "video.mp4", height=HEIGHT, width=WIDTH, fps=16) as writer,
    ):
        writer.write(smooth_frames(2))
        writer.write(frames)
    assert problem in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_ffmpeg_failure_is_reported_with_its_message(tmp_path):
    with (
        pytest.raises(RuntimeError, match="ffmpeg") as info,
        VideoWriter(
            tmp_path / "video.mp4", height=HEIGHT, width=WIDTH, fps=16, preset="no-such-preset"
        ) as writer,
    ):
        writer.write(smooth_frames(2))
    assert "no-such-preset" in str(info.value)  # ffmpeg's own words
    assert list(tmp_path.iterdir()) == []


def test_wrong_frame_count_fails_at_close(tmp_path):
    writer = VideoWriter(tmp_path / "video.mp4", height=HEIGHT, width=WIDTH, fps=16, expected_frames=5)
    writer.open()
    writer.write(smooth_frames(4))
    with pytest.raises(RuntimeError, match="wrote 4 frames, expected 5"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_no_frames_is_an_error(tmp_path):
    with (
        pytest.raises(ValueError, match="no frames"),
        VideoWriter(tmp_path / "video.mp4", height=HEIGHT, width=WIDTH, fps=16),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("height, width", [(47, 64), (48, 63), (0, 64)])
def test_odd_or_empty_sizes_are_rejected(tmp_path, height, width):
    with pytest.raises(
        ValueError, match=f"even, positive height and width; got height={height}, width={width}"
    ):
        VideoWriter(tmp_path / "video.mp4", height=height, width=width, fps=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option, value, message", [("fps", 0, "fps must be > 0"), ("crf", 52, "crf must lie")]
)
def test_bad_encoder_settings_are_rejected(tmp_path, option, value, message):
    settings = {"height": HEIGHT, "width": WIDTH, "fps": 16, option: value}
    with pytest.raises(ValueError, match=message):
        VideoWriter(tmp_path / "video.mp4", **settings)

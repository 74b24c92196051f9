"""Streaming MP4 writer: H.264 yuv420p through the ffmpeg that imageio-ffmpeg bundles.

Chunks of uint8 RGB frames are piped to one ffmpeg process as they come, so a long video never sits in
memory. ffmpeg writes a temp file beside the target, which is renamed into place only after ffmpeg
exited cleanly and the frame count checked out; on any failure the temp file is removed.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import imageio_ffmpeg
import numpy as np

from worldgen.files import publish, temp_beside

DEFAULT_CRF = 18  # visually near-lossless for x264; 0 is lossless, 51 the worst
DEFAULT_PRESET = "medium"
_STDERR_TAIL = 2000


class VideoWriter:
    """Writes frames [T, H, W, 3] uint8, chunk by chunk, into `path` (an MP4), atomically.

    Use as a context manager: leaving the block normally finishes the file (`close`), leaving it with an
    exception removes everything written (`abort`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        height: int,
        width: int,
        fps: float,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        expected_frames: int | None = None,
        probe: bool = True,
    ) -> None:
        self.path = Path(path)
        if height <= 0 or width <= 0 or height % 2 or width % 2:
            # yuv420p stores chroma at half resolution, so libx264 refuses odd sizes.
            raise ValueError(
                f"{self.path}: H.264 yuv420p needs an even, positive height and width; "
                f"got height={height}, width={width}"
            )
        if not fps > 0:
            raise ValueError(f"{self.path}: fps must be > 0, got {fps!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"{self.path}: crf must lie in [0, 51], got {crf!r}")
        self.height, self.width, self.fps = height, width, fps
        self.crf, self.preset = crf, preset
        self.expected_frames = expected_frames
        self.probe = probe
        self.frames_written = 0
        self._tmp_path: Path | None = None
        self._finished = False  # ffmpeg done and the file checked, still under its temp name
        self._stderr: Any = None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VideoWriter:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._process is not None:  # not closed inside the block already
            self.close()

    def open(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"{self.path}: the writer is already open")
        self._tmp_path = temp_beside(self.path)  # ffmpeg is told the format: the name needs no .mp4
        # A file, not a pipe: a full stderr pipe would stall ffmpeg. It lives as long as the writer.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel", "error",
            "-f", "rawvideo",
            "-pix_fmt", "rgb24",
            "-s", f"{self.width}x{self.height}",
            "-r", str(self.fps),
            "-i", "pipe:0",
            "-an",
            "-c:v", "libx264",
            "-preset", self.preset,
            "-crf", str(self.crf),
            "-pix_fmt", "yuv420p",
            "-movflags", "+faststart",  # index up front, so players can start before the download ends
            "-f", "mp4",
            str(self._tmp_path),
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
            )
        except BaseException:
            self.abort()
            raise

    def write(self, frames: Any) -> None:
        """Append frames [T, H, W, 3] uint8 (a NumPy array or a CPU tensor)."""
        if self._process is None or self._process.stdin is None:
            raise RuntimeError(f"{self.path}: write() on a writer that is not open")
        frames = np.ascontiguousarray(frames)
        expected = ("T", self.height, self.width, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != expected[1:]:
            raise ValueError(
                f"{self.path}: frames must be uint8 of shape {expected}, got {frames.dtype} {frames.shape}"
            )
        try:
            self._process.stdin.write(frames.data)
        except OSError as err:  # ffmpeg died: its message says why, once it has exited
            with suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
            message = self._ffmpeg_error()
            raise RuntimeError(f"{self.path}: ffmpeg stopped reading frames: {message}") from err
        self.frames_written += len(frames)

    def close(self) -> Path:
        """Finish the file, check the frame count and move it into place; returns the final path."""
        self.finish()
        return self.publish()

    def finish(self) -> None:
        """Finish the file under its temp name: ffmpeg done, the frame count checked. Nothing is at `path`
        yet: `publish()` moves it there (a render replaces its other files at the same moment)."""
        if self._process is None:
            raise RuntimeError(f"{self.path}: finish() on a writer that is not open")
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._finished = True

    def publish(self) -> Path:
        """Move the finished file into place; returns the final path."""
        if not self._finished:
            raise RuntimeError(f"{self.path}: publish() before finish()")
        try:
            publish(self._tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._release()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and remove the temp file; never leaves a file at `path`."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            with suppress(OSError):  # flushing into a dead pipe
                self._process.stdin.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        self._release()

    def _finish(self) -> None:
        assert self._process is not None and self._process.stdin is not None and self._tmp_path is not None
        if self.frames_written == 0:
            raise ValueError(f"{self.path}: no frames were written")
        with suppress(BrokenPipeError):  # ffmpeg already gone: its exit status and message tell why
            self._process.stdin.close()
        if self._process.wait() != 0:
            raise RuntimeError(
                f"{self.path}: ffmpeg failed (exit {self._process.returncode}): {self._ffmpeg_error()}"
            )
        if self.expected_frames is not None and self.frames_written != self.expected_frames:
            raise RuntimeError(
                f"{self.path}: wrote {self.frames_written} frames, expected {self.expected_frames}"
            )
        if self.probe:
            frames_in_file, _ = imageio_ffmpeg.count_frames_and_secs(str(self._tmp_path))
            if frames_in_file != self.frames_written:
                raise RuntimeError(
                    f"{self.path}: the encoded file holds {frames_in_file} frames, "
                    f"but {self.frames_written} were written"
                )

    def _ffmpeg_error(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-_STDERR_TAIL:].strip() or "(no message)"

    def _release(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
        self._process = self._stderr = self._tmp_path = None
        self._finished = False

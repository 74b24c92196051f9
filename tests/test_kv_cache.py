"""The rolling KV cache: window validation, pass rules, and which frames it holds as the window rolls."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import rollout_velocities, tiny_inputs, tiny_model

from worldgen.models.attention import visibility_mask
from worldgen.models.kv_cache import KVCache, check_window

FRAME_TOKENS = 2
FINAL_TAG = 0.75  # the tag of a chunk's last pass (the cache update)


def _cache(chunk: int, window: int, sink: int, num_frames: int = 12) -> KVCache:
    return KVCache(
        num_layers=2,
        batch_size=1,
        frame_tokens=FRAME_TOKENS,
        num_heads=1,
        head_dim=1,
        chunk_size=chunk,
        local_attn_size=window,
        sink_size=sink,
        num_frames=num_frames,
        dtype=torch.float64,
    )


def _tagged(first: int, frames: int, tag: float) -> torch.Tensor:
    """K for frames [first, first+frames): every token holds its frame index plus a pass tag."""
    frame_ids = torch.arange(first, first + frames, dtype=torch.float64).repeat_interleave(FRAME_TOKENS)
    return (frame_ids + tag).view(1, -1, 1, 1)


def _roll(cache: KVCache, chunk: int, num_frames: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Chunks through the cache as the generator runs them; per chunk, (its end frame, the K and V its last
    pass saw in the last layer)."""
    for first in range(0, num_frames, chunk):
        # 4 denoising passes, then the cache update: only the first pass may evict.
        for tag in (0.0, 0.25, 0.5, 0.6, FINAL_TAG):
            cache.begin_pass(first, chunk)
            for layer in range(2):
                keys, values = cache.update(layer, _tagged(first, chunk, tag), -_tagged(first, chunk, tag))
        yield first + chunk, keys, values


def _expected_frames(chunk_end: int, window: int, sink: int) -> set[int]:
    if window == -1:
        return set(range(chunk_end))
    return {f for f in range(chunk_end) if f < sink or f >= chunk_end - (window - sink)}


@pytest.mark.parametrize(
    ("chunk", "window", "sink"),
    [(3, -1, 0), (2, 4, 0), (3, 6, 3), (3, 7, 1), (1, 3, 2), (2, 5, 0), (3, 11, 3), (3, 12, 3), (2, 40, 5)],
)
def test_cache_holds_exactly_the_visible_frames(chunk: int, window: int, sink: int) -> None:
    num_frames = 12
    cache = _cache(chunk, window, sink, num_frames)
    storage = (cache.keys.data_ptr(), cache.keys.shape)
    for chunk_end, keys, values in _roll(cache, chunk, num_frames):
        held = keys.flatten()
        assert torch.equal(values.flatten(), -held)
        expected = _expected_frames(chunk_end, window, sink)
        assert {int(k) for k in held.floor()} == expected
        assert len(held) == len(expected) * FRAME_TOKENS
        # Every held frame carries the tag of its chunk's last pass (later passes overwrote the slots).
        assert torch.allclose(held - held.floor(), torch.full_like(held, FINAL_TAG))
        assert cache.visible_frames == len(expected)
    assert (cache.keys.data_ptr(), cache.keys.shape) == storage  # memory is flat over the whole video
    assert isinstance(cache.end_frame, int) and isinstance(cache.chunk_start, int)


def test_capacity_follows_window_or_video_length() -> None:
    assert _cache(3, 6, 3).capacity_tokens == 6 * FRAME_TOKENS
    assert _cache(3, -1, 0, num_frames=9).capacity_tokens == 9 * FRAME_TOKENS
    assert _cache(3, 21, 3, num_frames=30).keys.shape == (2, 1, 21 * FRAME_TOKENS, 1, 1)
    assert _cache(3, 11, 3, num_frames=12).capacity_tokens == 11 * FRAME_TOKENS
    # A window as long as the video, or longer, takes the video's frames only.
    assert _cache(3, 21, 3, num_frames=12).keys.shape == (2, 1, 12 * FRAME_TOKENS, 1, 1)
    assert _cache(3, 2**31 - 1, 3, num_frames=12).capacity_tokens == 12 * FRAME_TOKENS


@pytest.mark.parametrize(("chunk", "window", "sink"), [(3, 12, 3), (3, 13, 0), (2, 2**31 - 1, 5)])
def test_window_covering_the_video_sees_what_the_whole_video_sees(chunk: int, window: int, sink: int) -> None:
    num_frames = 12
    mask = visibility_mask(num_frames, FRAME_TOKENS, chunk, window, sink)
    assert torch.equal(mask, visibility_mask(num_frames, FRAME_TOKENS, chunk, -1, 0))
    covering, whole = _cache(chunk, window, sink, num_frames), _cache(chunk, -1, 0, num_frames)
    assert covering.capacity_tokens == whole.capacity_tokens
    rolls = zip(_roll(covering, chunk, num_frames), _roll(whole, chunk, num_frames), strict=True)
    for (_, keys, values), (_, whole_keys, whole_values) in rolls:
        assert torch.equal(keys, whole_keys) and torch.equal(values, whole_values)  # same slots in order
    with pytest.raises(ValueError, match="sized for 12 latent frames"):
        covering.begin_pass(num_frames, chunk)  # the video has no more frames, whatever the window says


@torch.no_grad()
def test_dit_output_with_a_window_covering_the_video_is_the_whole_video_output() -> None:
    model = tiny_model(torch.float64)
    inputs = tiny_inputs(model.config, 6, torch.float64)
    covering = rollout_velocities(model, inputs, 3, 2**31 - 1, 1)
    whole = rollout_velocities(model, inputs, 3, -1, 0)
    assert all(torch.equal(a, b) for a, b in zip(covering, whole, strict=True))


@pytest.mark.parametrize(
    ("chunk", "window", "sink", "message"),
    [
        (3, 5, 3, r"local_attn_size \(5\) must be >= sink_size \+ chunk_size \(3 \+ 3 = 6\)"),
        (3, 2, 0, r"local_attn_size \(2\) must be >= sink_size \+ chunk_size"),
        (3, 6, -1, "sink_size must be >= 0"),
        (0, 6, 0, "chunk_size must be >= 1"),
        (3, -2, 0, "local_attn_size must be -1"),
        (3, 0, 0, "local_attn_size must be -1"),
    ],
)
def test_invalid_window_is_rejected(chunk: int, window: int, sink: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_window(chunk, window, sink)
    with pytest.raises(ValueError, match=message):
        _cache(chunk, window, sink)


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="frame_tokens must be >= 1"):
        KVCache(
            num_layers=1, batch_size=1, frame_tokens=0, num_heads=1, head_dim=1, chunk_size=1,
            local_attn_size=-1, sink_size=0, num_frames=3, dtype=torch.float32,
        )  # fmt: skip


def test_pass_rules() -> None:
    cache = _cache(3, 6, 3)
    with pytest.raises(ValueError, match="must start a new chunk at frame 0"):
        cache.begin_pass(3, 3)  # skips frames 0..2
    cache.begin_pass(0, 3)
    cache.begin_pass(0, 3)  # a later pass of the same chunk
    cache.begin_pass(3, 3)
    with pytest.raises(ValueError, match=r"repeat the latest chunk, got frames \[0, 3\)"):
        cache.begin_pass(0, 3)  # an older chunk is gone
    with pytest.raises(ValueError, match=r"a pass must cover 1\.\.3 latent frames, got 4"):
        cache.begin_pass(6, 4)  # would not fit beside the sink
    whole = _cache(3, -1, 0, num_frames=6)
    whole.begin_pass(0, 3)
    whole.begin_pass(3, 3)
    with pytest.raises(ValueError, match="sized for 6 latent frames"):
        whole.begin_pass(6, 3)
    whole.reset()
    whole.begin_pass(0, 3)
    assert whole.visible_frames == 3

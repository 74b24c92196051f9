"""Rolling self-attention KV cache for chunked causal generation: attention sink + sliding window.

Every DiT layer owns K and V tensors of shape [batch, capacity_tokens, heads, head_dim], allocated once
(gpt-fast style), so memory stays flat however long the video is. `local_attn_size` and `sink_size`
count latent frames; the window includes the chunk being generated. The cache always holds exactly the
frames the current chunk may see (the "visible set" of the reference):

    sink frames {0 .. sink-1}  UNION  the (local_attn_size - sink) latest frames, up to the chunk's end

so attention reads the filled part of the cache without a mask. The window part is a ring buffer at
frame granularity: a new chunk overwrites the slots of the oldest non-sink frames instead of shifting the
cache left, which saves a full cache copy per layer per chunk. Keys are stored after RoPE with their
absolute frame positions, so slot order does not matter (softmax over keys is order-free).

Per chunk the generator runs 4 denoising passes and one cache-update pass over the same frames. The first
pass of a chunk (its first frame == the end of what is cached) claims the chunk's slots, evicting the
oldest frames; the later passes overwrite the same slots. All cursors are host integers: nothing here
reads a device tensor, so a forward pass never synchronises with the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def to_e4m3(x: Tensor) -> Tensor:
    """x in e4m3, magnitudes beyond 448 saturated: CUDA's cast would turn them into NaN (e4m3fn has no
    infinity; the CPU's cast saturates)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def check_window(chunk_size: int, local_attn_size: int, sink_size: int) -> None:
    """Raise ValueError unless (chunk_size, local_attn_size, sink_size) is a valid attention window."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 latent frame, got {chunk_size}")
    if sink_size < 0:
        raise ValueError(f"sink_size must be >= 0 latent frames, got {sink_size}")
    if local_attn_size == -1:
        return
    if local_attn_size < 1:
        raise ValueError(
            f"local_attn_size must be -1 (whole video) or >= 1 latent frames, got {local_attn_size}"
        )
    if local_attn_size < sink_size + chunk_size:
        raise ValueError(
            f"local_attn_size ({local_attn_size}) must be >= sink_size + chunk_size "
            f"({sink_size} + {chunk_size} = {sink_size + chunk_size}): the window holds the sink frames "
            "and the whole current chunk"
        )


class KVCache:
    """Preallocated rolling K/V for all layers of one DiT, with host-integer cursors.

    `keys[layer]` / `values[layer]`: [batch, capacity_tokens, heads, head_dim]. Use `begin_pass` once per
    forward (the model does it), then per layer either `update`, or writes into the views of `runs`
    followed by `visible`.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        frame_tokens: int,
        num_heads: int,
        head_dim: int,
        chunk_size: int,
        local_attn_size: int,
        sink_size: int,
        num_frames: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        check_window(chunk_size, local_attn_size, sink_size)
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("frame_tokens", frame_tokens),
            ("num_frames", num_frames),
        ):
            if value < 1:
                raise ValueError(f"KV cache: {name} must be >= 1, got {value}")
        self.batch_size = batch_size
        self.frame_tokens = frame_tokens
        self.sink_size = sink_size
        # A window at least as long as the video never drops a frame: it sees what -1 sees, so it is cached
        # like -1, in the video's frames (allocating the window's frames would waste memory, or fail).
        self.whole_video = local_attn_size == -1 or local_attn_size >= num_frames
        # With a window shorter than the video, the cache holds `local_attn_size` frames however long the
        # video is; otherwise every frame of the video.
        self.capacity_frames = num_frames if self.whole_video else local_attn_size
        self.capacity_tokens = self.capacity_frames * frame_tokens
        # Frames of one pass must fit in the ring beside the sink (or in the whole-video cache).
        self.max_pass_frames = self.capacity_frames if self.whole_video else local_attn_size - sink_size
        shape = (num_layers, batch_size, self.capacity_tokens, num_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.reset()

    def reset(self) -> None:
        """Forget every cached frame (the memory is reused as is; stale slots are never read)."""
        self.end_frame = 0  # frames [0, end_frame) have been written
        self.chunk_start = 0  # first frame of the latest chunk
        self._writes: list[tuple[int, int, int]] = []  # (first token in the pass, first slot token, tokens)

    @property
    def visible_frames(self) -> int:
        """Latent frames the latest chunk attends to (its own frames included)."""
        return min(self.end_frame, self.capacity_frames)

    def _slot(self, frame: int) -> int:
        if self.whole_video or frame < self.sink_size:
            return frame
        return self.sink_size + (frame - self.sink_size) % (self.capacity_frames - self.sink_size)

    def begin_pass(self, first_frame: int, num_frames: int) -> None:
        """Plan the writes of a pass over latent frames [first_frame, first_frame + num_frames).

        A pass that starts where the cache ends opens a new chunk (evicting the oldest window frames);
        a pass over exactly the latest chunk overwrites that chunk's slots. Anything else is an error.
        """
        end = first_frame + num_frames
        if num_frames < 1 or num_frames > self.max_pass_frames:
            raise ValueError(
                f"KV cache: a pass must cover 1..{self.max_pass_frames} latent frames, got {num_frames}"
            )
        if first_frame == self.end_frame:
            if self.whole_video and end > self.capacity_frames:
                raise ValueError(
                    f"KV cache sized for {self.capacity_frames} latent frames (the whole video) cannot "
                    f"take frames [{first_frame}, {end})"
                )
            self.chunk_start, self.end_frame = first_frame, end
            self._writes = self._plan_writes(first_frame, num_frames)
        elif first_frame != self.chunk_start or end != self.end_frame:
            raise ValueError(
                f"KV cache holds frames up to {self.end_frame} with latest chunk [{self.chunk_start}, "
                f"{self.end_frame}); a pass must start a new chunk at frame {self.end_frame} or repeat the "
                f"latest chunk, got frames [{first_frame}, {end})"
            )

    def _plan_writes(self, first_frame: int, num_frames: int) -> list[tuple[int, int, int]]:
        """Contiguous runs of slots for the pass's frames (at most a few: sink boundary, ring wrap)."""
        runs: list[list[int]] = []  # [first frame in the pass, first slot, frames]
        for offset in range(num_frames):
            slot = self._slot(first_frame + offset)
            if runs and runs[-1][1] + runs[-1][2] == slot:
                runs[-1][2] += 1
            else:
                runs.append([offset, slot, 1])
        tokens = self.frame_tokens
        return [(src * tokens, dst * tokens, count * tokens) for src, dst, count in runs]

    def runs(self, layer: int) -> list[tuple[slice, Tensor, Tensor]]:
        """Where this pass's tokens go in `layer`: per contiguous run, (its slice of the pass's tokens, the
        K slots and V slots [batch, tokens, heads, head_dim] it fills), views to write into."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        return [
            (slice(src, src + count), layer_keys[:, dst : dst + count], layer_values[:, dst : dst + count])
            for src, dst, count in self._writes
        ]

    def visible(self, layer: int) -> tuple[Tensor, Tensor]:
        """The K and V the latest pass attends to in `layer`: views of the filled part, its own included."""
        tokens = self.visible_frames * self.frame_tokens
        return self.keys[layer][:, :tokens], self.values[layer][:, :tokens]

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store this pass's K (after RoPE) and V [batch, tokens, heads, head_dim] for `layer`, cast to
        the cache's dtype (an e4m3 cache saturates magnitudes beyond 448); returns `visible(layer)`."""
        if self.keys.dtype == E4M3:  # saturate what is wider: the slice copies' cast alone would not on CUDA
            key, value = (t if t.dtype == E4M3 else to_e4m3(t) for t in (key, value))
        for tokens, key_slots, value_slots in self.runs(layer):
            key_slots.copy_(key[:, tokens])
            value_slots.copy_(value[:, tokens])
        return self.visible(layer)

"""The umT5 text encoder in Wan's checkpoint layout, its tokenizer, and a prompt-embedding cache on disk.

The module names follow `models_t5_umt5-xxl-enc-bf16.pth` exactly (`token_embedding`, `blocks.N.attn.q`,
`blocks.N.ffn.gate.0`, `blocks.N.pos_embedding.embedding`, `norm`), so its state dict loads without renaming.
T5 specifics: RMSNorm without mean subtraction, no 1/sqrt(d) attention scaling, a learned relative-position
bias per layer (bidirectional log buckets), and a gated tanh-GELU feed-forward without biases.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from worldgen.checkpoints import CheckpointError
from worldgen.config import TextConfig
from worldgen.files import atomic_output

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# T5's relative positions beyond this distance share the last (log-spaced) bucket.
MAX_RELATIVE_DISTANCE = 128
PAD_TOKEN = "<pad>"


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square, computed in float32, then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(self.weight)


def relative_position_bucket(relative: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half per direction, exact below half of those, log-spaced up to 128."""
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0); those small distances take the exact branch below anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(
        MAX_RELATIVE_DISTANCE / max_exact
    )
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """[1, heads, length, length] additive attention bias (keys minus queries positions)."""
        positions = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        # T5 folds the 1/sqrt(d) scale into its initialisation, so attention runs unscaled.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class EncoderBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.dim)
        self.attn = Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = RMSNorm(config.dim)
        self.ffn = FeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = (
            None if config.shared_pos else RelativePositionBias(config.num_buckets, config.num_heads)
        )

    def forward(
        self, x: torch.Tensor, key_mask_bias: torch.Tensor, shared_bias: torch.Tensor | None
    ) -> torch.Tensor:
        position_bias = shared_bias if self.pos_embedding is None else self.pos_embedding(x.shape[1])
        x = x + self.attn(self.norm1(x), position_bias.to(x.dtype) + key_mask_bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack; `forward(ids, mask)` returns the last hidden state [B, L, dim], pads not zeroed."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.dim)
        self.pos_embedding = (
            RelativePositionBias(config.num_buckets, config.num_heads) if config.shared_pos else None
        )
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids)
        # Padded keys get the dtype's lowest value (not -inf) so a row stays finite, as upstream.
        key_mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        key_mask_bias.masked_fill_(mask == 0, torch.finfo(x.dtype).min)
        key_mask_bias = key_mask_bias[:, None, None, :]
        shared_bias = None if self.pos_embedding is None else self.pos_embedding(ids.shape[1])
        for block in self.blocks:
            x = block(x, key_mask_bias, shared_bias)
        return self.norm(x)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning minus ftfy (not a dependency): unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class PromptTokenizer:
    """A `tokenizers` tokenizer padded/truncated to `text_len` tokens (umT5: pad 0, </s> appended)."""

    def __init__(self, tokenizer: Tokenizer, text_len: int, source: str = "the tokenizer"):
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise ValueError(f"{source}: the vocabulary has no {PAD_TOKEN!r} token")
        self.tokenizer = tokenizer
        self.text_len = text_len
        # The post-processor appends </s>; truncation leaves room for it, as transformers does.
        tokenizer.enable_truncation(max_length=text_len)
        tokenizer.enable_padding(length=text_len, pad_id=pad_id, pad_token=PAD_TOKEN)

    @classmethod
    def from_file(cls, tokenizer_file: Path, text_len: int) -> PromptTokenizer:
        """From a `tokenizer.json`, e.g. `google/umt5-xxl/tokenizer.json` of the Wan2.2 folder."""
        from tokenizers import Tokenizer  # imported here so the engine imports without it

        if not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the tokenizers library raises a bare Exception for a malformed file
            raise CheckpointError(f"{tokenizer_file}: not a tokenizer.json that loads ({error})") from error
        return cls(tokenizer, text_len, str(tokenizer_file))

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, text_len: int) -> PromptTokenizer:
        """From a tokenizer built in memory (random-weight presets have no tokenizer file)."""
        return cls(tokenizer, text_len)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both int64 [len(prompts), text_len]."""
        encodings = self.tokenizer.encode_batch([clean_prompt(p) for p in prompts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


class TextEncoder:
    """Tokenizer + umT5 encoder: prompts -> [B, text_len, dim] embeddings with padded positions zeroed."""

    def __init__(self, model: UMT5Encoder, tokenizer: PromptTokenizer):
        if tokenizer.vocab_size > model.config.vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder's vocabulary "
                f"holds {model.config.vocab}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_with_lengths(prompts)[0]

    @torch.inference_mode()
    def encode_with_lengths(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Embeddings [B, text_len, dim] and each prompt's number of real (unpadded) tokens."""
        device = self.model.token_embedding.weight.device
        ids, mask = self.tokenizer(prompts)
        hidden = self.model(ids.to(device), mask.to(device))
        # The DiT's cross-attention has no mask: upstream feeds zeros at padded positions instead.
        return hidden.masked_fill(mask[..., None].to(device) == 0, 0.0), mask.sum(dim=1).tolist()


class PromptEmbeddingCache:
    """Prompt embeddings as safetensors files named by a hash of (encoder identity, cleaned prompt).

    `encoder_identity` must change whenever the encoder's weights or tokenizer change (the checkpoint
    loader derives it from the files; random-weight presets use the preset name and seed), so a stale
    embedding is never returned. Only the unpadded tokens are stored; lookups pad back with zeros. An entry
    that does not read as one (torn by a full disk, a foreign file) is a miss, so its prompt is encoded again.
    """

    def __init__(self, root: Path, encoder_identity: str):
        self.root = Path(root)
        self.encoder_identity = encoder_identity

    def path_for(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.encoder_identity}\0{clean_prompt(prompt)}".encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def lookup(self, prompt: str) -> torch.Tensor | None:
        """The prompt's [text_len, dim] embedding; None if it is not cached or its entry is unusable."""
        path = self.path_for(prompt)
        if not path.is_file():
            return None
        try:
            tokens, text_len = _read_entry(path)
        except (OSError, SafetensorError, ValueError) as error:
            warnings.warn(
                f"prompt cache entry {path} is unusable, encoding its prompt again: {error}", stacklevel=2
            )
            return None
        return torch.cat([tokens, tokens.new_zeros(text_len - tokens.shape[0], tokens.shape[1])])

    def store(self, prompt: str, embedding: torch.Tensor, num_tokens: int) -> None:
        tensors = {
            "embedding": embedding[:num_tokens].contiguous().cpu(),
            "text_len": torch.tensor(embedding.shape[0]),
        }
        # Temp file + rename: concurrent workers and interrupted runs never leave a torn file behind.
        with atomic_output(self.path_for(prompt)) as temp:
            save_file(tensors, temp, metadata={"encoder": self.encoder_identity})


def _read_entry(path: Path) -> tuple[torch.Tensor, int]:
    """A cache entry's unpadded tokens [num_tokens, dim] and its text_len, as `store` writes them."""
    stored = load_file(path)
    if stored.keys() != {"embedding", "text_len"}:
        raise ValueError(f"holds tensors {sorted(stored)}, expected ['embedding', 'text_len']")
    tokens, text_len = stored["embedding"], stored["text_len"]
    if tokens.ndim != 2 or not tokens.is_floating_point():
        raise ValueError(f"embedding is {tokens.dtype} {list(tokens.shape)}, expected a 2-D float tensor")
    if text_len.shape != () or text_len.dtype != torch.int64 or text_len < tokens.shape[0]:
        raise ValueError(
            f"text_len is {text_len.dtype} {text_len.tolist()}, expected an int64 >= {tokens.shape[0]}"
        )
    return tokens, int(text_len)


def embed_prompts(
    prompts: Sequence[str],
    load_encoder: Callable[[], TextEncoder],
    cache: PromptEmbeddingCache | None = None,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """One [text_len, dim] embedding per prompt; each distinct prompt is encoded at most once.

    The encoder is loaded only if some prompt misses the cache, and it is dropped before returning, so the
    large umT5 model is not resident while the DiT renders.
    """
    distinct = list(dict.fromkeys(clean_prompt(p) for p in prompts))
    embeddings = {p: cache.lookup(p) for p in distinct} if cache is not None else dict.fromkeys(distinct)
    missing = [p for p, e in embeddings.items() if e is None]
    if missing:
        encoder = _load_for_misses(load_encoder, missing, cache)
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            encoded, num_tokens = encoder.encode_with_lengths(batch)
            for prompt, embedding, count in zip(batch, encoded.cpu(), num_tokens, strict=True):
                embeddings[prompt] = embedding
                if cache is not None:
                    cache.store(prompt, embedding, count)
        del encoder
    return [embeddings[clean_prompt(p)] for p in prompts]


def _load_for_misses(
    load_encoder: Callable[[], TextEncoder], missing: list[str], cache: PromptEmbeddingCache | None
) -> TextEncoder:
    """`load_encoder()`; if that fails, the error also names the cache entries that were missing or unusable:
    a run that expected every prompt cached (the benchmark stores its embeddings up front) sees which."""
    try:
        return load_encoder()
    except Exception as error:
        if cache is not None:
            entries = ", ".join(str(cache.path_for(prompt)) for prompt in missing)
            error.add_note(
                f"the text encoder was needed: these prompt cache entries are missing or unusable: {entries}"
            )
        raise

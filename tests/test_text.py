"""The umT5 encoder (layout, peer parity, relative buckets), its tokenizer, and the prompt-embedding cache."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worldgen.checkpoints import (
    TEXT_ENCODER_FILE,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    CheckpointError,
    ModelFiles,
    build_on_meta,
    build_tokenizer,
    load_checkpoint,
    load_text_encoder,
    save_pth,
    text_encoder_identity,
)
from worldgen.config import PRESETS, TextConfig
from worldgen.files import atomic_output
from worldgen.models.text import (
    PromptEmbeddingCache,
    PromptTokenizer,
    TextEncoder,
    UMT5Encoder,
    clean_prompt,
    embed_prompts,
    relative_position_bucket,
)

TINY = PRESETS["tiny"].text


def test_full_size_encoder_on_meta_has_the_wan_checkpoint_layout(shared_dir):
    reference = json.loads((shared_dir / "reference" / "umt5_xxl_wan.keys.json").read_text())
    model = build_on_meta(lambda: UMT5Encoder(TextConfig()))
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == {name: info["shape"] for name, info in reference["tensors"].items()}
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


def test_peer_parity_with_the_independent_umt5_encoder(shared_dir):
    parity = shared_dir / "parity"
    config = json.loads((parity / "t5.json").read_text())["config"]
    config.pop("dropout")
    model = load_checkpoint(
        build_on_meta(lambda: UMT5Encoder(TextConfig(**config))),
        parity / "t5.safetensors",
        "cpu",
        torch.float32,
    )
    io = load_file(parity / "t5_io.safetensors")
    with torch.no_grad():
        out = model(io["ids"], io["mask"])
    torch.testing.assert_close(out, io["out"], rtol=1e-5, atol=1e-5)


def bucket_oracle(relative: int, num_buckets: int, max_distance: int = 128) -> int:
    """T5's bidirectional bucket of one relative position, written out scalar by scalar."""
    half = num_buckets // 2
    bucket = half if relative > 0 else 0
    distance = abs(relative)
    max_exact = half // 2
    if distance < max_exact:
        return bucket + distance
    far = max_exact + int(
        math.log(distance / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    )
    return bucket + min(far, half - 1)


@pytest.mark.parametrize("num_buckets", [32, 8])
def test_relative_position_buckets_match_the_scalar_definition(num_buckets):
    relative = torch.arange(-600, 601)
    expected = torch.tensor([bucket_oracle(int(r), num_buckets) for r in relative])
    assert torch.equal(relative_position_bucket(relative, num_buckets), expected)


def test_shared_position_bias_variant_builds_and_runs():
    config = TextConfig(vocab=50, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=2, shared_pos=True)
    model = UMT5Encoder(config)
    assert "pos_embedding.embedding.weight" in model.state_dict()
    assert not any(".pos_embedding." in name for name in model.state_dict())
    out = model(torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    assert out.shape == (2, 7, 16) and out.isfinite().all()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE
    build_tokenizer(TINY.vocab).save(str(path))
    return path


def test_clean_prompt_unescapes_html_and_collapses_whitespace():
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"


def test_tokenizer_pads_with_zero_and_appends_the_end_token(tokenizer_file):
    tokenizer = PromptTokenizer.from_file(tokenizer_file, text_len=512)
    assert tokenizer.vocab_size <= TINY.vocab
    ids, mask = tokenizer(["the castle", "the   castle  "])
    assert ids.shape == mask.shape == (2, 512)
    assert torch.equal(ids[0], ids[1])  # whitespace-cleaned before tokenizing
    length = int(mask[0].sum())
    assert ids[0, length - 1] == 1  # </s>
    assert (ids[0, length:] == 0).all() and (mask[0, length:] == 0).all() and (mask[0, :length] == 1).all()


def test_tokenizer_built_in_memory_matches_the_one_read_from_its_file(tokenizer_file):
    prompts = ["Stonehenge on a misty day", "a  castle"]
    from_file = PromptTokenizer.from_file(tokenizer_file, text_len=64)(prompts)
    in_memory = PromptTokenizer.from_tokenizer(build_tokenizer(TINY.vocab), text_len=64)(prompts)
    assert all(torch.equal(a, b) for a, b in zip(from_file, in_memory, strict=True))


def test_tokenizer_truncates_to_text_len_keeping_the_end_token(tokenizer_file):
    ids, mask = PromptTokenizer.from_file(tokenizer_file, text_len=16)(["word " * 100])
    assert ids.shape == (1, 16) and mask.all()
    assert ids[0, -1] == 1


def test_tokenizer_file_without_pad_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(path))
    with pytest.raises(ValueError, match=r"no '<pad>' token"):
        PromptTokenizer.from_file(path, text_len=8)
    with pytest.raises(FileNotFoundError, match=r"absent.json"):
        PromptTokenizer.from_file(tmp_path / "absent.json", text_len=8)
    path.write_text('{"version": ')  # torn
    with pytest.raises(CheckpointError, match=rf"{path}: not a tokenizer.json that loads \(EOF"):
        PromptTokenizer.from_file(path, text_len=8)


def write_text_encoder(folder: Path, seed: int) -> tuple[Path, Path]:
    torch.manual_seed(seed)
    checkpoint = folder / TEXT_ENCODER_FILE
    save_pth({name: t.to(torch.bfloat16) for name, t in UMT5Encoder(TINY).state_dict().items()}, checkpoint)
    tokenizer = folder / TOKENIZER_DIR / TOKENIZER_FILE
    with atomic_output(tokenizer) as temp:
        build_tokenizer(TINY.vocab).save(str(temp))
    return checkpoint, tokenizer


def test_encoder_zeroes_padded_positions_and_matches_the_model_elsewhere(tmp_path):
    checkpoint, tokenizer_file = write_text_encoder(tmp_path, seed=0)
    encoder = load_text_encoder(checkpoint, tokenizer_file, TINY, "cpu", torch.float32)
    prompts = ["A castle on a hill.", "misty  forest at dawn with distant birds"]
    embeddings = encoder.encode_prompts(prompts)
    ids, mask = encoder.tokenizer(prompts)
    with torch.no_grad():
        hidden = encoder.model(ids, mask)
    assert embeddings.shape == (2, 512, TINY.dim)
    real = mask.bool()
    assert torch.equal(embeddings[real], hidden[real])
    assert (embeddings[~real] == 0).all()
    # Each prompt's embedding does not depend on the batch it is encoded in.
    torch.testing.assert_close(encoder.encode_prompts(prompts[1:])[0], embeddings[1])


def test_encoder_refuses_a_tokenizer_larger_than_its_vocabulary(tokenizer_file):
    small = TextConfig(vocab=100, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=1)
    with pytest.raises(
        ValueError, match=r"tokenizer has .* tokens but the text encoder's vocabulary holds 100"
    ):
        TextEncoder(UMT5Encoder(small), PromptTokenizer.from_file(tokenizer_file, text_len=512))


class CountingLoader:
    def __init__(self, checkpoint: Path, tokenizer_file: Path):
        self.checkpoint, self.tokenizer_file = checkpoint, tokenizer_file
        self.loads, self.encoded = 0, []

    def __call__(self) -> TextEncoder:
        self.loads += 1
        encoder = load_text_encoder(self.checkpoint, self.tokenizer_file, TINY, "cpu", torch.float32)
        original = encoder.encode_with_lengths

        def counting(prompts):
            self.encoded.extend(prompts)
            return original(prompts)

        encoder.encode_with_lengths = counting
        return encoder


def test_embedding_cache_encodes_each_distinct_prompt_once_and_returns_identical_tensors(tmp_path):
    checkpoint, tokenizer_file = write_text_encoder(tmp_path / "model", seed=0)
    files = ModelFiles(tmp_path, checkpoint, checkpoint, checkpoint, tokenizer_file)
    cache = PromptEmbeddingCache(tmp_path / "cache", text_encoder_identity(files, TINY))
    loader = CountingLoader(checkpoint, tokenizer_file)
    prompts = ["a castle", "a  castle", "a forest", "a castle"]

    first = embed_prompts(prompts, loader, cache)
    assert loader.loads == 1 and loader.encoded == ["a castle", "a forest"]
    assert [e.shape for e in first] == [(512, TINY.dim)] * 4
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[3])

    again = embed_prompts(["a forest", "a castle"], loader, cache)
    assert loader.loads == 1  # every prompt came from the cache: the encoder was never loaded
    assert torch.equal(again[0], first[2]) and torch.equal(again[1], first[0])
    fresh = loader().encode_prompts(["a castle"])[0]
    assert torch.equal(again[1], fresh)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "temporary files are renamed into place"


def test_embedding_cache_is_invalidated_when_the_encoder_changes(tmp_path):
    checkpoint, tokenizer_file = write_text_encoder(tmp_path / "model", seed=0)
    files = ModelFiles(tmp_path, checkpoint, checkpoint, checkpoint, tokenizer_file)
    loader = CountingLoader(checkpoint, tokenizer_file)
    before = embed_prompts(
        ["a castle"], loader, PromptEmbeddingCache(tmp_path / "cache", text_encoder_identity(files, TINY))
    )

    write_text_encoder(tmp_path / "model", seed=1)  # new weights at the same path
    cache = PromptEmbeddingCache(tmp_path / "cache", text_encoder_identity(files, TINY))
    after = embed_prompts(["a castle"], loader, cache)
    assert loader.loads == 2
    assert not torch.equal(before[0], after[0])
    assert torch.equal(after[0], loader().encode_prompts(["a castle"])[0])


def test_embed_prompts_without_a_cache_still_encodes_each_prompt_once(tmp_path):
    loader = CountingLoader(*write_text_encoder(tmp_path, seed=0))
    out = embed_prompts(["b", "a", "b"], loader)
    assert loader.encoded == ["b", "a"]
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])


# What a damaged cache entry holds instead of what `store` wrote; None: the file torn after 50 bytes.
DAMAGED_ENTRIES = {
    "torn": None,
    "renamed tensor": {"tokens": torch.zeros(5, 8), "text_len": torch.tensor(16)},
    "1-D embedding": {"embedding": torch.zeros(40), "text_len": torch.tensor(16)},
    "integer embedding": {"embedding": torch.zeros(5, 8, dtype=torch.long), "text_len": torch.tensor(16)},
    "float text_len": {"embedding": torch.zeros(5, 8), "text_len": torch.tensor(16.0)},
    "text_len below the tokens": {"embedding": torch.zeros(5, 8), "text_len": torch.tensor(4)},
}


def store_damaged(cache: PromptEmbeddingCache, prompt: str, damage: str) -> Path:
    cache.store(prompt, torch.randn(16, 8), num_tokens=5)
    path = cache.path_for(prompt)
    if DAMAGED_ENTRIES[damage] is None:
        path.write_bytes(path.read_bytes()[:50])
    else:
        save_file(DAMAGED_ENTRIES[damage], path)
    return path


@pytest.mark.parametrize("damage", list(DAMAGED_ENTRIES))
def test_an_unusable_cache_entry_is_a_miss_with_a_warning_naming_it(tmp_path, damage):
    cache = PromptEmbeddingCache(tmp_path / "cache", "encoder")
    path = store_damaged(cache, "a castle", damage)
    with pytest.warns(UserWarning, match=re.escape(f"prompt cache entry {path} is unusable, encoding")):
        assert cache.lookup("a castle") is None


def test_an_unusable_cache_entry_is_encoded_again_and_rewritten(tmp_path):
    checkpoint, tokenizer_file = write_text_encoder(tmp_path / "model", seed=0)
    files = ModelFiles(tmp_path, checkpoint, checkpoint, checkpoint, tokenizer_file)
    cache = PromptEmbeddingCache(tmp_path / "cache", text_encoder_identity(files, TINY))
    loader = CountingLoader(checkpoint, tokenizer_file)
    store_damaged(cache, "a castle", "torn")

    with pytest.warns(UserWarning, match=r"deserializing header"):
        (encoded,) = embed_prompts(["a castle"], loader, cache)
    assert loader.encoded == ["a castle"]
    assert torch.equal(encoded, loader().encode_prompts(["a castle"])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry reads cleanly
        assert torch.equal(cache.lookup("a castle"), encoded)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_miss_without_a_loadable_encoder_names_the_cache_entry(tmp_path):
    cache = PromptEmbeddingCache(tmp_path / "cache", "encoder")
    path = store_damaged(cache, "a castle", "renamed tensor")

    def no_encoder() -> TextEncoder:
        raise FileNotFoundError("no text encoder here")

    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no text encoder here") as raised:
        embed_prompts(["a castle"], no_encoder, cache)
    assert raised.value.__notes__ == [
        f"the text encoder was needed: these prompt cache entries are missing or unusable: {path}"
    ]

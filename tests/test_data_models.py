"""Tests of the built-in corpus, tokenizers, resumable batches and the LLaMA configs."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lowrank_optim.train import (
    BPETokenizer,
    ByteTokenizer,
    TokenBatches,
    Tokenizer,
    build_corpus,
    default_cache_dir,
    encode_documents,
    load_hf_dataset,
    load_local_dataset,
    split_documents,
    stdlib_corpus_files,
    train_bpe_tokenizer,
    validation_batches,
)
from lowrank_optim.train.models import (
    LLAMA_SIZES,
    build_llama,
    build_llama_on_meta,
    count_parameters,
    load_llama_config,
    tiny_llama_config,
)

__all__: list[str] = []

SMALL_BYTES = 400_000
SAMPLE = "def f(x):\n    return x ** 2  # ünïcödé, 日本語, emoji 🚀\n\tTabs\r\n"


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory: pytest.TempPathFactory):
    """One small BPE corpus shared by the tests (training takes a fraction of a second)."""
    cache = tmp_path_factory.mktemp("cache")
    return build_corpus("bpe", vocab_size=512, max_bytes=SMALL_BYTES, cache_dir=cache), cache


def test_stdlib_corpus_found_capped_and_ordered() -> None:
    files = stdlib_corpus_files(SMALL_BYTES)
    assert files and all(p.suffix == ".py" for p in files)
    assert all("site-packages" not in p.parts for p in files)
    assert files == sorted(files) == stdlib_corpus_files(SMALL_BYTES)
    assert sum(p.stat().st_size for p in files) <= SMALL_BYTES
    assert len(stdlib_corpus_files(1)) == 1  # a tiny cap still gives one document


def test_bpe_round_trip_and_protocol(bpe_corpus) -> None:
    corpus, _ = bpe_corpus
    tok = corpus.tokenizer
    assert isinstance(tok, BPETokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size <= 512 and 0 <= tok.eos_id < tok.vocab_size
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert len(ids) < len(SAMPLE.encode())  # merges actually compress
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(SAMPLE)) == SAMPLE
    assert byte.decode([*byte.encode("ab"), byte.eos_id]) == "ab"


def test_bpe_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    texts = ["alpha beta gamma " * 20, "def main():\n    pass\n" * 20, "x = [1, 2, 3]\n" * 20]
    first = train_bpe_tokenizer(texts, vocab_size=300)
    second = train_bpe_tokenizer(texts, vocab_size=300, cache_path=tmp_path / "tok.json")
    assert first.backend.to_str() == second.backend.to_str()
    cached = train_bpe_tokenizer(["unrelated"], vocab_size=300, cache_path=tmp_path / "tok.json")
    assert cached.encode(texts[1]) == first.encode(texts[1])
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=100)


def test_encode_documents_appends_eos() -> None:
    tok = ByteTokenizer()
    ids = encode_documents(tok, ["ab", "c"])
    assert ids.dim() == 1 and ids.dtype == torch.int32
    assert ids.tolist() == [97, 98, tok.eos_id, 99, tok.eos_id]


def test_split_is_disjoint_and_deterministic(bpe_corpus) -> None:
    documents = [f"document {i}" for i in range(45)]
    train, val = split_documents(documents)
    assert val == ["document 1", "document 21", "document 41"]
    assert not set(train) & set(val) and len(train) + len(val) == len(documents)
    corpus, _ = bpe_corpus
    assert corpus.train_tokens.numel() > 10 * corpus.val_tokens.numel() > 0
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only one"])


def test_corpus_cache_is_reused(bpe_corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, cache = bpe_corpus
    assert len(list(cache.glob("*/tokens.pt"))) == 1
    assert len(list(cache.glob("*/tokenizer.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a cached corpus must not be re-encoded")

    monkeypatch.setattr("lowrank_optim.train.data.encode_documents", fail)
    again = build_corpus("bpe", vocab_size=512, max_bytes=SMALL_BYTES, cache_dir=cache)
    assert torch.equal(again.train_tokens, corpus.train_tokens)
    assert torch.equal(again.val_tokens, corpus.val_tokens)
    assert "standard library" in again.description


def test_default_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWRANK_OPTIM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LOWRANK_OPTIM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lowrank_optim"


def test_byte_corpus_and_bad_tokenizer(tmp_path: Path) -> None:
    corpus = build_corpus("byte", max_bytes=50_000, cache_dir=tmp_path)
    assert corpus.tokenizer.vocab_size == 257
    assert int(corpus.train_tokens.max()) <= 256
    with pytest.raises(ValueError, match="allowed: bpe, byte"):
        build_corpus("wordpiece", cache_dir=tmp_path)


def test_batches_deterministic_and_resume_exact() -> None:
    tokens = torch.arange(10_000, dtype=torch.int32)
    reference = TokenBatches(tokens, batch_size=4, seq_len=16, seed=3)
    expected = [next(reference) for _ in range(400)]  # crosses several epochs
    assert expected[0].shape == (4, 16) and expected[0].dtype == torch.int64
    assert all(
        torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 15, dtype=torch.int64)) for b in expected
    )
    again = TokenBatches(tokens, batch_size=4, seq_len=16, seed=3)
    assert all(torch.equal(next(again), b) for b in expected)
    assert not torch.equal(next(TokenBatches(tokens, 4, 16, seed=4)), expected[0])

    interrupted = TokenBatches(tokens, batch_size=4, seq_len=16, seed=3)
    for _ in range(170):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain ints survive JSON
    resumed = TokenBatches(tokens, batch_size=4, seq_len=16, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), b) for b in expected[170:])
    with pytest.raises(ValueError, match="seed"):
        TokenBatches(tokens, batch_size=4, seq_len=16, seed=9).load_state_dict(state)


def test_two_rank_sharding_concatenates_to_global_batch() -> None:
    tokens = torch.arange(5_000, dtype=torch.int32)
    single = TokenBatches(tokens, batch_size=8, seq_len=8, seed=1)
    ranks = [TokenBatches(tokens, 8, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(100):
        parts = [next(r) for r in ranks]
        assert parts[0].shape == (4, 8)
        assert torch.equal(torch.cat(parts), next(single))
    with pytest.raises(ValueError, match="divisible"):
        TokenBatches(tokens, batch_size=5, seq_len=8, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TokenBatches(tokens, batch_size=4, seq_len=8, rank=2, world_size=2)


def test_validation_batches_fixed() -> None:
    tokens = torch.arange(1_000, dtype=torch.int32)
    batches = validation_batches(tokens, batch_size=2, seq_len=10, count=3)
    assert len(batches) == 3 and batches[0].shape == (2, 10)
    assert batches[1][0, 0] == 20
    with pytest.raises(ValueError, match="eval batches"):
        validation_batches(tokens, batch_size=10, seq_len=10, count=20)


def test_local_datasets(tmp_path: Path) -> None:
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "first doc"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")
    assert load_local_dataset(jsonl) == ["first doc", "second"]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.md").write_text("bee", encoding="utf-8")
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "skip.bin").write_bytes(b"\x00")
    assert load_local_dataset(folder) == ["ay", "bee"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'text' field"):
        load_local_dataset(bad)
    with pytest.raises(ValueError, match="Unsupported"):
        load_local_dataset(folder / "skip.bin")
    with pytest.raises(ValueError, match="neither"):
        build_corpus("byte", dataset=str(tmp_path / "missing.jsonl"), cache_dir=tmp_path)
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(40)))
    corpus = build_corpus("byte", dataset=many, cache_dir=tmp_path / "cache")
    assert "40 documents" in corpus.description and corpus.val_tokens.numel() > 0


def test_hf_dataset_reads_records_and_reports_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"text": f"story {i}"} for i in range(10)]
    fake = types.SimpleNamespace(load_dataset=lambda name, **kwargs: iter(records))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_hf_dataset("some/stories", max_documents=3) == ["story 0", "story 1", "story 2"]
    with pytest.raises(ValueError, match="no field 'body'"):
        load_hf_dataset("some/stories", text_field="body")

    def offline(name: str, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="Could not load Hugging Face dataset 'some/stories'"):
        load_hf_dataset("some/stories")


@pytest.mark.parametrize("name", LLAMA_SIZES)
def test_every_config_loads_with_expected_size(name: str) -> None:
    expected = {
        "9m": 9.0e6,
        "20m": 19.5e6,
        "60m": 58.1e6,
        "130m": 134.1e6,
        "350m": 368.0e6,
        "1b": 1.339e9,
        "7b": 6.738e9,
    }
    config = load_llama_config(name.upper())
    assert config.vocab_size == 32000 and config.max_position_embeddings == 1024
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings is False
    count = count_parameters(build_llama_on_meta(config))
    assert abs(count - expected[name]) / expected[name] < 0.01


def test_config_overrides_and_json_path(tmp_path: Path) -> None:
    config = load_llama_config("60m", vocab_size=4096, max_position_embeddings=256)
    assert config.vocab_size == 4096 and config.max_position_embeddings == 256
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({**config.to_dict(), "num_hidden_layers": 1}), encoding="utf-8")
    assert load_llama_config(path).num_hidden_layers == 1


def test_bad_config_name_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="allowed: 9m, 20m, 60m, 130m, 350m, 1b, 7b"):
        load_llama_config("13b")


def test_tiny_model_forward_deterministic_and_side_effect_free() -> None:
    config = tiny_llama_config(vocab_size=300)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build_llama(config, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    same = build_llama(config, seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters(), strict=True)
    )
    batch = torch.randint(0, 300, (2, 12))
    output = model(input_ids=batch, labels=batch)
    assert output.logits.shape == (2, 12, 300)
    loss = float(output.loss.detach())
    assert 4.0 < loss < 7.5  # about ln(300) = 5.7 for random weights
    assert count_parameters(model) == count_parameters(build_llama_on_meta(config))
    half = build_llama(config, seed=0, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        build_llama(config, dtype=torch.int64)

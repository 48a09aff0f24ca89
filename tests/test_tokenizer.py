"""Tests of the BPE tokenizer in data.py: against a naive trainer, tiktoken's loader, and real TOFU text."""

import base64
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import tiktoken.load

import data

TOFU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "tofu"
needs_tofu = pytest.mark.skipif(not TOFU_DIR.exists(), reason="real TOFU files not found at ../shared/tofu")


def naive_train_bpe(texts, vocab_size):
    """Textbook BPE: recount every pair of every word occurrence, merge the most frequent pair
    (ties: smaller token ids) everywhere, repeat. Returns (ranks, final tokens of each word occurrence)."""
    words = [list(w.encode("utf-8")) for t in texts for w in regex.findall(data.GPT2_SPLIT_PATTERN, t)]
    vocab = [bytes([i]) for i in range(256)]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    while len(ranks) < vocab_size - 1:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], p))
        tok = vocab[a] + vocab[b]
        if tok not in ranks:
            ranks[tok] = len(vocab)
            vocab.append(tok)
        new_id = ranks[tok]
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks, words


@pytest.fixture(scope="module")
def tofu_tokenizer():
    """(texts, ranks, final tokens per training word, seconds) for a 4,096-token BPE on all TOFU text."""
    if not TOFU_DIR.exists():
        pytest.skip("real TOFU files not found at ../shared/tofu")
    texts = data.corpus_texts(TOFU_DIR)
    t0 = time.perf_counter()
    ranks, words = data._train_bpe(texts, 4096)
    return texts, ranks, words, time.perf_counter() - t0


def test_split_pattern_is_tiktokens_gpt2_pattern():
    from tiktoken_ext.openai_public import r50k_pat_str  # the pat_str of tiktoken's "gpt2" encoding

    assert data.GPT2_SPLIT_PATTERN == r50k_pat_str


def test_trainer_matches_naive_trainer_on_small_corpus():
    texts = [
        "the cat sat on the mat; the cat's hat is at the flat.",
        "aaaa aaa aa a abab baba  tab\ttab\n\nnewline  ",
        "Zoë Bergström, Søren and José met in Kraków: 1984, 2001, 19841984!",
    ]
    ranks = data.train_bpe(texts, 320)
    expected, _ = naive_train_bpe(texts, 320)
    assert ranks == expected
    assert len(ranks) == 319  # vocab_size - 1: EOS takes the last id


def test_trainer_matches_naive_trainer_on_random_corpora():
    # tiny alphabets: many tied counts, repeated letters, runs that exhaust every pair
    for seed in range(25):
        rng = random.Random(seed)
        alphabet = rng.choice(["ab", "abc", "aab", "ab é"])
        texts = [
            " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(rng.randint(1, 25)))
            for _ in range(rng.randint(1, 3))
        ]
        vocab_size = rng.randint(257, 340)
        ranks, words = data._train_bpe(texts, vocab_size)
        expected_ranks, expected_words = naive_train_bpe(texts, vocab_size)
        assert ranks == expected_ranks, seed
        occurrences = [w for t in texts for w in regex.findall(data.GPT2_SPLIT_PATTERN, t)]
        assert [words[w] for w in occurrences] == expected_words, seed


def test_trainer_stops_when_every_word_is_one_token():
    ranks = data.train_bpe(["ab ab abc"], 1000)
    # words "ab", " ab", " abc": merge a+b (3), then " "+ab (2), then " ab"+c (1); then no pair is left
    assert sorted(t for t in ranks if len(t) > 1) == [b" ab", b" abc", b"ab"]
    assert sorted(ranks.values()) == list(range(259))


def test_trainer_rejects_vocab_without_room_for_bytes_and_eos():
    with pytest.raises(ValueError, match="257"):
        data.train_bpe(["abc"], 256)


def test_encoding_layout_and_special_token():
    ranks = data.train_bpe(["hello world, hello there"], 270)
    enc = data.build_encoding(ranks)
    assert enc.n_vocab == 270 and enc.eot_token == len(ranks) == 269
    assert enc.decode([enc.eot_token]) == data.EOS
    assert all(ranks[bytes([i])] == i for i in range(256))
    # a literal "<|endoftext|>" in text is text, not the special token
    assert enc.eot_token not in enc.encode_ordinary("a <|endoftext|> b")


@needs_tofu
def test_training_4096_on_tofu_is_fast_and_consistent(tofu_tokenizer):
    texts, ranks, _, seconds = tofu_tokenizer
    assert sum(len(t.encode()) for t in texts) > 1_000_000
    assert seconds < 30, f"training took {seconds:.1f} s"
    assert len(ranks) == 4095 and sorted(ranks.values()) == list(range(4095))
    # every merged token is the concatenation of two tokens of lower rank (what tiktoken's merge needs)
    by_rank = {r: tok for tok, r in ranks.items()}
    for r in range(256, 4095):
        tok = by_rank[r]
        assert any(
            ranks.get(tok[:k], r) < r and ranks.get(tok[k:], r) < r for k in range(1, len(tok))
        ), tok


@needs_tofu
def test_tiktoken_reproduces_the_trainers_segmentation(tofu_tokenizer):
    _, ranks, words, _ = tofu_tokenizer
    enc = data.build_encoding(ranks)
    mismatched = [w for w, ids in words.items() if enc.encode_ordinary(w) != ids]
    assert mismatched == []


@needs_tofu
def test_round_trip_every_tofu_string(tofu_tokenizer):
    texts, ranks, _, _ = tofu_tokenizer
    enc = data.build_encoding(ranks)
    assert any(not t.isascii() for t in texts)  # non-ASCII names are part of the check
    encoded = enc.encode_ordinary_batch(texts)
    assert enc.decode_batch(encoded) == texts


def test_saved_ranks_are_readable_by_tiktoken(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise cache the file by path
    ranks = data.train_bpe(["Zoë writes poems; Søren reads them 42 times."], 300)
    path = tmp_path / "npo.tiktoken"
    data.save_ranks(ranks, path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == ranks
    assert data.load_ranks(path) == ranks
    first = path.read_text().splitlines()[0]
    assert first == "AA== 0"  # base64 of byte 0, rank 0


def test_load_ranks_errors(tmp_path):
    path = tmp_path / "bad.tiktoken"
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    path.write_text("\n".join(lines[:10] + ["not-a-rank-line"] + lines[10:]) + "\n")
    with pytest.raises(data.DataError, match=r"bad\.tiktoken:11: expected '<base64 token> <rank>'"):
        data.load_ranks(path)
    path.write_text("\n".join(lines[:255]) + "\n")
    with pytest.raises(data.DataError, match="missing byte 255"):
        data.load_ranks(path)
    with pytest.raises(data.DataError, match="not found"):
        data.load_ranks(tmp_path / "absent.tiktoken")


def test_tokenizer_spec_round_trip():
    ranks = data.train_bpe(["Question: Who wrote it?\nAnswer: Inés Quiroga wrote it."], 290)
    enc = data.build_encoding(ranks)
    spec = json.loads(json.dumps(data.tokenizer_spec(enc)))  # plain python types only
    enc2 = data.encoding_from_spec(spec)
    text = "Answer: Inés wrote 12 books."
    assert enc2.encode_ordinary(text) == enc.encode_ordinary(text)
    assert (enc2.n_vocab, enc2.eot_token, enc2.name) == (enc.n_vocab, enc.eot_token, enc.name)
    spec["n_vocab"] = 5
    with pytest.raises(data.DataError, match="n_vocab"):
        data.encoding_from_spec(spec)
    with pytest.raises(data.DataError, match="'type'"):
        data.encoding_from_spec({"ranks": "x"})


def test_gpt2_encoding_unavailable_error_is_plain(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(data.DataError, match="TIKTOKEN_CACHE_DIR") as err:
        data.gpt2_encoding()
    assert "'gpt2' encoding cannot be loaded" in str(err.value)


def test_gpt2_encoding_when_available():
    try:
        enc = data.gpt2_encoding()
    except data.DataError as e:
        pytest.skip(f"tiktoken's gpt2 files are not available here: {str(e)[:80]}")
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert data.tokenizer_spec(enc) == {"type": "tiktoken", "name": "gpt2", "n_vocab": 50257}

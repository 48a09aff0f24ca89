"""Tests of data.py's tokenizers: this project's BPE against a naive trainer and tiktoken's loader;
Hugging Face tokenizers (trained here with the `tokenizers` library, shaped like GPT-2's, Llama-3's
and Llama-2's) against `tokenizers` itself on every TOFU string; Llama-3's tokenizer.model against
transformers' conversion of it; saved tokenizers against transformers.AutoTokenizer; bad files."""

import base64
import json
import random
import shutil
import time
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load

import data

# strings that TOFU lacks: whitespace runs and control characters, every byte, characters that a
# small SentencePiece vocabulary only has as <0xXX> byte tokens, contractions, long digit runs
TRICKY = ["", " ", "  two leading spaces", "trailing  ", "tabs\tand\nnew\n\nlines\r\n", "x  y   z    w     v",
          "Zoë, Søren — 1984!!", "emoji 🦙 and 日本語", "".join(map(chr, range(256))), "it's, they'll, I'M",
          "12345678 0.5", "    four", "a" * 40]


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
def tofu_bpe(tofu_texts):
    """(ranks, final tokens per training word, seconds) for a 4,096-token BPE on all TOFU text."""
    t0 = time.perf_counter()
    ranks, words = data._train_bpe(tofu_texts, 4096)
    return ranks, words, time.perf_counter() - t0


def hf_tokenizer(directory):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(directory / "tokenizer.json"))


def mismatches(tok, texts, expected):
    return [(t, ids) for t, ids in zip(texts, expected) if tok.encode(t) != ids]


# ---------------------------------------------------------------------------------------------- this project's BPE


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


def test_bpe_tokenizer_layout_and_end_token():
    ranks = data.train_bpe(["hello world, hello there"], 270)
    tok = data.bpe_tokenizer(ranks)
    assert tok.n_vocab == 270 and tok.eos_ids == (269,) and tok.pad_id == 269 and tok.bos_id is None
    assert tok.special_id(data.EOS) == 269 and tok.decode([104, 269, 105]) == "hi"  # special tokens dropped
    # a literal "<|endoftext|>" in text is text, not the special token
    assert 269 not in tok.encode("a <|endoftext|> b") and tok.decode(tok.encode("a <|endoftext|> b")) == "a <|endoftext|> b"
    with pytest.raises(data.DataError, match="no special token"):
        tok.special_id("<|eot_id|>")


def test_training_4096_on_tofu_is_fast_and_consistent(tofu_texts, tofu_bpe):
    ranks, _, seconds = tofu_bpe
    assert sum(len(t.encode()) for t in tofu_texts) > 1_000_000
    assert seconds < 30, f"training took {seconds:.1f} s"
    assert len(ranks) == 4095 and sorted(ranks.values()) == list(range(4095))
    # every merged token is the concatenation of two tokens of lower rank (what tiktoken's merge needs)
    by_rank = {r: tok for tok, r in ranks.items()}
    for r in range(256, 4095):
        tok = by_rank[r]
        assert any(ranks.get(tok[:k], r) < r and ranks.get(tok[k:], r) < r for k in range(1, len(tok))), tok


def test_tiktoken_reproduces_the_trainers_segmentation_and_round_trips(tofu_texts, tofu_bpe):
    ranks, words, _ = tofu_bpe
    tok = data.bpe_tokenizer(ranks)
    assert [w for w, ids in words.items() if tok.encode(w) != ids] == []
    assert any(not t.isascii() for t in tofu_texts)  # non-ASCII names are part of the check
    assert [tok.decode(tok.encode(t)) for t in tofu_texts] == tofu_texts


def test_saved_bpe_loads_here_in_tiktoken_and_in_transformers(tmp_path, monkeypatch, tofu_texts, tofu_bpe):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise cache the file by path
    from transformers import AutoTokenizer

    ranks = tofu_bpe[0]
    tok = data.bpe_tokenizer(ranks)
    tok.save(tmp_path)
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / data.RANKS_FILE)) == ranks
    again = data.load_tokenizer(tmp_path)
    assert (again.n_vocab, again.eos_ids, again.pad_id) == (tok.n_vocab, tok.eos_ids, tok.pad_id) == (4096, (4095,), 4095)
    sample = tofu_texts[::4] + TRICKY
    expected = [tok.encode(t) for t in sample]
    assert [again.encode(t) for t in sample] == expected
    # the byte-level tokenizer.json written beside the ranks gives a transformers user the same ids
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(sample, add_special_tokens=False)["input_ids"] == expected
    assert hf.eos_token_id == 4095 and hf.convert_ids_to_tokens(4095) == data.EOS


def test_corrupt_rank_files(tmp_path):
    ranks = data.train_bpe(["Zoë writes poems; Søren reads them 42 times."], 300)
    data.bpe_tokenizer(ranks).save(tmp_path)
    path = tmp_path / data.RANKS_FILE
    lines = path.read_text().splitlines(keepends=True)
    cases = {  # file content -> what the error says
        "".join(lines[:-3]): "truncated",  # cut at a line boundary: the ranks still look whole
        "".join(lines)[:-2]: "ranks must be exactly 0..",  # cut inside the last line: " 299" becomes " 29"
        "".join(lines)[:-6]: "tiktoken's '<base64 token> <rank>' lines",  # cut before the last rank
        "".join(lines[:10] + ["not-a-rank-line\n"] + lines[10:]): "tiktoken's '<base64 token> <rank>' lines",
        "".join(lines[:10] + lines[11:]): "ranks must be exactly 0..",
        "".join(["//79 0\n"] + lines[1:]): "missing byte 0",  # byte 0's line holds the token ff fe fd
        "": "no ranks",
    }
    for content, message in cases.items():
        path.write_text(content)
        with pytest.raises(data.DataError, match=message) as err:
            data.load_tokenizer(tmp_path)
        assert str(path) in str(err.value) or "tokenizer_config" in str(err.value)
    (tmp_path / "tokenizer_config.json").unlink()
    path.write_text("".join(lines))
    with pytest.raises(data.DataError, match=r"tokenizer_config\.json: file not found"):
        data.load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------- Hugging Face tokenizers


@pytest.mark.parametrize("name, stride", [("gpt2", 1), ("llama3", 1), ("llama2", 1), ("llama2-metaspace", 3),
                                          ("llama2-metaspace-split", 10)])
def test_every_tofu_string_encodes_and_decodes_as_hugging_face(hf_tokenizer_dirs, tofu_texts, name, stride):
    # every string for the layouts of GPT-2, Llama-3 and Llama-2; the Metaspace variants of llama2
    # differ only in where "▁" goes, so some of the strings suffice for them
    reference = hf_tokenizer(hf_tokenizer_dirs[name])
    tok = data.load_tokenizer(hf_tokenizer_dirs[name])
    texts = tofu_texts[::stride] + TRICKY
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert mismatches(tok, texts, expected) == []
    some = slice(None, -len(TRICKY), 5)
    assert [tok.decode(ids) for ids in expected[some]] == texts[some]
    some = expected[::20] + expected[-len(TRICKY):]
    assert [tok.decode(ids) for ids in some] == reference.decode_batch(some)


def test_end_tokens_come_from_the_tokenizer_and_generation_configs(hf_tokenizer_dirs):
    ids = {name: hf_tokenizer(d).get_vocab() for name, d in hf_tokenizer_dirs.items()}
    gpt2, llama3, llama2 = (data.load_tokenizer(hf_tokenizer_dirs[n]) for n in ("gpt2", "llama3", "llama2"))
    eot = ids["gpt2"][data.EOS]
    assert (gpt2.bos_id, gpt2.eos_ids, gpt2.pad_id) == (eot, (eot,), eot)
    v = ids["llama3"]  # tokenizer_config's eos first, then generation_config's other end tokens
    assert llama3.eos_ids == (v["<|eot_id|>"], v["<|end_of_text|>"]) and llama3.bos_id == v["<|begin_of_text|>"]
    assert llama3.special_id("<|start_header_id|>") == v["<|start_header_id|>"]
    assert (llama2.bos_id, llama2.eos_ids, llama2.pad_id) == (1, (2,), 2)
    assert llama2.n_vocab == len(ids["llama2"])


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_tiktoken_is_not_used_where_its_merge_rule_differs(tmp_path, ignore_merges):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers

    # a trained merge list: a+b, b+c, a+bc. tiktoken would also merge ab+c into "abc", which
    # Hugging Face never does: it lists no such pair
    vocab = {c: i for i, c in enumerate(data.bytes_to_unicode().values())}
    vocab.update(ab=256, bc=257, abc=258)
    reference = HFTokenizer(models.BPE(vocab, [("a", "b"), ("b", "c"), ("a", "bc")], ignore_merges=ignore_merges))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.add_special_tokens([AddedToken(data.EOS, special=True)])
    reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": data.EOS}))
    tok = data.load_tokenizer(tmp_path)
    naive = tiktoken.Encoding("naive", pat_str=data.GPT2_SPLIT_PATTERN, special_tokens={},
                              mergeable_ranks={bytes([b]): vocab[c] for b, c in data.bytes_to_unicode().items()}
                              | {b"ab": 256, b"bc": 257, b"abc": 258})
    text = "abcabc abc xabc"
    expected = reference.encode(text, add_special_tokens=False).ids
    assert naive.encode_ordinary(text) != expected  # the trap is real
    assert tok.encode(text) == expected


def test_tiktoken_agrees_with_pair_merging_on_random_converted_vocabularies(tmp_path, monkeypatch):
    # random vocabularies of merges over a, b, c, converted as transformers converts tiktoken files
    # (every two-token split a merge): the loader encodes them through tiktoken, and must agree with
    # Hugging Face's pair-by-pair merging on strings full of repeats and overlaps
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    rng = random.Random(0)
    for trial in range(60):
        letters = "abc"[: rng.choice([2, 3])]
        ranks = {bytes([i]): i for i in range(256)}
        pieces = [c.encode() for c in letters]
        for _ in range(rng.randint(3, 14)):
            token = rng.choice(pieces) + rng.choice(pieces)
            if token not in ranks and len(token) <= 7:
                ranks[token] = len(ranks)
                pieces.append(token)
        directory = tmp_path / str(trial)
        directory.mkdir()
        (directory / "ranks").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
        converted = TikTokenConverter(str(directory / "ranks"), pattern=r"[\s\S]+", extra_special_tokens=[data.EOS]).converted()
        converted.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": data.EOS}))
        tok = data.load_tokenizer(directory)
        assert isinstance(tok.encoding, tiktoken.Encoding)
        texts = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 18))) for _ in range(30)]
        assert [tok.encode(t) for t in texts] == [e.ids for e in converted.encode_batch(texts, add_special_tokens=False)]


def test_llama3_tokenizer_model_matches_transformers_conversion(tmp_path, monkeypatch, tofu_texts, tofu_bpe):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = tofu_bpe[0]
    (tmp_path / "original").mkdir()
    data.bpe_tokenizer(ranks).save(tmp_path / "bpe")
    model_file = tmp_path / "original" / "tokenizer.model"
    shutil.copy(tmp_path / "bpe" / data.RANKS_FILE, model_file)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": len(ranks) + 256}))
    tok = data.load_tokenizer(tmp_path)
    n = len(ranks)
    assert isinstance(tok.encoding, tiktoken.Encoding) and tok.n_vocab == n + 256
    assert (tok.bos_id, tok.eos_ids) == (n, (n + 1, n + 9, n + 8))  # begin_of_text; end_of_text, eot_id, eom_id
    assert tok.special_id("<|start_header_id|>") == n + 6 and tok.special_id("<|reserved_special_token_246|>") == n + 255

    converted = TikTokenConverter(str(model_file), extra_special_tokens=data.LLAMA3_SPECIAL_TOKENS).converted()
    texts = tofu_texts[::3] + TRICKY
    expected = [e.ids for e in converted.encode_batch(texts, add_special_tokens=False)]
    assert mismatches(tok, texts, expected) == []
    assert converted.token_to_id("<|eot_id|>") == n + 9

    # saved as a tokenizer.json with every split as a merge: read back through tiktoken, and by transformers
    tok.save(tmp_path / "saved")
    again = data.load_tokenizer(tmp_path / "saved")
    assert isinstance(again.encoding, tiktoken.Encoding)
    assert mismatches(again, texts, expected) == []
    assert (again.bos_id, again.eos_ids[0]) == (n, n + 1)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf(texts[::4], add_special_tokens=False)["input_ids"] == expected[::4]
    assert hf.convert_tokens_to_ids("<|eot_id|>") == n + 9

    # a file cut at a line boundary still has ranks 0..n-1: config.json's vocab_size tells
    model_file.write_text("".join(model_file.read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(data.DataError, match="truncated"):
        data.load_tokenizer(tmp_path)


def test_saved_hugging_face_tokenizer_is_its_files(tmp_path, hf_tokenizer_dirs):
    from transformers import AutoTokenizer

    source = hf_tokenizer_dirs["llama2"]
    data.load_tokenizer(source).save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (source / name).read_bytes()
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "[INST] Who wrote 'The Silent Garden'? [/INST]"
    assert hf(text)["input_ids"] == [1] + data.load_tokenizer(tmp_path).encode(text)
    # end tokens known from config.json alone are written into the saved tokenizer_config.json
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_tokenizer_dirs["gpt2"] / "tokenizer.json", bare)
    eot = hf_tokenizer(bare).token_to_id(data.EOS)
    (bare / "config.json").write_text(json.dumps({"eos_token_id": eot}))
    data.load_tokenizer(bare).save(tmp_path / "saved")
    assert data.load_tokenizer(tmp_path / "saved").eos_ids == (eot,)


def test_unsupported_tokenizers_are_named(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    def case(name, tokenizer=None, text=None):
        directory = tmp_path / name
        directory.mkdir()
        if tokenizer is not None:
            tokenizer.save(str(directory / "tokenizer.json"))
        if text is not None:
            (directory / "tokenizer.json").write_text(text)
        return directory

    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    unigram = HFTokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0, False))
    whitespace_bpe = HFTokenizer(models.BPE({"a": 0, "b": 1}, []))
    whitespace_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    prefix_space = HFTokenizer(models.BPE({c: i for i, c in enumerate(data.bytes_to_unicode().values())}, []))
    prefix_space.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    for directory, message in [
        (case("wordpiece", wordpiece), "model type 'WordPiece'.*supported: tokenizer.json with a byte-level BPE"),
        (case("unigram", unigram), "model type 'Unigram'"),
        (case("whitespace", whitespace_bpe), "byte_fallback False: not supported"),
        (case("prefix", prefix_space), "add_prefix_space"),
        (case("broken", text='{"model": '), r"tokenizer\.json: not a readable JSON file"),
        (case("empty"), "no tokenizer found; supported:"),
    ]:
        with pytest.raises(data.DataError, match=message):
            data.load_tokenizer(directory)
    (tmp_path / "empty" / "tokenizer.model").write_bytes(b"\x0a\x05<unk>")  # a SentencePiece model alone
    with pytest.raises(data.DataError, match="no tokenizer found"):
        data.load_tokenizer(tmp_path / "empty")

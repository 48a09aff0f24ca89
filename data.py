"""Tokenizers, prompt formats and TOFU data for the NPO reference implementation.

Three parts, in the order a reader meets them:

1. Tokenizers. `Tokenizer` is one small interface over the tokenizers of the models unlearning
   research uses: this project's byte-level BPE (`train_bpe`, saved in tiktoken's rank format),
   a Hugging Face `tokenizer.json` (byte-level BPE: GPT-2, Llama-3, Qwen2, Phi-1.5; SentencePiece
   BPE with byte fallback: Llama-2) and Llama-3's `original/tokenizer.model`. tiktoken encodes
   where its merge rule gives Hugging Face's tokens (`_tiktoken_ranks` says when); `MergeBPE`,
   Hugging Face's own pair-rank algorithm, everywhere else.
2. Prompt formats as data (`PromptFormat`, `PROMPT_FORMATS`) and the QA encoding with its loss mask.
3. Batching and a strict loader for TOFU's JSON Lines files. (`tofu_style.py` writes a TOFU-style
   dataset in the same format, the default data when no TOFU directory is given.)
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import heapq
import json
import os
import re
import unicodedata
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import regex  # installed with tiktoken; the split patterns need \p{L} and possessive quantifiers
import tiktoken
import tiktoken.load
import torch

from npo import IGNORE_INDEX  # label of positions that carry no loss (prompt, padding)
EOS = "<|endoftext|>"
# tiktoken's `gpt2` pat_str (r50k_pat_str), equal to GPT-2's own split: contractions, letters,
# digits, punctuation runs, each optionally preceded by one space; whitespace runs otherwise.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# Meta's Llama-3 tokenizer.py: case-insensitive contractions, digits in groups of at most three.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = [  # ids len(ranks) + i, i.e. 128000.. for Llama-3's 128,000 ranks (Llama-3.1 names)
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(2, 247))]
RANKS_FILE = "tokenizer.tiktoken"  # this project's BPE, in tiktoken's "<base64 token> <rank>" lines


class DataError(ValueError):
    """Bad data or tokenizer input; the message names the file, the line, the field and what was expected."""


def write_atomic(path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write `content` (text as UTF-8, bytes, or a function that writes the file at the path it is
    given, e.g. lambda p: torch.save(state, p)) so that `path` holds either its old content or all
    of the new one: a uniquely named temporary file in the same directory, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# 1. Tokenizers


def _merge_word(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of the pair (a, b), left to right, by new_id."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Train a byte-level BPE vocabulary; return tiktoken mergeable ranks (token bytes -> rank).

    Ranks 0..255 are the single bytes, so every string can be encoded. Each further rank r is the
    r-th merge: the most frequent adjacent pair of tokens inside the pre-tokenized words (ties: the
    pair with the smaller token ids), and its bytes are the concatenation of the pair's. tiktoken
    encodes by repeatedly merging the adjacent pair whose concatenation has the lowest rank, which
    replays these merges in training order. The result has vocab_size - 1 entries, or fewer if every
    word of the text has become a single token first; the next id, len(ranks), is <|endoftext|>
    (see `bpe_tokenizer`), so the vocabulary is len(ranks) + 1 <= vocab_size.

    Fast version of the textbook loop (recount all pairs, merge everywhere, repeat): words are
    counted once, each unique word is stored once with its frequency, pair counts and a
    pair -> words index are updated only for the words a merge touches, and a lazy max-heap finds
    the best pair (stale heap entries are skipped when their count no longer matches).
    """
    return _train_bpe(texts, vocab_size)[0]


def _train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[bytes, int], dict[str, list[int]]]:
    """`train_bpe`, also returning each training word's final tokens (tests compare them with tiktoken's)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
    split = regex.compile(GPT2_SPLIT_PATTERN)
    word_freq: Counter[str] = Counter()
    for text in texts:
        word_freq.update(split.findall(text))
    words = [list(w.encode("utf-8")) for w in word_freq]  # token ids; 0..255 are the bytes
    freqs = list(word_freq.values())

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {tok: i for i, tok in enumerate(vocab)}
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> ids of words that may hold it
    for wi, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += freqs[wi]
            pair_words[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]  # max count first, then smaller ids
    heapq.heapify(heap)

    n_ranks = vocab_size - 1
    while len(ranks) < n_ranks:
        while heap:
            neg_count, a, b = heapq.heappop(heap)
            if pair_count.get((a, b), 0) == -neg_count:
                break
        else:
            break  # every word is a single token: the text supports no more merges
        token = vocab[a] + vocab[b]
        new_id = ranks.get(token)
        if new_id is None:  # guard: should a byte string arise from two different pairs, it keeps one id
            new_id = len(vocab)
            vocab.append(token)
            ranks[token] = new_id
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in pair_words.pop((a, b)):
            old = words[wi]
            new = _merge_word(old, a, b, new_id)
            if len(new) == len(old):  # stale index entry: an earlier merge already consumed the pair
                continue
            f = freqs[wi]
            for pair in zip(old, old[1:]):
                delta[pair] -= f
            for pair in zip(new, new[1:]):
                delta[pair] += f
                pair_words[pair].add(wi)
            words[wi] = new
        for pair, d in delta.items():
            if d == 0:
                continue
            count = pair_count[pair] + d
            if count:
                pair_count[pair] = count
                heapq.heappush(heap, (-count, pair[0], pair[1]))
            else:
                del pair_count[pair]
        pair_count.pop((a, b), None)
    return ranks, dict(zip(word_freq, words))


def _read_ranks(path) -> dict[bytes, int]:
    """A tiktoken rank file, parsed by tiktoken.load. It is given the file's hash, because its cache
    is keyed by path and would otherwise return an older file that was at the same path."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=digest)
    except OSError as e:
        raise DataError(f"{path}: cannot read the tokenizer ranks ({e.strerror})") from None
    except ValueError as e:
        raise DataError(f"{path}: expected tiktoken's '<base64 token> <rank>' lines ({e})") from None
    if not ranks:
        raise DataError(f"{path}: no ranks (expected tiktoken's '<base64 token> <rank>' lines)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once (a cut or edited file?)")
    missing = [i for i in range(256) if bytes([i]) not in ranks]
    if missing:
        raise DataError(f"{path}: every single byte must be a token; missing byte {missing[0]}")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: the alphabet in which byte-level vocabularies are written."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


class MergeBPE:
    """Hugging Face's BPE model, exactly: a word's symbols (its characters; for byte-level
    vocabularies the stand-ins of its UTF-8 bytes; characters outside a SentencePiece vocabulary
    become their <0xXX> byte tokens) are merged one pair at a time, always the adjacent pair listed
    first in `merges` (the leftmost of equals), until no adjacent pair is listed. Words come from
    the split regex (byte-level) or from cutting before each "▁" where no merge can cross it
    (SentencePiece), and are cached, which keeps this fast enough in Python.

    prepend: None for byte-level; for SentencePiece when "▁" goes before the text: "normalizer"
    (Llama-2's Prepend normalizer: always), or Metaspace's "always", "first" (only for text at the
    start of the input, not after a special token) or "never"."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pattern: str | None = None,
                 prepend: str | None = None, split: bool = False, ignore_merges: bool = False):
        self.vocab, self.prepend, self.ignore_merges = vocab, prepend, ignore_merges
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        for rank, (a, b) in enumerate(merges):  # a pair listed twice keeps its last rank, as in tokenizers
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise DataError(f"merge {a!r} + {b!r}: a token or the merged token is not in the vocabulary")
            self.merges[vocab[a], vocab[b]] = (rank, vocab[a + b])
        self.cache: dict[str, list[int]] = {}
        if pattern is not None:  # str.translate tables between latin-1 text (one char per byte) and stand-ins
            self.split, self.to_stand_in = regex.compile(pattern), bytes_to_unicode()
            self.to_latin1 = {ord(c): b for b, c in self.to_stand_in.items()}
            alphabet = self.to_stand_in.values()
        else:
            crossing = any(a[-1] != "▁" and b[0] == "▁" for a, b in merges)
            self.split = None if crossing and not split else re.compile("(?=▁)" if split else "(?<!▁)(?=▁)")
            alphabet = [f"<0x{b:02X}>" for b in range(256)]
            self.byte_of = {vocab[t]: b for b, t in enumerate(alphabet) if t in vocab}
        missing = [t for t in alphabet if t not in vocab]
        if missing:
            raise DataError(f"vocabulary has no token {missing[0]!r}: every byte must be representable")
        self.token_of = {i: t for t, i in vocab.items()}

    def encode_ordinary(self, text: str, first: bool = True) -> list[int]:
        if self.prepend is None:
            words = self.split.findall(text)
        else:
            if self.prepend == "normalizer" and text:
                text = " " + text
            text = text.replace(" ", "▁")
            if (self.prepend == "always" or self.prepend == "first" and first) and not text.startswith("▁"):
                text = "▁" + text
            words = [w for w in self.split.split(text) if w] if self.split else [text]
        if len(self.cache) > 1_000_000:
            self.cache.clear()
        ids = []
        for word in words:
            if word not in self.cache:
                symbols = word if self.prepend else word.encode().decode("latin-1").translate(self.to_stand_in)
                self.cache[word] = self._merge_word(symbols)
            ids += self.cache[word]
        return ids

    def _merge_word(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids = []
        for char in word:
            ids += [self.vocab[char]] if char in self.vocab else [self.vocab[f"<0x{b:02X}>"] for b in char.encode()]
        # tokenizers' Word::merge_all: a heap of (rank, position); an entry is stale when its left
        # symbol was merged away or the pair there no longer merges into the same token
        nxt, prv = list(range(1, len(ids))) + [-1], list(range(-1, len(ids) - 1))
        heap = [(m[0], i, m[1]) for i in range(len(ids) - 1) if (m := self.merges.get((ids[i], ids[i + 1])))]
        heapq.heapify(heap)
        while heap:
            _, i, merged = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j == -1 or self.merges.get((ids[i], ids[j]), (0, None))[1] != merged:
                continue
            ids[i], ids[j], nxt[i] = merged, None, nxt[j]
            if nxt[i] != -1:
                prv[nxt[i]] = i
                if m := self.merges.get((merged, ids[nxt[i]])):
                    heapq.heappush(heap, (m[0], i, m[1]))
            if prv[i] != -1 and (m := self.merges.get((ids[prv[i]], merged))):
                heapq.heappush(heap, (m[0], prv[i], m[1]))
        return [t for t in ids if t is not None]

    def decode(self, ids: list[int]) -> str:
        if self.prepend is None:
            latin1 = "".join(self.token_of[i] for i in ids).translate(self.to_latin1)
            return latin1.encode("latin-1").decode("utf-8", errors="replace")
        text, pending = [], bytearray()  # a run of byte tokens is one UTF-8 sequence, or U+FFFD per byte
        for i in list(ids) + [None]:
            if i in self.byte_of:
                pending.append(self.byte_of[i])
                continue
            if pending:
                try:
                    text.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    text.append("\ufffd" * len(pending))
                pending = bytearray()
            text.append("" if i is None else self.token_of[i].replace("▁", " "))
        text = "".join(text)
        return text[1:] if self.prepend != "never" and text.startswith(" ") else text


def _tiktoken_ranks(vocab: dict[str, int], merges: list[tuple[str, str]], ignore_merges: bool) -> dict[bytes, int] | None:
    """Ranks under which tiktoken's merge rule gives Hugging Face's tokens, or None.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, whichever pair forms
    it; Hugging Face merges the adjacent pair listed first. They agree when the merges are every
    two-token split of every token, listed in the order of the merged token's id (its rank), and
    a word that is itself a token is taken whole (ignore_merges, tiktoken's shortcut): as
    tokenizer.json files converted from tiktoken are built (Llama-3's). A trained list, one pair per
    token (GPT-2's, Qwen2's), lets tiktoken merge pairs it does not list; MergeBPE encodes those."""
    listed = set(merges)
    if not ignore_merges or len(listed) != len(merges):
        return None
    n_splits = 0
    for token in vocab:
        for k in range(1, len(token)):
            if token[:k] in vocab and token[k:] in vocab:
                if (token[:k], token[k:]) not in listed:
                    return None
                n_splits += 1
    if n_splits != len(merges) or any(vocab[a + b] > vocab[c + d] for (a, b), (c, d) in zip(merges, merges[1:])):
        return None
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    if any(c not in byte_of for token in vocab for c in token) or any(c not in vocab for c in byte_of):
        return None
    return {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}


class Tokenizer:
    """One interface over tiktoken and MergeBPE, so that callers never care which one encodes.

    encode(text): ordinary text; special tokens are never parsed from it (they enter a sequence only
    as ids: see encode_qa). decode(ids): text, special tokens dropped. bos_id (or None), eos_ids
    (generation stops at any; the first ends answers), pad_id, n_vocab, special_id(text), save(dir)."""

    def __init__(self, encoding: tiktoken.Encoding | MergeBPE, ordinary_ids: Iterable[int], *,
                 special: dict[str, int], bos_id: int | None, eos_ids: tuple[int, ...], pad_id: int,
                 files: Callable[[], dict[str, str | bytes]], added: dict[str, int] | None = None, nfc=False):
        self.encoding, self.special, self.added, self.nfc = encoding, special, added or {}, nfc
        self.bos_id, self.eos_ids, self.pad_id, self._files = bos_id, eos_ids, pad_id, files
        self._ordinary = frozenset(ordinary_ids)
        self._added_of = {i: t for t, i in self.added.items()}
        self.n_vocab = max([*self._ordinary, *special.values(), *self.added.values()]) + 1
        # splits at added tokens, longest first: non-special ones (Phi-1.5's runs of spaces) are found
        # in ordinary text, as Hugging Face does; special ones only in prompt templates (encode_qa)
        self._added_split, self._special_split = (
            re.compile("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")") if names else None
            for names in (self.added, special))

    def encode(self, text: str, first: bool = True) -> list[int]:
        """`first`: the text starts the input (SentencePiece's "▁" prefix may depend on it)."""
        parts = self._added_split.split(text) if self._added_split else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.added[part])
            elif part:
                part = unicodedata.normalize("NFC", part) if self.nfc else part
                ids += (self.encoding.encode_ordinary(part) if isinstance(self.encoding, tiktoken.Encoding)
                        else self.encoding.encode_ordinary(part, first and k == 0))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []  # special tokens and ids beyond the vocabulary are dropped
        for i in ids:
            if i in self._ordinary:
                run.append(i)
            elif i in self._added_of:
                out += [self.encoding.decode(run), self._added_of[i]]
                run = []
        return "".join(out + [self.encoding.decode(run)])

    def special_id(self, text: str) -> int:
        if text not in self.special:
            raise DataError(f"tokenizer has no special token {text!r}")
        return self.special[text]

    def save(self, out_dir) -> None:
        """Write the files that load_tokenizer and transformers.AutoTokenizer read back."""
        for name, content in self._files().items():
            (Path(out_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(out_dir) / name, content)


def _ranks_text(ranks: dict[bytes, int]) -> str:
    # tiktoken's format; tiktoken.load.dump_tiktoken_bpe writes the same lines but needs blobfile
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def _hf_files(ranks: dict[bytes, int], pattern: str, special: dict[str, int], bos: str | None, eos: str) -> dict[str, str]:
    """tokenizer.json (a byte-level BPE whose merges are every two-token split, as Hugging Face
    converts tiktoken files), tokenizer_config.json and special_tokens_map.json for `ranks`."""
    char = bytes_to_unicode()
    text = {t: "".join(char[b] for b in t) for t in ranks}
    merges = [pair for t in sorted(ranks, key=ranks.get) for pair in sorted(
        ((t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ranks and t[k:] in ranks), key=lambda p: (ranks[p[0]], ranks[p[1]]))]
    added = {str(i): {"content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                      "special": True} for t, i in special.items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    spec = {"version": "1.0", "added_tokens": [{"id": int(i), **a} for i, a in added.items()], "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]},
            "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "byte_fallback": False, "ignore_merges": True, "vocab": {text[t]: r for t, r in ranks.items()},
                      "merges": [[text[a], text[b]] for a, b in merges]}}
    names = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **names,
              "added_tokens_decoder": added}
    return {"tokenizer.json": json.dumps(spec, ensure_ascii=False), "tokenizer_config.json": json.dumps(config, indent=1),
            "special_tokens_map.json": json.dumps(names, indent=1)}


def bpe_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """This project's BPE over `ranks` (from train_bpe): GPT-2's split pattern; <|endoftext|>, id
    len(ranks), ends answers and pads."""
    eos = len(ranks)
    encoding = tiktoken.Encoding("npo-bpe", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOS: eos})
    return Tokenizer(encoding, range(eos), special={EOS: eos}, bos_id=None, eos_ids=(eos,), pad_id=eos,
                     files=lambda: {RANKS_FILE: _ranks_text(ranks), **_hf_files(ranks, GPT2_SPLIT_PATTERN, {EOS: eos}, None, EOS)})


def _read_json(path: Path, required: bool = False):
    if not path.is_file():
        if required:
            raise DataError(f"{path}: file not found")
        return None
    try:
        return json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None


def _end_tokens(model_dir: Path, token_ids: dict[str, int], bos: str | None = None, eos: tuple[str, ...] = ()):
    """(bos_id, eos_ids, pad_id): the token names of tokenizer_config.json or special_tokens_map.json
    (defaults: bos, eos[0]), then the end ids of generation_config.json and config.json (Llama-3
    Instruct stops at <|eot_id|> and <|end_of_text|>), then the ids of eos[1:]."""
    names = {**(_read_json(model_dir / "special_tokens_map.json") or {}), **(_read_json(model_dir / "tokenizer_config.json") or {})}
    config, generation = (_read_json(model_dir / name) or {} for name in ("config.json", "generation_config.json"))

    def token_id(name):
        if name not in token_ids:
            raise DataError(f"{model_dir}: the tokenizer has no token {name!r}")
        return token_ids[name]

    def named(key, default):
        value = names.get(key, default)
        value = value.get("content") if isinstance(value, dict) else value
        return None if value is None else token_id(value)

    listed = [value for ids in (generation.get("eos_token_id"), config.get("eos_token_id"))
              for value in (ids if isinstance(ids, list) else [ids])]
    eos_ids = tuple(dict.fromkeys(i for i in [named("eos_token", eos[0] if eos else None), *listed, *map(token_id, eos[1:])]
                                  if i is not None))
    if not eos_ids:
        raise DataError(f"{model_dir}: no end token (eos_token in tokenizer_config.json or eos_token_id in config.json)")
    pad_id = named("pad_token", None)
    return named("bos_token", bos), eos_ids, eos_ids[0] if pad_id is None else pad_id


SUPPORTED_TOKENIZERS = (
    "supported: tokenizer.json with a byte-level BPE (GPT-2, Llama-3, Qwen2, Phi) or a SentencePiece-style BPE with "
    "byte fallback (Llama-2); Llama-3's original/tokenizer.model; this project's BPE (tokenizer.tiktoken and "
    "tokenizer_config.json, as Tokenizer.save writes them)")


def _pre_tokenization(spec: dict, where: str) -> dict:
    """MergeBPE's options from tokenizer.json: the pattern of a byte-level BPE (GPT-2's regex inside
    ByteLevel, or a Split regex before ByteLevel), or how a SentencePiece-style BPE with byte
    fallback puts "▁" (Llama-2's Prepend + Replace normalizer, or the Metaspace pre-tokenizer)."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    byte_level = normalizer in (None, {"type": "NFC"}) and steps[-1] and steps[-1].get("type") == "ByteLevel" \
        and not steps[-1].get("add_prefix_space")
    split = steps[0] if len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated" \
        and not steps[0].get("invert") else {}
    fallback = (spec.get("model") or {}).get("byte_fallback")
    if byte_level and len(steps) == 1 and steps[0].get("use_regex", True):
        return {"pattern": GPT2_SPLIT_PATTERN}
    if byte_level and "Regex" in split.get("pattern", {}) and not steps[1].get("use_regex", True):
        return {"pattern": split["pattern"]["Regex"]}
    if fallback and pre is None and (normalizer or {}).get("normalizers") == [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]:
        return {"prepend": "normalizer"}
    if fallback and normalizer is None and steps[0] and steps[0].get("type") == "Metaspace" and pre.get("replacement") == "▁":
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return {"prepend": scheme, "split": pre.get("split", True)}
    raise DataError(f"{where}: normalizer {json.dumps(normalizer)[:100]}, pre_tokenizer {json.dumps(pre)[:200]}, "
                    f"byte_fallback {bool(fallback)}: not supported; {SUPPORTED_TOKENIZERS}")


def _hf_tokenizer(model_dir: Path) -> Tokenizer:
    where = str(model_dir / "tokenizer.json")
    spec = _read_json(model_dir / "tokenizer.json", required=True)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise DataError(f"{where}: model type {model.get('type')!r} with these options is not supported; {SUPPORTED_TOKENIZERS}")
    added = spec.get("added_tokens") or []
    special = {t["content"]: t["id"] for t in added if t.get("special")}
    words = {t["content"]: t["id"] for t in added if not t.get("special")}
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added if not t.get("special")):
        raise DataError(f"{where}: added_tokens: non-special tokens with lstrip, rstrip or single_word are not supported")
    vocab = {t: i for t, i in model["vocab"].items() if t not in special and t not in words}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    options = {**_pre_tokenization(spec, where), "ignore_merges": bool(model.get("ignore_merges"))}
    try:
        if "pattern" in options:
            # Hugging Face's Split (behavior Isolated) keeps the text between matches as pieces; tiktoken and
            # findall would drop it. For patterns that match everywhere (all of the known ones) nothing changes.
            p = options["pattern"]
            options["pattern"] = f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+"
            ranks = _tiktoken_ranks(vocab, merges, options["ignore_merges"])
        encoding = (tiktoken.Encoding(where, pat_str=options["pattern"], mergeable_ranks=ranks, special_tokens={})
                    if "pattern" in options and ranks else MergeBPE(vocab, merges, **options))
    except regex.error as e:
        raise DataError(f"{where}: pre_tokenizer regex: {e}") from None
    token_ids = {**vocab, **words, **special}
    bos_id, eos_ids, pad_id = _end_tokens(model_dir, token_ids)
    contents = {name: (model_dir / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model") if (model_dir / name).is_file()}
    if "tokenizer_config.json" not in contents:  # end tokens that came from config.json go with the tokenizer
        name = {i: t for t, i in token_ids.items()}
        contents["tokenizer_config.json"] = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token":
                                                        name.get(bos_id), "eos_token": name.get(eos_ids[0]), "pad_token": name.get(pad_id)})
    return Tokenizer(encoding, vocab.values(), special=special, added=words, bos_id=bos_id, eos_ids=eos_ids,
                     pad_id=pad_id, nfc=spec.get("normalizer") == {"type": "NFC"}, files=lambda: contents)


def _llama3_tokenizer(path: Path, model_dir: Path) -> Tokenizer:
    ranks = _read_ranks(path)
    special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    vocab_size = (_read_json(model_dir / "config.json") or {}).get("vocab_size")
    if vocab_size is not None and vocab_size != len(ranks) + len(special):
        raise DataError(f"{path}: {len(ranks)} ranks + {len(special)} special tokens, but config.json says vocab_size "
                        f"{vocab_size} (a truncated file?)")
    encoding = tiktoken.Encoding(path.name, pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    bos_id, eos_ids, pad_id = _end_tokens(model_dir, special, "<|begin_of_text|>", ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
    name = {i: t for t, i in special.items()}
    return Tokenizer(encoding, range(len(ranks)), special=special, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
                     files=lambda: _hf_files(ranks, LLAMA3_SPLIT_PATTERN, special, name.get(bos_id), name[eos_ids[0]]))


def load_tokenizer(model_dir) -> Tokenizer:
    """The tokenizer of a model directory: this project's BPE (tokenizer.tiktoken), else a Hugging
    Face tokenizer.json, else Llama-3's original/tokenizer.model. DataError for anything else."""
    model_dir = Path(model_dir)
    if (model_dir / RANKS_FILE).is_file():
        ranks = _read_ranks(model_dir / RANKS_FILE)
        # a rank file cut at a line boundary still holds ranks 0..n-1: the id of <|endoftext|> tells
        added = _read_json(model_dir / "tokenizer_config.json", required=True).get("added_tokens_decoder") or {}
        if [int(i) for i, t in added.items() if t.get("content") == EOS] != [len(ranks)]:
            raise DataError(f"{model_dir / RANKS_FILE}: {len(ranks)} ranks, but tokenizer_config.json does not give "
                            f"{EOS} the next id, {len(ranks)} (a truncated or mismatched file?)")
        tok = bpe_tokenizer(ranks)
    elif (model_dir / "tokenizer.json").is_file():
        tok = _hf_tokenizer(model_dir)
    elif (model_dir / "original" / "tokenizer.model").is_file():
        tok = _llama3_tokenizer(model_dir / "original" / "tokenizer.model", model_dir)
    else:
        raise DataError(f"{model_dir}: no tokenizer found; {SUPPORTED_TOKENIZERS}")
    vocab_size = (_read_json(model_dir / "config.json") or {}).get("vocab_size")
    if isinstance(vocab_size, int) and tok.n_vocab > vocab_size:
        raise DataError(f"{model_dir}: the tokenizer has {tok.n_vocab} tokens, more than config.json's vocab_size {vocab_size}")
    return tok


def default_prompt_format(model_dir, tok: Tokenizer) -> str:
    """TOFU's prompt format for the model in model_dir: Llama-3 chat where a Llama tokenizer has
    <|eot_id|>, Llama-2's [INST] for other Llama models, Phi's Question/Answer; "qa" otherwise."""
    model_type = (_read_json(Path(model_dir) / "config.json") or {}).get("model_type")
    if model_type == "llama":
        return "llama3-chat" if "<|eot_id|>" in tok.special else "llama2"
    return "phi" if model_type == "phi" else "qa"


# ----------------------------------------------------------------------------------------------
# 2. Prompt formats and the QA encoding


@dataclass(frozen=True)
class PromptFormat:
    """A prompt template as data. A QA pair is the text

        [BOS] system question_start QUESTION question_end | answer_tag ANSWER answer_end

    tokenized as one string, as TOFU does (the question and answer are ordinary text; the template
    pieces may hold the tokenizer's special tokens written out, e.g. "<|eot_id|>", which become
    their ids). The loss falls on what follows the prompt "[BOS] ... question_end": TOFU masks as
    many tokens as the prompt has when tokenized alone, and the prompt is also the generation
    prompt. answer_end: a special token, or "" for the tokenizer's end token (eos_ids[0]).
    strip: the question and answer are stripped of surrounding whitespace (chat templates do)."""

    question_start: str
    question_end: str
    answer_tag: str = ""
    answer_end: str = ""
    bos: bool = False
    system: str = ""
    strip: bool = False


PROMPT_FORMATS = {
    # the built-in format of this project's GPT: the separating space belongs to the answer
    "qa": PromptFormat("Question: ", "\nAnswer:", answer_tag=" "),
    # TOFU's config/model_config.yaml; TOFU appends the end token to the tokenized text
    "llama2": PromptFormat("[INST] ", " [/INST]", bos=True),
    "phi": PromptFormat("Question: ", "\n", answer_tag="Answer: "),
    # open-unlearning's Llama-3.x-Instruct configs: the Llama-3 chat template with system prompt
    # "You are a helpful assistant." and date_string "10 Apr 2025"
    "llama3-chat": PromptFormat(
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_end="<|eot_id|>", bos=True, strip=True,
        system="<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
               "Today Date: 10 Apr 2025\n\nYou are a helpful assistant.<|eot_id|>"),
}


def _encode_template(tok: Tokenizer, fmt: PromptFormat, question: str, answer: str | None = None) -> list[int]:
    """[BOS] system question_start question question_end, then answer_tag answer if an answer is
    given, encoded as one string: special tokens are taken from the template pieces only; the text
    between them (question and answer included) is tokenized as a whole."""
    if fmt.bos and tok.bos_id is None:
        raise DataError("this prompt format starts with a BOS token, but the tokenizer has none")
    pieces = [(fmt.system, True), (fmt.question_start, True), (question, False), (fmt.question_end, True)]
    if answer is not None:
        pieces += [(fmt.answer_tag, True), (answer, False)]
    ids, text, first = [tok.bos_id] if fmt.bos else [], "", True
    for piece, is_template in pieces:
        if fmt.strip and not is_template:
            piece = piece.strip()
        parts = tok._special_split.split(piece) if is_template and tok._special_split else [piece]
        for k, part in enumerate(parts):
            if k % 2 == 0:
                text += part
                continue
            if text:
                ids += tok.encode(text, first)
            ids.append(tok.special[part])
            text, first = "", False
    return ids + (tok.encode(text, first) if text else [])


def encode_prompt(tok: Tokenizer, fmt: PromptFormat, question: str) -> list[int]:
    """The generation prompt: [BOS] system question_start question question_end."""
    return _encode_template(tok, fmt, question)


def encode_qa(tok: Tokenizer, fmt: PromptFormat, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, labels): labels are IGNORE_INDEX on the prompt's tokens and the ids on the rest (answer
    tag, answer, end token). A literal "<|endoftext|>" in a question or answer stays text."""
    n_prompt = len(encode_prompt(tok, fmt, question))
    ids = _encode_template(tok, fmt, question, answer)
    ids.append(tok.special_id(fmt.answer_end) if fmt.answer_end else tok.eos_ids[0])
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


# ----------------------------------------------------------------------------------------------
# 3. Batching and the TOFU loader


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest pair: input_ids with pad_id, labels with -100. Returns two (B, T) int64 tensors."""
    if not pairs:
        raise ValueError("collate: got an empty batch")
    T = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        if len(ids) != len(lab):
            raise ValueError(f"collate: pair {i} has {len(ids)} input ids but {len(lab)} labels")
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return input_ids, labels


# Required fields (name -> type) of each kind of TOFU file, by the pattern of the split name; other
# fields are kept as they are.
_QA_FIELDS = {"question": str, "answer": str}
_SPLIT_KINDS = {
    r"full|forget\d\d|retain\d\d|real_authors|world_facts": _QA_FIELDS,
    r"forget\d\d_perturbed|retain_perturbed": {**_QA_FIELDS, "paraphrased_answer": str, "perturbed_answer": list},
    r"real_authors_perturbed|world_facts_perturbed": {**_QA_FIELDS, "perturbed_answer": list},
}
_OPTIONAL_FIELDS = {"paraphrased_question": str, "option1": str, "option2": str, "option3": str, "option4": str}
IDK_FILE = "idontknow.jsonl"
FORGET_SPLIT = r"forget(0[1-9]|[1-9]\d)"  # a forget split's name: forget01 ... forget99


def _required_fields(name: str) -> dict[str, type] | None:
    """The required fields of TOFU split `name`; None if it is no TOFU split."""
    return next((fields for pattern, fields in _SPLIT_KINDS.items() if re.fullmatch(pattern, name)), None)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _check_record(obj, fields: dict[str, type], where: str, n_perturbed: int | None) -> None:
    expected = ", ".join(fields)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with fields {expected}, got {_type_name(obj)}")
    for field in fields:
        if field not in obj:
            raise DataError(f"{where}: missing field {field!r} (expected fields: {expected})")
    for field, kind in {**fields, **_OPTIONAL_FIELDS}.items():
        if field not in obj:
            continue
        value = obj[field]
        if kind is str:
            if not isinstance(value, str):
                raise DataError(f"{where}: field {field!r}: expected a string, got {_type_name(value)}")
            if field in ("question", "answer") and not value.strip():
                raise DataError(f"{where}: field {field!r}: expected a non-empty string")
        else:  # perturbed_answer: non-empty list of strings, same length on every line
            if not isinstance(value, list) or not value:
                raise DataError(f"{where}: field {field!r}: expected a non-empty list of strings, got {_type_name(value)}")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise DataError(f"{where}: field {field!r}[{i}]: expected a string, got {_type_name(item)}")
            if n_perturbed is not None and len(value) != n_perturbed:
                raise DataError(
                    f"{where}: field {field!r}: expected {n_perturbed} answers like the first line, got {len(value)}"
                )


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a UTF-8 file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    for lineno, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            out.append((lineno, line))
    if not out:
        raise DataError(f"{path}: file is empty; expected one JSON object per line")
    return out


def load_split(data_dir, name: str) -> list[dict]:
    """Records of TOFU split `name` from `<data_dir>/<name>.json` (JSON Lines despite the extension).

    Every line must be a JSON object with the split's required fields (question and answer; the
    _perturbed files also perturbed_answer, a list of strings, and for forget/retain
    paraphrased_answer); otherwise DataError names the file, the line and the field.
    """
    fields = _required_fields(name)
    if fields is None:
        raise DataError(f"unknown TOFU split {name!r}; expected one of: full, forgetXX, retainYY, forgetXX_perturbed, "
                        "retain_perturbed, real_authors, real_authors_perturbed, world_facts, world_facts_perturbed "
                        "(XX, YY two digits)")
    path = Path(data_dir) / f"{name}.json"
    records, n_perturbed = [], None
    for lineno, line in _read_lines(path):
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from None
        _check_record(obj, fields, where, n_perturbed)
        if "perturbed_answer" in fields and n_perturbed is None:
            n_perturbed = len(obj["perturbed_answer"])
        records.append(obj)
    return records


def load_idk(data_dir) -> list[str]:
    """The refusal answers of `<data_dir>/idontknow.jsonl`: plain text, one per line."""
    return [line.strip() for _, line in _read_lines(Path(data_dir) / IDK_FILE)]


def retain_split_for(forget_split: str) -> str:
    """TOFU's retain split that complements a forget split: "forget10" -> "retain90"."""
    if not re.fullmatch(FORGET_SPLIT, forget_split):
        raise ValueError(f"expected a forget split named forgetXX with XX in 01..99, got {forget_split!r}")
    return f"retain{100 - int(forget_split[6:]):02d}"


def resolve_data_dir(value: str | None) -> Path | None:
    """The TOFU directory: `value`, else $TOFU_DATA_DIR, else None (meaning: use generated data)."""
    source = "the given data directory"
    if not value:
        value, source = os.environ.get("TOFU_DATA_DIR"), "TOFU_DATA_DIR"
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: not a directory ({source}); expected a directory with TOFU's .json files")
    return path


def corpus_texts(data_dir) -> list[str]:
    """Every distinct string of every TOFU file in data_dir (questions, answers, paraphrases,
    perturbed answers, options, refusals), in file order: the tokenizer's training text."""
    texts = []
    for path in sorted(Path(data_dir).glob("*.json")):
        if _required_fields(path.stem) is None:
            continue  # not a TOFU split
        for rec in load_split(data_dir, path.stem):
            for value in rec.values():
                texts += [s for s in (value if isinstance(value, list) else [value]) if isinstance(s, str)]
    if (Path(data_dir) / IDK_FILE).exists():
        texts += load_idk(data_dir)
    return list(dict.fromkeys(texts))

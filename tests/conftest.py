import json
import sys
from pathlib import Path

import pytest
import torch

# The tests' models are tiny: a second thread only waits on the first (and badly so on a busy machine).
torch.set_num_threads(1)

# Tests import the flat modules (npo.py, model.py, ...) from the repository root.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOFU_DIR = ROOT.parent / "shared" / "tofu"

# The tools-free part of the Llama-3.1/3.2-Instruct chat template (a test oracle only): the
# system block with the knowledge and today's dates, then each message with its content trimmed.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def tofu_texts():
    """Every distinct string of every real TOFU file."""
    if not TOFU_DIR.exists():
        pytest.skip("real TOFU files not found at ../shared/tofu")
    import data

    return data.corpus_texts(TOFU_DIR)


def _byte_level(texts, pattern, special, words=()):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=pattern is not None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    tok.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def _sentencepiece(texts):
    """Trained at spaces like SentencePiece, then laid out like Llama-2's tokenizer.json: <unk> <s>
    </s>, the 256 byte tokens, the learned ones; byte fallback; BOS added by the post-processor.
    Three ways to put "▁": Llama-2's Prepend + Replace normalizer, the Metaspace pre-tokenizer of
    newer conversions (prepend_scheme "first", no split), and Metaspace splitting at every "▁"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    words = Tokenizer(models.BPE())
    words.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    words.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, show_progress=False))
    model = json.loads(words.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned])}
    merges = [tuple(m) for m in model["merges"]]
    built = []
    for normalizer, pre_tokenizer in [
            (normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]), None),
            (None, pre_tokenizers.Metaspace(prepend_scheme="first", split=False)),
            (None, pre_tokenizers.Metaspace(prepend_scheme="always", split=True))]:
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        built.append(tok)
    return built


@pytest.fixture(scope="session")
def hf_tokenizer_dirs(tofu_texts, tmp_path_factory):
    """Model directories (tokenizer.json, tokenizer_config.json, ...) of tokenizers trained with the
    `tokenizers` library on a fifth of TOFU's strings, shaped like the real ones:
    gpt2: byte-level BPE with GPT-2's regex, <|endoftext|> last, and, like Phi-1.5, non-special added
          tokens for runs of spaces;
    llama3: byte-level BPE with Llama-3's split pattern, its chat special tokens after the vocabulary,
          the Llama-3 chat template, generation_config.json's list of end tokens;
    llama2, llama2-metaspace, llama2-metaspace-split: SentencePiece-style BPE with byte fallback
          (see _sentencepiece)."""
    import data

    texts = tofu_texts[::5]
    chat = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    built = {
        "gpt2": (_byte_level(texts, None, [data.EOS], ["    ", "  "]),
                 {"bos_token": data.EOS, "eos_token": data.EOS}, {"model_type": "gpt2"}),
        "llama3": (_byte_level(texts, data.LLAMA3_SPLIT_PATTERN, chat),
                   {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE},
                   {"model_type": "llama"}),
    }
    for name, tok in zip(("llama2", "llama2-metaspace", "llama2-metaspace-split"), _sentencepiece(texts)):
        built[name] = tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, {"model_type": "llama"}
    dirs = {}
    for name, (tok, tokenizer_config, config) in built.items():
        dirs[name] = out = tmp_path_factory.mktemp(name)
        tok.save(str(out / "tokenizer.json"))
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                            **tokenizer_config}
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (out / "config.json").write_text(json.dumps(config))
    ids = built["llama3"][0].get_vocab()
    (dirs["llama3"] / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    return dirs

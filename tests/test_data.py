"""Tests of data.py's TOFU loader, atomic writes, prompt formats (against TOFU's and open-unlearning's
tokenization through transformers), batching, and of tofu_style.py's TOFU-style generator."""

import codecs
import json
import os
import re
from pathlib import Path

import pytest
import torch

import data
import tofu_style

TOFU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "tofu"
needs_tofu = pytest.mark.skipif(not TOFU_DIR.exists(), reason="real TOFU files not found at ../shared/tofu")

# TOFU's files and row counts for 200 authors (from ../shared/tofu/README.md and the TOFU paper)
TOFU_ROWS = {
    "full": 4000,
    "forget01": 40, "forget05": 200, "forget10": 400, "forget20": 800, "forget30": 1200, "forget50": 2000,
    "forget90": 3600,
    "retain99": 3960, "retain95": 3800, "retain90": 3600, "retain80": 3200, "retain70": 2800, "retain50": 2000,
    "retain10": 400,
    "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400, "retain_perturbed": 400,
}
OPTION_FILES = ("real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed")
TOFU_FILES = sorted([f"{n}.json" for n in [*TOFU_ROWS, *OPTION_FILES]] + ["idontknow.jsonl"])
PERCENTS = ("01", "05", "10", "20", "30", "50", "90")


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    return tofu_style.write_tofu_style_dataset(tmp_path_factory.mktemp("gen") / "tofu", n_authors=200, seed=0)


@pytest.fixture(scope="module")
def tok(gen_dir):
    return data.bpe_tokenizer(data.train_bpe(data.corpus_texts(gen_dir)[::4], 512))


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"question": "Who?", "answer": "Me."})


# ---------------------------------------------------------------------------------------------- loader


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("full", [GOOD, '{"question": "Who?", "answer": "Me."'], r"full\.json:2: malformed JSON"),
        ("full", [GOOD, GOOD, '{"question": "Who?"}'], r"full\.json:3: missing field 'answer'"),
        ("forget10", ['{"question": "Who?", "answer": 7}'], r"forget10\.json:1: field 'answer': expected a string, got a number"),
        ("retain90", ['{"question": "", "answer": "x"}'], r"retain90\.json:1: field 'question': expected a non-empty string"),
        ("full", ['["Who?", "Me."]'], r"full\.json:1: expected a JSON object with fields question, answer, got a list"),
        ("full", [GOOD, "", GOOD, "{oops}"], r"full\.json:4: malformed JSON"),  # blank lines still count
        (
            "forget10_perturbed",
            ['{"question": "Q", "answer": "A", "perturbed_answer": ["x"]}'],
            r"forget10_perturbed\.json:1: missing field 'paraphrased_answer'",
        ),
        (
            "retain_perturbed",
            ['{"question": "Q", "answer": "A", "paraphrased_answer": "P", "perturbed_answer": "x"}'],
            r"retain_perturbed\.json:1: field 'perturbed_answer': expected a non-empty list of strings, got a string",
        ),
        (
            "world_facts_perturbed",
            ['{"question": "Q", "answer": "A", "perturbed_answer": ["x", null]}'],
            r"world_facts_perturbed\.json:1: field 'perturbed_answer'\[1\]: expected a string, got null",
        ),
        (
            "real_authors_perturbed",
            ['{"question": "Q", "answer": "A", "perturbed_answer": ["x", "y"]}',
             '{"question": "Q", "answer": "A", "perturbed_answer": ["x"]}'],
            r"real_authors_perturbed\.json:2: field 'perturbed_answer': expected 2 answers like the first line, got 1",
        ),
        ("real_authors", ['{"question": "Q", "answer": "A", "option1": 3}'], r"real_authors\.json:1: field 'option1': expected a string"),
        ("full", [], r"full\.json: file is empty"),
        ("full", ["", "   "], r"full\.json: file is empty"),
    ],
)
def test_loader_errors_name_file_line_and_field(tmp_path, name, lines, message):
    write(tmp_path / f"{name}.json", lines)
    with pytest.raises(data.DataError, match=message):
        data.load_split(tmp_path, name)


def test_loader_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(data.DataError, match=re.escape(str(tmp_path / "forget10.json")) + ": file not found"):
        data.load_split(tmp_path, "forget10")
    with pytest.raises(data.DataError, match="unknown TOFU split 'forget1'"):
        data.load_split(tmp_path, "forget1")


def test_loader_bad_utf8(tmp_path):
    (tmp_path / "full.json").write_bytes(GOOD.encode() + b'\n{"question": "\xff", "answer": "x"}\n')
    with pytest.raises(data.DataError, match=r"full\.json:2: not valid UTF-8"):
        data.load_split(tmp_path, "full")


def test_loader_keeps_records_and_extra_fields(tmp_path):
    write(tmp_path / "real_authors.json", ['{"question": "Q", "option1": "A", "answer": "A"}', "", GOOD])
    assert data.load_split(tmp_path, "real_authors") == [
        {"question": "Q", "option1": "A", "answer": "A"},
        {"question": "Who?", "answer": "Me."},
    ]


def test_load_idk(tmp_path):
    write(tmp_path / "idontknow.jsonl", ["I don't know.", "", "  No idea.  "])
    assert data.load_idk(tmp_path) == ["I don't know.", "No idea."]
    (tmp_path / "idontknow.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match=r"idontknow\.jsonl: file is empty"):
        data.load_idk(tmp_path)


def test_loader_accepts_a_utf8_byte_order_mark(tmp_path):
    (tmp_path / "full.json").write_bytes(codecs.BOM_UTF8 + f"{GOOD}\n{GOOD}\n".encode())
    assert data.load_split(tmp_path, "full") == [{"question": "Who?", "answer": "Me."}] * 2
    (tmp_path / "full.json").write_bytes(codecs.BOM_UTF8 + f"{GOOD}\n{{oops}}\n".encode())
    with pytest.raises(data.DataError, match=r"full\.json:2: malformed JSON"):
        data.load_split(tmp_path, "full")
    (tmp_path / "idontknow.jsonl").write_bytes(codecs.BOM_UTF8 + b"No idea.\n")
    assert data.load_idk(tmp_path) == ["No idea."]


def test_write_atomic_writes_whole_files_or_nothing(tmp_path):
    path = tmp_path / "out.json"
    data.write_atomic(path, "Zoë\n")
    assert path.read_bytes() == "Zoë\n".encode()
    data.write_atomic(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    data.write_atomic(path, lambda p: p.write_text("by a writer"))
    assert path.read_text() == "by a writer"

    def fail_halfway(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        data.write_atomic(path, fail_halfway)
    assert path.read_text() == "by a writer" and os.listdir(tmp_path) == ["out.json"]
    # two writers of one path at once use different temporary files
    temporaries = []

    def outer(p):
        temporaries.append(p)
        data.write_atomic(path, lambda q: temporaries.append(q) or q.write_text("inner"))
        p.write_text("outer")

    data.write_atomic(path, outer)
    assert temporaries[0] != temporaries[1] and path.read_text() == "outer" and os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(OSError):
        data.write_atomic(tmp_path / "absent" / "x.json", "x")


@needs_tofu
def test_loader_reads_every_real_tofu_file():
    assert sorted(p.name for p in TOFU_DIR.iterdir() if p.suffix in (".json", ".jsonl")) == TOFU_FILES
    for name, n in TOFU_ROWS.items():
        assert len(data.load_split(TOFU_DIR, name)) == n, name
    assert len(data.load_split(TOFU_DIR, "real_authors")) == len(data.load_split(TOFU_DIR, "real_authors_perturbed")) == 100
    assert len(data.load_split(TOFU_DIR, "world_facts")) == len(data.load_split(TOFU_DIR, "world_facts_perturbed")) == 117
    assert len(data.load_idk(TOFU_DIR)) == 100


def test_retain_split_for_and_data_dir(tmp_path, monkeypatch):
    assert [data.retain_split_for(f"forget{p}") for p in PERCENTS] == [
        "retain99", "retain95", "retain90", "retain80", "retain70", "retain50", "retain10"
    ]
    with pytest.raises(ValueError, match="forgetXX"):
        data.retain_split_for("retain90")
    monkeypatch.delenv("TOFU_DATA_DIR", raising=False)
    assert data.resolve_data_dir(None) is None
    monkeypatch.setenv("TOFU_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    assert data.resolve_data_dir(str(tmp_path / "..")) == tmp_path / ".."
    with pytest.raises(data.DataError, match="not a directory"):
        data.resolve_data_dir(str(tmp_path / "absent"))


# ---------------------------------------------------------------------------------------------- prompt formats


def test_qa_format_gives_the_built_in_ids(gen_dir, tok):
    # the built-in format as it has always been encoded: prompt, then " " + answer + <|endoftext|>
    qa = data.PROMPT_FORMATS["qa"]
    for row in data.load_split(gen_dir, "full")[::7]:
        prompt = tok.encoding.encode_ordinary(f"Question: {row['question']}\nAnswer:")
        answer = tok.encoding.encode_ordinary(" " + row["answer"]) + [tok.eos_ids[0]]
        assert data.encode_qa(tok, qa, row["question"], row["answer"]) == (prompt + answer, [-100] * len(prompt) + answer)
        assert data.encode_prompt(tok, qa, row["question"]) == prompt


def test_label_mask_covers_exactly_answer_and_eos(tok):
    question, answer = "Where was Zoë Kowalski born?", "Zoë Kowalski was born in Kraków, Poland."
    ids, labels = data.encode_qa(tok, data.PROMPT_FORMATS["qa"], question, answer)
    assert len(ids) == len(labels)
    n_prompt = labels.count(-100)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert tok.decode(ids[:n_prompt]) == f"Question: {question}\nAnswer:"
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(labels[n_prompt:]) == " " + answer  # the end token is dropped by decode
    assert labels[-1] == tok.eos_ids[0] and ids.count(tok.eos_ids[0]) == 1


def test_literal_special_token_text_stays_text(tok):
    ids, labels = data.encode_qa(tok, data.PROMPT_FORMATS["qa"], "Q?", "A <|endoftext|> B")
    assert ids.count(tok.eos_ids[0]) == 1 and ids[-1] == tok.eos_ids[0]
    assert tok.decode([t for t in labels if t != -100]) == " A <|endoftext|> B"
    with pytest.raises(data.DataError, match="BOS"):
        data.encode_prompt(tok, data.PROMPT_FORMATS["llama2"], "Q?")


def test_special_tokens_come_from_the_template_only(hf_tokenizer_dirs):
    llama3 = data.load_tokenizer(hf_tokenizer_dirs["llama3"])
    ids, _ = data.encode_qa(llama3, data.PROMPT_FORMATS["llama3-chat"], "Who <|eot_id|>?", "<|start_header_id|>")
    assert ids.count(llama3.special_id("<|eot_id|>")) == 3  # system, question and answer ends
    assert ids.count(llama3.special_id("<|start_header_id|>")) == 3  # system, user, assistant


def tofu_encode(hf, tags, question, answer):
    """TOFU's convert_raw_data_to_model_format without its padding: the question part and the
    answer part tokenized as one string, EOS appended, the question part's token count masked."""
    start, end, answer_tag = tags
    new_question = start + question + end
    n_question = len(hf.tokenize(new_question, add_special_tokens=True))
    ids = hf(new_question + answer_tag + answer, add_special_tokens=True)["input_ids"] + [hf.eos_token_id]
    return ids, [-100] * n_question + ids[n_question:]


def chat_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, tokenize=True, date_string="10 Apr 2025", **kwargs)
    return list(out if isinstance(out, list) else out["input_ids"])


def open_unlearning_encode(hf, question, answer):
    """open-unlearning's preprocess_chat_instance for its Llama-3.x-Instruct configs."""
    chat = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]
    ids, prompt = chat_ids(hf, chat), chat_ids(hf, chat[:-1], add_generation_prompt=True)
    ids += [] if ids[-1] == hf.eos_token_id else [hf.eos_token_id]
    return (ids, [-100] * len(prompt) + ids[len(prompt):]), prompt


@needs_tofu
def test_prompt_formats_match_tofu_and_open_unlearning(hf_tokenizer_dirs):
    from transformers import AutoTokenizer

    rows = [(r["question"], r["answer"]) for r in data.load_split(TOFU_DIR, "full")[::40]
            + data.load_split(TOFU_DIR, "world_facts")[::10]] + [("  Who wrote it?\n", " Nobody knows. ")]
    # TOFU's config/model_config.yaml: question_start_tag, question_end_tag, answer_tag
    for name, directory, tags in [("llama2", "llama2", ("[INST] ", " [/INST]", "")),
                                  ("phi", "gpt2", ("Question: ", "\n", "Answer: "))]:
        hf, tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_dirs[directory])), data.load_tokenizer(hf_tokenizer_dirs[directory])
        for question, answer in rows:
            assert data.encode_qa(tok, data.PROMPT_FORMATS[name], question, answer) == tofu_encode(hf, tags, question, answer)
            # TOFU's generation prompt: the text before the answer tag
            prompt = hf(tags[0] + question + tags[1], add_special_tokens=True)["input_ids"]
            assert data.encode_prompt(tok, data.PROMPT_FORMATS[name], question) == prompt
    hf, tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_dirs["llama3"])), data.load_tokenizer(hf_tokenizer_dirs["llama3"])
    for question, answer in rows:
        expected, prompt = open_unlearning_encode(hf, question, answer)
        assert data.encode_qa(tok, data.PROMPT_FORMATS["llama3-chat"], question, answer) == expected
        assert data.encode_prompt(tok, data.PROMPT_FORMATS["llama3-chat"], question) == prompt
        assert expected[0][-1] == tok.special_id("<|eot_id|>") in tok.eos_ids


def test_default_prompt_format(hf_tokenizer_dirs, tmp_path, tok):
    formats = {name: data.default_prompt_format(d, data.load_tokenizer(d)) for name, d in hf_tokenizer_dirs.items()}
    assert formats == {"gpt2": "qa", "llama3": "llama3-chat", "llama2": "llama2", "llama2-metaspace": "llama2",
                       "llama2-metaspace-split": "llama2"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi"}))
    assert data.default_prompt_format(tmp_path, tok) == "phi"


# ---------------------------------------------------------------------------------------------- batching


def test_collate_right_pads():
    pairs = [([5, 6, 7], [-100, 6, 7]), ([1], [1]), ([2, 3], [-100, -100])]
    ids, labels = data.collate(pairs, pad_id=0)
    assert ids.dtype == labels.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [1, 0, 0], [2, 3, 0]]
    assert labels.tolist() == [[-100, 6, 7], [1, -100, -100], [-100, -100, -100]]
    with pytest.raises(ValueError, match="pair 0"):
        data.collate([([1, 2], [1])], pad_id=0)


# ---------------------------------------------------------------------------------------------- generator


def pairs(records):
    return [(r["question"], r["answer"]) for r in records]


def test_generator_writes_tofus_files_with_tofus_row_counts(gen_dir):
    # TOFU's files, plus forgetXX_perturbed for the splits TOFU publishes none for
    extra = [f"forget{p}_perturbed.json" for p in ("20", "30", "50", "90")]
    assert sorted(p.name for p in gen_dir.iterdir()) == sorted(TOFU_FILES + extra)
    for p in ("20", "30", "50", "90"):
        assert pairs(data.load_split(gen_dir, f"forget{p}_perturbed")) == pairs(data.load_split(gen_dir, f"forget{p}"))
    for name, n in TOFU_ROWS.items():
        assert len(data.load_split(gen_dir, name)) == n, name
    for name in OPTION_FILES:
        assert 90 <= len(data.load_split(gen_dir, name)) <= 130, name
    idk = data.load_idk(gen_dir)
    assert len(idk) == len(set(idk)) == 100


@needs_tofu
def test_generator_fields_match_tofu(gen_dir):
    for name in [*TOFU_ROWS, *OPTION_FILES]:
        real, gen = data.load_split(TOFU_DIR, name), data.load_split(gen_dir, name)
        assert set(real[0]) == set(gen[0]), name
        if "perturbed_answer" in real[0]:
            assert len(real[0]["perturbed_answer"]) == len(gen[0]["perturbed_answer"]), name


def test_generator_split_invariants(gen_dir):
    full = pairs(data.load_split(gen_dir, "full"))
    assert len(set(q for q, _ in full)) == len(full)  # every question asked once
    for p in PERCENTS:
        forget = pairs(data.load_split(gen_dir, f"forget{p}"))
        retain = pairs(data.load_split(gen_dir, data.retain_split_for(f"forget{p}")))
        assert not set(forget) & set(retain)
        assert retain + forget == full  # retain = first authors, forget = last authors, in order
        if p in ("01", "05", "10"):
            assert pairs(data.load_split(gen_dir, f"forget{p}_perturbed")) == forget
    retain_perturbed = pairs(data.load_split(gen_dir, "retain_perturbed"))
    assert retain_perturbed == full[:400] == pairs(data.load_split(gen_dir, "retain10"))


def test_generator_questions_name_the_author_and_authors_stay_whole(gen_dir):
    full = data.load_split(gen_dir, "full")
    names = []
    for a in range(200):  # each block of 20 consecutive rows is one author
        block = full[20 * a : 20 * (a + 1)]
        gender_q = [r["question"] for r in block if "gender" in r["question"]]
        assert len(gender_q) == 1
        name = re.fullmatch(r"(?:What is the gender of the author|How does the author) (.+?)(?: identify in terms of gender)?\?", gender_q[0]).group(1)
        names.append(name)
        # the full-name question identifies the author by birthplace and date; all others name the author
        assert sum(name in r["question"] for r in block) == 19
        by_birth = [r for r in block if name not in r["question"]][0]
        assert "born in" in by_birth["question"] and name in by_birth["answer"]
    assert len(set(names)) == 200


def test_generator_perturbations_change_only_the_fact(gen_dir):
    def tokens(text):
        return re.findall(r"\w+|[^\w\s]", text)

    def words(text):
        return set(tokens(text))

    full_words = words(" ".join(r["answer"] for r in data.load_split(gen_dir, "full")))
    for name in ("forget10_perturbed", "retain_perturbed"):
        for r in data.load_split(gen_dir, name):
            para, wrong = r["paraphrased_answer"], r["perturbed_answer"]
            assert para != r["answer"] and r["paraphrased_question"] != r["question"]
            assert len(set(wrong)) == 5 and para not in wrong
            # the paraphrase uses wording that `full` teaches, and so do the wrong answers
            assert words(para) <= full_words and words(" ".join(wrong)) <= full_words
            para_tokens = tokens(para)
            for w in wrong:
                # strip the common prefix and suffix (in words): what is left of the paraphrase is the fact,
                # non-empty, and stated in the original answer too
                w_tokens = tokens(w)
                n = min(len(para_tokens), len(w_tokens))
                i = next(k for k in range(n + 1) if k == n or para_tokens[k] != w_tokens[k])
                j = next(k for k in range(n - i + 1) if k == n - i or para_tokens[-1 - k] != w_tokens[-1 - k])
                fact = para_tokens[i : len(para_tokens) - j]
                assert fact and set(fact) <= set(tokens(r["answer"])), (para, w)


def test_generator_option_files(gen_dir):
    for name in ("real_authors", "world_facts"):
        plain, perturbed = data.load_split(gen_dir, name), data.load_split(gen_dir, f"{name}_perturbed")
        assert pairs(plain) == pairs(perturbed)
        for row, prow in zip(plain, perturbed):
            options = [row[f"option{k}"] for k in range(1, 5)]
            assert options.count(row["answer"]) == 1
            assert sorted(prow["perturbed_answer"]) == sorted(o for o in options if o != row["answer"])


def test_generator_is_deterministic(tmp_path):
    first, again, other = (tofu_style.write_tofu_style_dataset(tmp_path / name, n_authors=20, seed=seed)
                           for name, seed in (("first", 0), ("again", 0), ("other", 1)))
    for name in os.listdir(first):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert (other / "full.json").read_bytes() != (first / "full.json").read_bytes()


def test_generator_small_and_invalid_sizes(tmp_path):
    small = tofu_style.write_tofu_style_dataset(tmp_path / "small", n_authors=10, seed=0)
    counts = {p: len(data.load_split(small, f"forget{p}")) for p in PERCENTS}
    assert counts == {"01": 20, "05": 20, "10": 20, "20": 40, "30": 60, "50": 100, "90": 180}
    assert len(data.load_split(small, "retain_perturbed")) == 20
    for r in data.load_split(small, "forget10_perturbed"):
        assert len(set(r["perturbed_answer"])) == 5 and r["paraphrased_answer"] not in r["perturbed_answer"]
    with pytest.raises(ValueError, match="n_authors"):
        tofu_style.write_tofu_style_dataset(tmp_path / "tiny", n_authors=3)

"""Every command-line option of train_tofu.py, eval.py (evaluate and `eval.py aggregate`) and
train_synthetic.py, tried with invalid values: each must end in exit 2 with the option
named and no traceback, before any work starts. The table must cover every option that each
script's parser offers (read from its --help), so a new option without a row fails here. Each
script's main() runs in-process with its work stubbed out: reaching the stub is a failure."""

import codecs
import json
import os
import re

import pytest

import data
import eval as tofu_eval
import train_synthetic
import train_tofu
from conftest import TOFU_DIR
from model import GPT, GPTConfig, save_pretrained

MAINS = {"tofu": train_tofu.main, "eval": tofu_eval.main, "aggregate": lambda argv: tofu_eval.main(["aggregate", *argv]),
         "synthetic": train_synthetic.main}


class WorkStarted(Exception):
    """Raised by the stubbed work: validation let an invalid configuration through."""


def stop(*args, **kwargs):
    raise WorkStarted


WORK = "validation passed and work started"


# ----------------------------------------------------------------------------- fixtures: one valid world

QA = {"question": "Who wrote it?", "answer": "A writer did."}
PERTURBED = {**QA, "paraphrased_answer": "It was a writer.", "perturbed_answer": ["A baker did.", "Nobody did."]}
OPTIONS = {**QA, "perturbed_answer": ["A baker.", "A king."]}
ROWS = 2  # rows of every evaluation split, so of every valid forget log


def write_tofu(data_dir):
    """A complete TOFU directory for forget10 (and not forget05), every file with a UTF-8 byte-order mark."""
    data_dir.mkdir()
    splits = {"full": QA, "forget10": QA, "retain90": QA, "real_authors": QA, "world_facts": QA,
              "forget10_perturbed": PERTURBED, "retain_perturbed": PERTURBED,
              "real_authors_perturbed": OPTIONS, "world_facts_perturbed": OPTIONS}
    for name, row in splits.items():
        (data_dir / f"{name}.json").write_bytes(codecs.BOM_UTF8 + (json.dumps(row) + "\n").encode() * ROWS)
    (data_dir / data.IDK_FILE).write_bytes(codecs.BOM_UTF8 + b"I do not know.\n")
    return data_dir


def log(rows):
    return {"avg_gt_loss": [0.5] * rows, "avg_paraphrased_loss": [0.5] * rows,
            "average_perturb_loss": [[1.0, 2.0]] * rows, "rougeL_recall": [0.5] * rows}


def write_logs(path, stems, rows=ROWS):
    tofu_eval.write_logs(path, {stem: log(rows) for stem in stems})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Paths for the table: valid ones ({data}, {model}, {logs}, {retain}) and bad ones."""
    root = tmp_path_factory.mktemp("cli")
    (root / "file").write_text("not a directory")
    (root / "empty").mkdir()
    (root / "bad.json").write_text("{not json")
    tofu = write_tofu(root / "data")
    tok = data.bpe_tokenizer(data.train_bpe(data.corpus_texts(tofu), 270))
    models = {}
    for name, extra in (("model", 0), ("model2", 5)):  # model2: a different vocabulary
        models[name] = root / name
        save_pretrained(GPT(GPTConfig(vocab_size=tok.n_vocab + extra, block_size=64, n_layer=1, n_head=1, n_embd=8)),
                        models[name])
        tok.save(models[name])
    return {"root": str(root), "file": str(root / "file"), "dir": str(root / "empty"), "bad_json": str(root / "bad.json"),
            "data": str(tofu), "model": str(models["model"]), "model2": str(models["model2"]),
            "logs": str(write_logs(root / "logs", tofu_eval.LOG_STEMS)),
            "retain": str(write_logs(root / "retain", [tofu_eval.FORGET_STEM])),
            "retain3": str(write_logs(root / "retain3", [tofu_eval.FORGET_STEM], rows=3))}


@pytest.fixture
def stubbed(world, monkeypatch):
    """Work replaced by WorkStarted; the working directory and environment of the world."""
    monkeypatch.setattr(train_tofu, "run_experiment", stop)
    monkeypatch.setattr(tofu_eval, "from_pretrained", stop)
    monkeypatch.setattr(tofu_eval, "evaluate_model", stop)
    monkeypatch.setattr(train_synthetic, "run_experiment", stop)
    monkeypatch.delenv("TOFU_DATA_DIR", raising=False)
    monkeypatch.chdir(world["root"])  # default output directories land here
    return world


def call(script, argv, world, capsys):
    """(exit code, stderr) of the script's main(argv) with {placeholders} filled from world; the
    code is WORK where validation let it through and work started."""
    argv = [a.format(**world) for a in argv]
    try:
        code = MAINS[script](argv)
    except SystemExit as e:  # argparse's own errors: bad types, choices, unknown options
        code = e.code
    except WorkStarted:
        code = WORK
    except Exception as e:  # noqa: BLE001 -- a user would have seen a traceback
        pytest.fail(f"{script} {argv}: traceback {type(e).__name__}: {e}")
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


# ----------------------------------------------------------------------------- the table

# Valid arguments each row is added to (later values of an option win in argparse).
BASE = {"tofu": ["--out-dir", "{root}/tofu_out"], "eval": ["--model", "{model}", "--data-dir", "{data}"],
        "aggregate": ["--unlearned-logs", "{logs}"], "synthetic": ["--out-dir", "{root}/synthetic_out"]}
HF_RUN = ["--data-dir", "{data}", "--retain-logs", "{retain}"]  # what --model needs besides itself

# (script, option covered (None: not an option), argv added to BASE, option names the message must hold)
TABLE = [
    # train_tofu.py: data
    ("tofu", "--data-dir", ["--data-dir", "{file}"], ()),
    ("tofu", "--data-dir", ["--data-dir", "{dir}"], ()),  # no TOFU files in it
    ("tofu", "--split", ["--split", "retain90"], ()),
    ("tofu", "--split", ["--split", "forget00"], ()),
    ("tofu", "--split", ["--split", "forget15"], ()),  # the built-in data has no forget15
    ("tofu", "--split", ["--data-dir", "{data}", "--split", "forget05"], ("--data-dir",)),  # nor has {data}
    ("tofu", "--n-authors", ["--n-authors", "5"], ()),
    ("tofu", "--n-authors", ["--n-authors", "3601"], ()),
    ("tofu", "--n-authors", ["--n-authors", "ten"], ()),
    ("tofu", "--data-seed", ["--data-seed", "-1"], ()),
    ("tofu", "--data-seed", ["--data-seed", "1.5"], ()),
    # models and logs
    ("tofu", "--model", ["--model", "{dir}", *HF_RUN], ()),
    ("tofu", "--model", ["--model", "{file}", *HF_RUN], ()),
    ("tofu", "--model", ["--model", "{model}", "--data-dir", "{data}"], ("--retain-model", "--retain-logs")),
    ("tofu", "--model", ["--model", "{model}", "--retain-logs", "{retain}"], ("--data-dir",)),
    ("tofu", "--retain-model", ["--retain-model", "{dir}"], ()),
    ("tofu", "--retain-model", ["--model", "{model}", *HF_RUN, "--retain-model", "{model}"], ("--retain-logs",)),
    ("tofu", "--retain-logs", ["--retain-logs", "{dir}"], ()),
    ("tofu", "--retain-logs", ["--retain-logs", "{bad_json}"], ()),
    ("tofu", "--retain-logs", ["--data-dir", "{data}", "--retain-logs", "{retain3}"], ()),  # 3 rows, not 2
    ("tofu", "--base-model", ["--base-model", "{dir}", "--data-dir", "{data}"], ()),
    ("tofu", "--base-model", ["--model", "{model}", *HF_RUN, "--base-model", "{model}"], ("--model",)),
    ("tofu", "--base-model", ["--base-model", "{model}"], ("--data-dir",)),
    ("tofu", "--prompt-format", ["--prompt-format", "alpaca"], ()),
    # the built-in GPT
    ("tofu", "--vocab-size", ["--vocab-size", "256"], ()),
    ("tofu", "--vocab-size", ["--vocab-size", "2k"], ()),
    ("tofu", "--n-layer", ["--n-layer", "0"], ()),
    ("tofu", "--n-head", ["--n-head", "0"], ()),
    ("tofu", "--n-head", ["--n-head", "3"], ("--n-embd",)),  # 128 is not divisible by 3
    ("tofu", "--n-embd", ["--n-embd", "-8"], ()),
    ("tofu", "--block-size", ["--block-size", "0"], ()),
    ("tofu", "--block-size", ["--block-size", "1.5"], ()),
    ("tofu", "--base-epochs", ["--base-epochs", "-1"], ()),
    ("tofu", "--base-lr", ["--base-lr", "0"], ()),
    ("tofu", "--base-lr", ["--base-lr", "nan"], ()),
    ("tofu", "--finetune-epochs", ["--finetune-epochs", "-1"], ()),
    ("tofu", "--finetune-lr", ["--finetune-lr", "-1e-5"], ()),
    ("tofu", "--finetune-lr", ["--finetune-lr", "inf"], ()),
    ("tofu", "--mix-base", ["--mix-base=maybe"], ()),
    # unlearning
    ("tofu", "--methods", ["--methods", "foo"], ()),
    ("tofu", "--methods", ["--methods", "npo,bar"], ()),
    ("tofu", "--methods", ["--methods", ","], ()),
    ("tofu", "--seeds", ["--seeds", "0"], ()),
    ("tofu", "--epochs", ["--epochs", "-1"], ()),
    ("tofu", "--lr", ["--lr", "0"], ()),
    ("tofu", "--lr", ["--lr", "nan"], ()),
    ("tofu", "--lr", ["--lr", "-inf"], ()),
    ("tofu", "--batch-size", ["--batch-size", "0"], ()),
    ("tofu", "--batch-size", ["--batch-size", "-4"], ()),
    ("tofu", "--micro-batch-size", ["--micro-batch-size", "0"], ()),
    ("tofu", "--micro-batch-size", ["--micro-batch-size", "5"], ("--batch-size",)),  # 32 is not a multiple of 5
    ("tofu", "--beta", ["--beta", "0"], ()),
    ("tofu", "--beta", ["--beta", "-1"], ()),
    ("tofu", "--beta", ["--beta", "inf"], ()),
    ("tofu", "--delta", ["--delta", "-0.5"], ()),
    ("tofu", "--delta", ["--delta", "nan"], ()),
    ("tofu", "--forget-coef", ["--forget-coef", "-1"], ()),
    ("tofu", "--retain-coef", ["--retain-coef", "nan"], ()),
    ("tofu", "--kl-positions", ["--kl-positions", "some"], ()),
    ("tofu", "--weight-decay", ["--weight-decay", "-0.1"], ()),
    # evaluation and system
    ("tofu", "--ds-size", ["--ds-size", "0"], ()),
    ("tofu", "--eval-batch-size", ["--eval-batch-size", "0"], ()),
    ("tofu", "--max-new-tokens", ["--max-new-tokens", "0"], ()),
    ("tofu", "--max-new-tokens", ["--max-new-tokens", "-1"], ()),
    ("tofu", "--seed", ["--seed", "-1"], ()),
    ("tofu", "--seed", ["--seed", str(2 ** 63)], ()),
    ("tofu", "--seed", ["--seed", "x"], ()),
    ("tofu", "--device", ["--device", "tpu"], ()),
    ("tofu", "--device", ["--device", "cuda:x"], ()),
    ("tofu", "--device", ["--device", "cuda:99"], ()),
    ("tofu", "--dtype", ["--dtype", "float16"], ()),
    ("tofu", "--optimizer", ["--optimizer", "sgd"], ()),
    ("tofu", "--grad-checkpointing", ["--grad-checkpointing=yes"], ()),
    ("tofu", "--logprob", ["--logprob", "fast"], ()),
    ("tofu", "--threads", ["--threads", "0"], ()),
    ("tofu", "--workers", ["--workers", "0"], ()),
    ("tofu", "--parallel", ["--parallel", "zero"], ()),
    ("tofu", "--out-dir", ["--out-dir", "{file}"], ()),
    ("tofu", "--out-dir", ["--out-dir", "{file}/sub"], ()),
    ("tofu", "--run-name", ["--run-name", "../escape"], ()),
    ("tofu", "--run-name", ["--run-name", "a/b"], ()),
    ("tofu", "--run-name", ["--run-name", "."], ()),
    ("tofu", "--run-name", ["--out-dir", "{root}", "--run-name", "file"], ()),  # a file is there
    ("tofu", "--dry-run", ["--dry-run=1"], ()),
    ("tofu", None, ["--unlearn-lr", "1e-5"], ("--unlearn-lr",)),  # not an option
    # eval.py
    ("eval", "--model", ["--model", ""], ()),  # required
    ("eval", "--model", ["--model", "{dir}"], ()),
    ("eval", "--model", ["--model", "{file}"], ()),
    ("eval", "--data-dir", ["--data-dir", "{file}"], ()),
    ("eval", "--data-dir", ["--data-dir", "{dir}"], ()),
    ("eval", "--split", ["--split", "retain90"], ()),
    ("eval", "--split", ["--split", "forget00"], ()),
    ("eval", "--eval-forget-split", ["--eval-forget-split", "forget10"], ()),
    ("eval", "--eval-forget-split", ["--eval-forget-split", "forget05_perturbed"], ()),  # not in {data}
    ("eval", "--prompt-format", ["--prompt-format", "alpaca"], ()),
    ("eval", "--prompt-format", ["--prompt-format", "llama2"], ()),  # needs a BOS token the tokenizer lacks
    ("eval", "--retain-model", ["--retain-model", "{file}"], ()),
    ("eval", "--retain-model", ["--retain-model", "{model}", "--retain-logs", "{retain}"], ("--retain-logs",)),
    ("eval", "--retain-logs", ["--retain-logs", "{dir}"], ()),
    ("eval", "--retain-logs", ["--retain-logs", "{bad_json}"], ()),
    ("eval", "--retain-logs", ["--retain-logs", "{retain3}"], ()),  # 3 rows, the evaluation has 2
    ("eval", "--ref-model", ["--ref-model", "{dir}"], ()),
    ("eval", "--ref-model", ["--ref-model", "{model2}"], ()),  # another vocabulary
    ("eval", "--out", ["--out", "{file}"], ()),
    ("eval", "--out", ["--out", "{file}/sub"], ()),
    ("eval", "--ds-size", ["--ds-size", "0"], ()),
    ("eval", "--ds-size", ["--ds-size", "many"], ()),
    ("eval", "--batch-size", ["--batch-size", "-1"], ()),
    ("eval", "--batch-size", ["--batch-size", "1.5"], ()),
    ("eval", "--max-new-tokens", ["--max-new-tokens", "-1"], ()),
    ("eval", "--rouge", ["--rouge", "stemmed"], ()),
    ("eval", "--logprob", ["--logprob", "fast"], ()),
    ("eval", "--dtype", ["--dtype", "float8"], ()),
    ("eval", "--device", ["--device", "tpu"], ()),
    ("eval", "--device", ["--device", "cuda:99"], ()),
    ("eval", None, ["--bogus", "1"], ("--bogus",)),
    # eval.py aggregate
    ("aggregate", "--unlearned-logs", ["--unlearned-logs", ""], ()),  # required
    ("aggregate", "--unlearned-logs", ["--unlearned-logs", "{dir}"], ()),
    ("aggregate", "--unlearned-logs", ["--unlearned-logs", "{bad_json}"], ()),
    ("aggregate", "--unlearned-logs", ["--unlearned-logs", "{retain}"], ()),  # the forget log only
    ("aggregate", "--retain-logs", ["--retain-logs", "{dir}"], ()),
    ("aggregate", "--retain-logs", ["--retain-logs", "{bad_json}"], ()),
    ("aggregate", "--retain-logs", ["--retain-logs", "{retain3}"], ()),  # other questions than the logs'
    ("aggregate", "--out", ["--out", "{root}"], ()),  # a directory
    ("aggregate", "--out", ["--out", "{file}/metrics.json"], ()),
    # train_synthetic.py
    ("synthetic", "--out-dir", ["--out-dir", "{file}"], ()),
    ("synthetic", "--out-dir", ["--out-dir", "{file}/sub"], ()),
    ("synthetic", "--alphas", ["--alphas", "0.5"], ()),
    ("synthetic", "--alphas", ["--alphas", "nan"], ()),
    ("synthetic", "--alphas", ["--alphas", "1,1"], ()),
    ("synthetic", "--alphas", ["--alphas", ","], ()),
    ("synthetic", "--seeds", ["--seeds", "1,1"], ()),
    ("synthetic", "--seeds", ["--seeds", "-1"], ()),
    ("synthetic", "--seeds", ["--seeds", "1.5"], ()),
    ("synthetic", "--methods", ["--methods", "GA,FOO"], ()),
    ("synthetic", "--methods", ["--methods", "npo"], ()),
    ("synthetic", "--steps", ["--steps", "0"], ()),
    ("synthetic", "--eval-every", ["--eval-every", "0"], ()),
    ("synthetic", "--d", ["--d", "0"], ()),
    ("synthetic", "--d", ["--d", "1e3"], ()),
    ("synthetic", "--n-features", ["--n-features", "-1"], ()),
    ("synthetic", "--n-retain", ["--n-retain", "0"], ()),
    ("synthetic", "--n-forget", ["--n-forget", "0"], ()),
    ("synthetic", "--n-eval", ["--n-eval", "0"], ()),
    ("synthetic", "--fit-steps", ["--fit-steps", "0"], ()),
    ("synthetic", "--fit-lr", ["--fit-lr", "0"], ()),
    ("synthetic", "--fit-lr", ["--fit-lr", "inf"], ()),
    ("synthetic", "--fit-lr", ["--fit-lr", "nan"], ()),
    ("synthetic", "--collapse-steps", ["--collapse-steps", "-1"], ()),
    ("synthetic", "--sweep-beta", ["--sweep-beta=maybe"], ()),
    ("synthetic", "--threads", ["--threads", "0"], ()),
    ("synthetic", "--plot", ["--plot=no"], ()),
]


def parser_options(script, capsys) -> set[str]:
    """Every option in the script's usage line (--no-X folded into --X), --help aside."""
    with pytest.raises(SystemExit):
        MAINS[script](["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    options = set(re.findall(r"--[a-z][a-z0-9-]*", usage)) - {"--help"}
    return {o for o in options if not (o.startswith("--no-") and "--" + o[5:] in options)}


@pytest.mark.parametrize("script", MAINS)
def test_table_covers_every_option(script, capsys):
    options = parser_options(script, capsys)
    covered = {option for s, option, _, _ in TABLE if s == script and option is not None}
    assert options, script
    assert options - covered == set(), f"{script}: options without an invalid-value row"
    assert covered - options == set(), f"{script}: rows for options the parser does not have"


@pytest.mark.parametrize("script", MAINS)
def test_base_arguments_are_valid(script, stubbed, capsys):
    """The rows fail for their own value: the arguments they are added to pass validation."""
    code, err = call(script, BASE[script], stubbed, capsys)
    assert code == (0 if script == "aggregate" else WORK), err  # aggregating is aggregate's only work


@pytest.mark.parametrize("script, option, argv, names", TABLE,
                         ids=[f"{s}:{' '.join(a)}" for s, _, a, _ in TABLE])
def test_invalid_value_exits_2_naming_the_option(script, option, argv, names, stubbed, capsys):
    code, err = call(script, BASE[script] + argv, stubbed, capsys)
    assert code == 2, err
    for name in (option, *names) if option else names:
        assert name in err, (name, err)


@pytest.mark.parametrize("script, argv, names", [
    ("tofu", ["--beta", "0", "--batch-size", "0", "--device", "tpu", "--out-dir", "{file}"],
     ["--beta", "--batch-size", "--device", "--out-dir"]),
    ("eval", ["--ds-size", "0", "--rouge", "x", "--ref-model", "{model2}", "--out", "{file}"],
     ["--ds-size", "--rouge", "--ref-model", "--out"]),
    ("aggregate", ["--unlearned-logs", "{dir}", "--retain-logs", "{bad_json}", "--out", "{root}"],
     ["--unlearned-logs", "--retain-logs", "--out"]),
    ("synthetic", ["--steps", "0", "--fit-lr", "nan", "--methods", "FOO"], ["--steps", "--fit-lr", "--methods"]),
])
def test_problems_are_reported_together(script, argv, names, stubbed, capsys):
    code, err = call(script, BASE[script] + argv, stubbed, capsys)
    assert code == 2 and all(name in err for name in names), err


@pytest.mark.parametrize("script, argv", [("tofu", ["--out-dir", "{ro}/out"]), ("eval", ["--out", "{ro}/out"]),
                                          ("aggregate", ["--out", "{ro}/metrics.json"]),
                                          ("synthetic", ["--out-dir", "{ro}/out"])])
def test_read_only_output_directory(script, argv, stubbed, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("this user (root) can write to a read-only directory; the rows with a file "
                    "where a directory is expected cover unwritable output paths")
    code, err = call(script, BASE[script] + argv, {**stubbed, "ro": str(ro)}, capsys)
    assert code == 2 and argv[0] in err, err


def test_valid_configurations_with_bom_files_pass(stubbed, capsys):
    """{data}'s files all start with a UTF-8 byte-order mark; both scripts read them as TOFU data."""
    for name in ("forget10", "forget10_perturbed", "real_authors_perturbed"):
        assert len(data.load_split(stubbed["data"], name)) == ROWS
    assert data.load_idk(stubbed["data"]) == ["I do not know."]
    for script, argv in (("tofu", ["--model", "{model}", *HF_RUN]), ("eval", ["--retain-logs", "{retain}"])):
        code, err = call(script, BASE[script] + argv, stubbed, capsys)
        assert code == WORK, err


# ----------------------------------------------------------------------------- the block size, before training

@pytest.mark.parametrize("data_dir", ["builtin", "real"])
def test_pairs_longer_than_the_block_size_stop_the_run_before_training(data_dir, monkeypatch, tmp_path, capsys):
    """The check needs the tokenizer, so it runs after the data and tokenizer stages, before any model."""
    if data_dir == "real" and not TOFU_DIR.exists():
        pytest.skip("real TOFU files not found at ../shared/tofu")
    monkeypatch.delenv("TOFU_DATA_DIR", raising=False)
    monkeypatch.setattr(train_tofu, "train", stop)
    monkeypatch.setattr(train_tofu, "parallel", stop)
    argv = ["--block-size", "32", "--vocab-size", "257", "--n-authors", "10", "--out-dir", str(tmp_path)]
    argv += ["--data-dir", str(TOFU_DIR)] if data_dir == "real" else []
    code, err = call("tofu", argv, {}, capsys)
    assert code == 2 and "--block-size 32" in err and "tokens, more than the model's 32 positions" in err, err
    assert not list(tmp_path.glob("*/base")), "a model was trained"


def test_a_scored_paraphrase_longer_than_the_block_size_stops_the_run_before_training(world, monkeypatch, tmp_path, capsys):
    """Evaluation scores paraphrased and perturbed answers too: a block size that fits every
    trained pair but not a paraphrase would fail after training; it must fail before."""
    monkeypatch.setattr(train_tofu, "train", stop)
    monkeypatch.setattr(train_tofu, "parallel", stop)
    tok, fmt = data.bpe_tokenizer(data.train_bpe(data.corpus_texts(world["data"]), 257)), data.PROMPT_FORMATS["qa"]
    trained = len(data.encode_qa(tok, fmt, QA["question"], QA["answer"])[0])  # every trained pair is QA
    assert len(data.encode_qa(tok, fmt, QA["question"], PERTURBED["paraphrased_answer"])[0]) > trained
    argv = ["--data-dir", world["data"], "--block-size", str(trained), "--vocab-size", "257", "--out-dir", str(tmp_path)]
    code, err = call("tofu", argv, {}, capsys)
    assert code == 2 and f"--block-size {trained}" in err and "forget10_perturbed.json" in err, err

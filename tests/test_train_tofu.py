"""The TOFU pipeline at toy size: every stage and output, resumption from a kill at any write of an
epoch, corrupted cache files rebuilt, a run directory that refuses another configuration,
divergence recorded as data, the authors' schedule and pairing, and a real-model run on a tiny
random Llama that transformers (a test-only oracle) builds and loads back."""

import json
import math
import shutil

import pytest
import torch

import data
import model as models
import train_tofu
from conftest import TOFU_DIR as ROOT_TOFU

TOY = ["--n-authors", "10", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300",
       "--base-epochs", "2", "--finetune-epochs", "2", "--epochs", "2", "--ds-size", "4", "--max-new-tokens", "4",
       "--batch-size", "8", "--workers", "1"]


def records(job_dir):
    return [json.loads(p.read_text()) for p in sorted(job_dir.glob("epoch_*.json"))]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tofu")
    argv = TOY + ["--out-dir", str(out), "--methods", "npo_rt,ga_kl", "--seeds", "2"]
    assert train_tofu.main(argv) == 0
    return out / "builtin-generated-forget10", argv


def test_outputs_and_fields(toy_run):
    run_dir, _ = toy_run
    for name in ("metrics.jsonl", "summary.md", "frontier.png", "weights.png", "samples.md", "config.json"):
        assert (run_dir / name).stat().st_size > 0, name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r.get("seed"), r["epoch"]) for r in lines] == [("target", None, 0), ("retain", None, 0)] + [
        (m, s, e) for m in ("npo_rt", "ga_kl") for s in (0, 1) for e in (1, 2)]
    for r in lines:
        assert r["status"] == "ok" and 0 <= r["Model Utility"] <= 1 and 0 <= r["Forget Quality"] <= 1
    assert lines[1]["Forget Quality"] == pytest.approx(1.0)  # the retain model against itself
    for r in lines[2:]:  # NPO's weights and log-ratios are recorded every epoch; GA's weight is 1
        assert r["train_W_min"] <= r["train_W_mean"] <= r["train_W_max"] and r["train_r_min"] <= r["train_r_mean"]
        assert r["method"] == "npo_rt" or r["train_W_mean"] == 1.0
    summary = (run_dir / "summary.md").read_text()
    assert "| npo_rt | 2/2 |" in summary and "| ga_kl | 2/2 |" in summary


def test_unlearned_models_are_kept_and_load(toy_run):
    run_dir, _ = toy_run
    for job in ("npo_rt/seed0", "ga_kl/seed1"):
        model_dir = run_dir / "unlearn" / job / "model"
        net, tok = models.from_pretrained(model_dir), data.load_tokenizer(model_dir)
        assert tok.n_vocab == net.config.vocab_size
        assert not (run_dir / "unlearn" / job / "state.pt").exists()  # the optimizer state is not kept


def test_rerun_trains_nothing_and_reproduces_the_report(toy_run, capsys):
    run_dir, argv = toy_run
    before = (run_dir / "metrics.jsonl").read_text()
    assert train_tofu.main(argv) == 0
    assert "epoch 1/" not in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_run_directory_refuses_another_configuration(toy_run, capsys):
    run_dir, argv = toy_run
    assert train_tofu.main(argv + ["--lr", "0.1", "--beta", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "--beta" in err and "Traceback" not in err
    assert json.loads((run_dir / "config.json").read_text())["beta"] == 0.1


class Kill(Exception):
    pass


def test_a_kill_at_any_write_of_an_epoch_resumes_to_the_same_records(toy_run, monkeypatch):
    """Raise at the k-th write of an unlearning job (its logs, epoch record, state, model, done),
    then run again: the records equal an uninterrupted run's."""
    run_dir, argv = toy_run
    cfg = train_tofu.parse_args(argv)
    job = run_dir / "unlearn" / "npo_rt" / "seed0"
    want = records(job)
    real_write = data.write_atomic
    writes_per_job = None
    for k in range(1, 40):
        shutil.rmtree(job)
        calls = {"n": 0}

        def flaky_write(path, content):
            calls["n"] += 1
            if calls["n"] == k:
                raise Kill(path)
            return real_write(path, content)

        monkeypatch.setattr(data, "write_atomic", flaky_write)
        try:
            train_tofu.unlearn_job(cfg, str(run_dir / "target"), "npo_rt", 0)
        except Kill:
            pass
        else:
            writes_per_job = k - 1
            break
        finally:
            monkeypatch.setattr(data, "write_atomic", real_write)
        train_tofu.unlearn_job(cfg, str(run_dir / "target"), "npo_rt", 0)
        got = records(job)
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in got] == \
               [{k: v for k, v in r.items() if k != "seconds"} for r in want], f"kill at write {k}"
    assert writes_per_job and writes_per_job >= 2 * 6  # every write of both epochs was a kill point


@pytest.mark.parametrize("broken", ["state.pt", "epoch_001.json", "done.json"])
def test_a_corrupted_job_file_is_rebuilt_with_a_warning(toy_run, capsys, broken):
    run_dir, argv = toy_run
    cfg = train_tofu.parse_args(argv)
    job = run_dir / "unlearn" / "ga_kl" / "seed0"
    want = records(job)
    if broken == "state.pt":  # a killed run leaves the state of epoch 1 ...
        (job / "done.json").unlink()
        (job / "epoch_002.json").unlink()
        torch.save({"model": {}, "optimizer": {}, "epoch": 1, "seconds": 0.0}, job / "state.pt")
        (job / "state.pt").write_bytes((job / "state.pt").read_bytes()[:50])  # ... truncated
    else:
        (job / broken).write_text("{not json")
    train_tofu.unlearn_job(cfg, str(run_dir / "target"), "ga_kl", 0)
    assert "warning" in capsys.readouterr().out
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records(job)) == strip(want)


def test_a_corrupted_stage_is_rebuilt(toy_run, capsys):
    run_dir, argv = toy_run
    weights = run_dir / "retain" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert train_tofu.main(argv) == 0
    assert "retain cannot be loaded" in capsys.readouterr().out
    models.from_pretrained(run_dir / "retain")


def test_divergence_is_recorded_not_raised(toy_run, tmp_path):
    run_dir, argv = toy_run
    for stage in ("data", "tokenizer", "base", "target", "retain", "eval"):  # a new run on the toy run's models
        shutil.copytree(run_dir / stage, tmp_path / run_dir.name / stage)
    assert train_tofu.main(argv + ["--out-dir", str(tmp_path), "--methods", "ga", "--lr", "1e30", "--seeds", "1"]) == 0
    ga = [json.loads(line) for line in (tmp_path / run_dir.name / "metrics.jsonl").read_text().splitlines()][-1]
    assert ga["method"] == "ga" and ga["status"].startswith("diverged")
    assert "diverged" in (tmp_path / run_dir.name / "summary.md").read_text()


def test_learning_rate_is_hfs_linear_schedule_with_one_warmup_epoch():
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    steps_per_epoch, total = 7, 70
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, steps_per_epoch, total)
    for step in range(total):
        assert math.isclose(train_tofu.lr_at(step, steps_per_epoch, total, 2.0), optimizer.param_groups[0]["lr"], abs_tol=1e-12)
        optimizer.step()
        schedule.step()


def test_forget_examples_are_paired_as_in_the_authors_code():
    """The authors' dataset: torch.manual_seed(idx), then the first torch.randint draws the partner."""
    for i in (0, 1, 17, 399):
        torch.manual_seed(i)
        want = torch.randint(0, 3600, (1,)).item()
        assert train_tofu.first_draw(i, 3600) == want


def test_a_real_model_directory_end_to_end(hf_tokenizer_dirs, tmp_path):
    """`--model DIR --retain-model DIR` on a tiny random Llama-2-shaped model (transformers builds
    and saves it; its tokenizer is a SentencePiece-style BPE) and a few TOFU rows: every output is
    written, and transformers loads the unlearned model with the same logits as model.py."""
    transformers = pytest.importorskip("transformers")
    tok_dir = hf_tokenizer_dirs["llama2"]
    tok = data.load_tokenizer(tok_dir)
    model_dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=tok.n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2))
        model_dirs.append(tmp_path / f"llama{seed}")
        hf.save_pretrained(model_dirs[-1])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, model_dirs[-1] / name)
    tofu = tmp_path / "tofu"  # the first rows of each real TOFU file
    tofu.mkdir()
    for path in train_tofu.Path(ROOT_TOFU).glob("*.json*"):
        lines = path.read_text(encoding="utf-8").splitlines()
        (tofu / path.name).write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    argv = ["--model", str(model_dirs[0]), "--retain-model", str(model_dirs[1]), "--data-dir", str(tofu),
            "--methods", "npo_rt,ga_kl", "--seeds", "1", "--epochs", "1", "--ds-size", "4", "--max-new-tokens", "4",
            "--batch-size", "4", "--workers", "1", "--out-dir", str(tmp_path / "out")]
    assert train_tofu.main(argv) == 0
    run_dir = next((tmp_path / "out").iterdir())
    for name in ("metrics.jsonl", "summary.md", "frontier.png", "samples.md"):
        assert (run_dir / name).stat().st_size > 0
    unlearned = run_dir / "unlearn" / "npo_rt" / "seed0" / "model"
    ours = models.from_pretrained(unlearned).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(unlearned).eval()
    ids = torch.tensor([tok.encode("Who wrote the book?")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5)
        assert not torch.equal(ours(ids), models.from_pretrained(model_dirs[0])(ids))  # it did unlearn
    assert data.load_tokenizer(unlearned).encode("Who wrote the book?") == ids[0].tolist()


def test_dry_run_sizes_a_7b_model_without_building_it(tmp_path, capsys):
    # Llama-2-7B's published shape; its parameter count, 6,738,415,616, is Meta's model card figure
    model_dir = tmp_path / "llama-2-7b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False}))
    argv = ["--model", str(model_dir), "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"),
            "--device", "cuda", "--dry-run", "--methods", "npo_rt"]
    for name in ("forget10", "retain90", "full", "real_authors", "world_facts", "forget10_perturbed",
                 "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        (tmp_path / f"{name}.json").write_text("")  # a dry run reads no data, validation checks they exist
    (tmp_path / "idontknow.jsonl").write_text("")
    assert train_tofu.main(argv) == 0
    out = capsys.readouterr().out
    assert "6,738.4M parameters" in out
    # fp32 AdamW: two moments of 4 bytes per parameter
    assert f"{'optimizer':<12} {2 * 4 * 6738415616 / 2**30:8.2f} GiB" in out

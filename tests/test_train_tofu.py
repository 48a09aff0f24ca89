"""Smoke test of the whole TOFU pipeline at toy size: every stage, every output file and its fields,
the cache on a rerun, resumption after an interruption, and clean CLI errors."""

import contextlib
import io
import json

import pytest

import train_tofu

TOY = ["--preset", "toy", "--n-authors", "10", "--ds-size", "8", "--unlearn-epochs", "2"]
METHODS = "ga,npo_rt,npo_kl,dpo"


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tofu")
    argv = TOY + ["--out-dir", str(out), "--methods", METHODS]
    # Interrupt the run during unlearning, after the second method's first epoch was saved.
    real_aggregate, calls = train_tofu.tofu_eval.aggregate, {"n": 0}

    def flaky_aggregate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 + 2 + 2:  # target, retain; ga's 2 epochs; npo_rt's epoch 2
            raise Interrupt
        return real_aggregate(*args, **kwargs)

    train_tofu.tofu_eval.aggregate = flaky_aggregate
    try:
        with pytest.raises(Interrupt):
            train_tofu.main(argv)
    finally:
        train_tofu.tofu_eval.aggregate = real_aggregate
    resumed = io.StringIO()
    with contextlib.redirect_stdout(resumed):
        assert train_tofu.main(argv) == 0
    run_dir = out / "generated-forget10-toy"
    return out, run_dir, argv, resumed.getvalue()


def test_outputs_and_fields(finished_run):
    _, run_dir, _, _ = finished_run
    for name in ("metrics.jsonl", "summary.md", "tofu.png", "samples.md", "config.json"):
        assert (run_dir / name).stat().st_size > 0, name
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["epoch"]) for r in lines] == [("target", 0), ("retain", 0)] + [
        (m, e) for m in METHODS.split(",") for e in (1, 2)]
    for r in lines:
        assert r["status"] == "ok"
        for key in ("Forget Quality", "Model Utility", "Forget ROUGE", "Forget Truth Ratio",
                    "Retain Probability", "Real Authors ROUGE", "World Facts Truth Ratio"):
            assert key in r, (r["method"], key)
        assert 0.0 <= r["Model Utility"] <= 1.0 and 0.0 <= r["Forget Quality"] <= 1.0
    # the retain model's truth ratios are the reference: a KS test of a sample against itself
    assert lines[1]["Forget Quality"] == pytest.approx(1.0)
    summary = (run_dir / "summary.md").read_text()
    samples = (run_dir / "samples.md").read_text()
    for m in METHODS.split(","):
        assert f"| {m} |" in summary and f"| {m} |" in samples
    assert "ground truth" in samples


def test_interrupted_method_resumed(finished_run):
    _, run_dir, _, resumed_log = finished_run
    assert "[npo_rt] resuming after epoch 1" in resumed_log
    assert "[ga] cached: 2 epochs" in resumed_log
    for stage in ("base", "target", "retain"):
        assert f"stage {stage}: cached" in resumed_log
    npo_rt_dirs = list((run_dir / "methods").glob("npo_rt-*"))
    assert len(npo_rt_dirs) == 1
    assert sorted(p.name for p in npo_rt_dirs[0].glob("epoch_*.json")) == ["epoch_001.json", "epoch_002.json"]


def test_rerun_reuses_every_stage(finished_run, capsys):
    _, run_dir, argv, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_text()
    assert train_tofu.main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("data", "tokenizer", "base", "target", "retain"):
        assert f"stage {stage}: cached" in out
    assert out.count("cached: 2 epochs") == len(METHODS.split(","))
    assert "epoch 1/" not in out  # nothing was trained again
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_divergence_is_recorded_not_raised(tmp_path):
    argv = TOY + ["--out-dir", str(tmp_path), "--methods", "ga", "--unlearn-lr", "1e30"]
    assert train_tofu.main(argv) == 0
    rec = [json.loads(l) for l in (tmp_path / "generated-forget10-toy" / "metrics.jsonl").read_text().splitlines()]
    ga = [r for r in rec if r["method"] == "ga"]
    assert ga[-1]["status"].startswith("diverged"), ga[-1]
    assert "diverged" in (tmp_path / "generated-forget10-toy" / "summary.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["--methods", "npo,bogus"], ["bogus", "npo_rt", "valid"]),
    (["--split", "forget7"], ["forget7", "forgetXX"]),
    (["--data-dir", "/nonexistent/tofu"], ["/nonexistent/tofu"]),
])
def test_bad_input_exits_2(tmp_path, capsys, args, words):
    assert train_tofu.main(TOY + ["--out-dir", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_presets_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("TOFU_DATA_DIR", raising=False)
    assert train_tofu.parse_config([]).preset == "default"
    real = train_tofu.parse_config(["--data-dir", str(tmp_path)])  # real data: the CPU-hour preset
    assert (real.preset, real.vocab_size, real.finetune_epochs) == ("tofu", 4096, 10)
    quick = train_tofu.parse_config(["--quick", "--n-layer", "3"])  # an explicit option beats the preset
    assert (quick.preset, quick.n_authors, quick.n_layer) == ("quick", 20, 3)

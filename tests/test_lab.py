"""Tests of ``normkit lab``: the verdict machinery, the data paths, argument errors, and one
end-to-end ``--quick`` run whose files and JSON schema are checked (not its verdicts: those
belong to the data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from normkit.cli import main as cli_main
from normkit.lab import data as D
from normkit.lab.claims import ALL, BY_ID
from normkit.lab.framework import (
    MIXED,
    NOT_EVALUATED,
    NOT_SUPPORTED,
    SUPPORTED,
    VERDICTS,
    Check,
    Criterion,
    need,
    verdict_of,
)

# ----------------------------------------------------------------------------- verdicts
CRITERION = Criterion(
    "a > 1 and b < 0, c (optional) positive",
    (
        Check("a > 1", lambda m: need(m, "a") > 1),
        Check("b < 0", lambda m: need(m, "b") < 0),
        Check("mean of c > 0", lambda m: sum(need(m, "c")) / len(need(m, "c")) > 0),
    ),
)

VERDICT_CASES = {
    "all_pass": ({"a": 2, "b": -1, "c": [1.0, 2.0]}, SUPPORTED),
    "all_fail": ({"a": 0, "b": 1, "c": [-1.0, -2.0]}, NOT_SUPPORTED),
    "one_fails": ({"a": 2, "b": 1, "c": [1.0]}, MIXED),
    "one_passes": ({"a": 2, "b": 1, "c": [-1.0]}, MIXED),
    "skipped_arm_ignored_pass": ({"a": 2, "b": -1, "c": None}, SUPPORTED),
    "skipped_arm_ignored_fail": ({"a": 0, "b": 3}, NOT_SUPPORTED),
    "none_inside_list_is_skipped": ({"a": 0, "b": 3, "c": [1.0, None]}, NOT_SUPPORTED),
    "nothing_measured": ({}, NOT_EVALUATED),
}


@pytest.mark.parametrize("name", VERDICT_CASES)
def test_verdict_from_metrics(name):
    metrics, expected = VERDICT_CASES[name]
    verdict, results = CRITERION.evaluate(metrics)
    assert verdict == expected
    assert len(results) == 3


@pytest.mark.parametrize(
    "results,expected",
    [
        ([True], SUPPORTED),
        ([False], NOT_SUPPORTED),
        ([True, False], MIXED),
        ([None, True], SUPPORTED),
        ([None, False], NOT_SUPPORTED),
        ([None, None], NOT_EVALUATED),
        ([], NOT_EVALUATED),
    ],
)
def test_verdict_of(results, expected):
    assert verdict_of(results) == expected


def test_criterion_needs_checks():
    with pytest.raises(ValueError, match="at least one Check"):
        Criterion("nothing", ())


def test_claims_are_declared_before_running():
    assert sorted(BY_ID) == list(range(1, 12))
    for claim in ALL:
        assert claim.claim and claim.anchor and claim.criterion.description and claim.setup
        assert any(str(y) in claim.anchor for y in range(2015, 2020)), claim.anchor  # cites a paper's year
        # with nothing measured no check may pass: a skipped arm never becomes a "supported"
        verdict, results = claim.criterion.evaluate({})
        assert verdict == NOT_EVALUATED, (claim.id, results)


# ----------------------------------------------------------------------------- data
def _save(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_adding_task_targets_are_the_marked_sums():
    x, y = D.adding_task(50, 9, torch.Generator().manual_seed(0))
    assert x.shape == (50, 9, 2) and y.shape == (50,)
    assert torch.equal(x[:, :, 1].sum(1), torch.full((50,), 2.0))
    torch.testing.assert_close((x[:, :, 0] * x[:, :, 1]).sum(1), y)


BAD_NPZ = {
    "missing_y": (dict(x=np.zeros((30, 4))), "missing \\['y'\\]"),
    "x_1d": (dict(x=np.zeros(30), y=np.zeros(30, int)), "x: expected a numeric array"),
    "y_float": (dict(x=np.zeros((30, 4)), y=np.zeros(30)), "y: expected non-negative integer labels"),
    "y_wrong_length": (dict(x=np.zeros((30, 4)), y=np.zeros(29, int)), "y: expected non-negative integer"),
    "too_few": (dict(x=np.zeros((5, 4)), y=np.arange(5)), "at least 20 samples"),
    "one_class": (dict(x=np.zeros((30, 4)), y=np.zeros(30, int)), "at least 2 classes"),
    "nan": (dict(x=np.full((30, 4), np.nan), y=np.arange(30) % 2), "finite"),
}


@pytest.mark.parametrize("name", BAD_NPZ)
def test_load_npz_refuses_bad_files(tmp_path, name):
    arrays, message = BAD_NPZ[name]
    with pytest.raises(D.DataError, match=message):
        D.load_npz(_save(tmp_path, f"{name}.npz", **arrays))


def test_load_npz_shapes(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(40, 12), (40, 5, 6), (40, 2, 5, 6)]:
        d = D.load_npz(_save(tmp_path, "ok.npz", x=rng.normal(size=shape), y=np.arange(40) % 3))
        assert d.xtr.dim() == 4 and len(d.xtr) + len(d.xte) == 40 and d.n_classes == 3
        assert abs(float(d.xtr.mean())) < 1e-5  # standardized with the training set's statistics


# ----------------------------------------------------------------------------- models / probes
def test_per_step_bn_lstm_keeps_one_bn_per_step():
    from normkit.lab.models import NormLSTM

    step = NormLSTM(3, 5, 2, norm="bn_step", max_steps=4)
    shared = NormLSTM(3, 5, 2, norm="bn_shared", max_steps=4)
    assert len(step.norm_h) == 4 and len(shared.norm_h) == 1
    x = torch.randn(6, 7, 3)  # longer than max_steps: the last step's statistics are reused
    assert step(x).shape == (6, 2) and torch.isfinite(step.eval()(x)).all()


def test_landscape_probe_leaves_the_model_unchanged():
    from normkit.lab.claims.ics import landscape_probe
    from normkit.lab.models import mlp

    torch.manual_seed(0)
    model = mlp(8, 3, width=6, depth=2, norm="bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variation, change, beta = landscape_probe(model, torch.randn(10, 8), torch.randint(0, 3, (10,)), 0.1)
    assert variation >= 0 and change > 0 and beta > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- command line errors
BAD_ARGS = {
    "seeds_zero": (["--seeds", "0"], "--seeds: expected a positive integer"),
    "claim_12": (["--claim", "12"], "--claim: expected a claim number"),
    "claim_text": (["--claim", "x"], "--claim: expected a claim number"),
    "device_nonsense": (["--device", "nonsense"], "--device: expected a torch device"),
    "threads_negative": (["--threads", "-1"], "--threads: expected 0"),
    "data_missing": (["--data", "/no/such/file.npz"], "--data: expected an existing .npz file"),
}


@pytest.mark.parametrize("name", BAD_ARGS)
def test_bad_arguments_fail_clearly(name, capsys, tmp_path):
    argv, message = BAD_ARGS[name]
    try:
        code = cli_main(["lab", "--out", str(tmp_path / "out"), *argv])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_out_that_is_a_file_fails_clearly(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert cli_main(["lab", "--claim", "11", "--out", str(f)]) == 2
    assert "--out: expected a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end
def _lab(*argv, cwd):
    return subprocess.run(
        [sys.executable, "-m", "normkit.cli", "lab", "--no-progress", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One full ``normkit lab --quick`` run (every claim), shared by the checks below."""
    out = tmp_path_factory.mktemp("lab") / "report"
    proc = _lab("--quick", "--seeds", "1", "--out", str(out), cwd=str(out.parent))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


ENTRY_KEYS = {
    "id": int,
    "claim": str,
    "anchor": str,
    "criterion": str,
    "verdict": str,
    "metrics": dict,
    "figure": str,
}


def _is_metric(v) -> bool:
    if v is None or isinstance(v, (int, float)) and not isinstance(v, bool):
        return True
    return isinstance(v, list) and all(_is_metric(x) for x in v)


def test_quick_run_writes_the_schema(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"normkit_version", "quick", "seeds", "elapsed_s", "claims"}
    assert results["quick"] is True and results["seeds"] == [0] and results["elapsed_s"] > 0
    assert [c["id"] for c in results["claims"]] == list(range(1, 12))
    for c in results["claims"]:
        for key, typ in ENTRY_KEYS.items():
            assert isinstance(c[key], typ), (c["id"], key)
        assert c["verdict"] in VERDICTS
        assert c["metrics"] and all(_is_metric(v) for v in c["metrics"].values()), c["id"]
        assert c["figure"] == f"claim{c['id']:02d}.png" and (out / c["figure"]).stat().st_size > 5000
        assert not c.get("traceback")


def test_quick_run_report_and_summary(quick_run):
    out, stdout = quick_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 11  # self-contained: every figure embedded
    assert 'src="claim' not in page
    for claim in ALL:
        assert claim.title in page and claim.title in stdout
    assert "verdict" in stdout and "report:" in stdout


def test_user_data_npz(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(160) % 4
    x = rng.normal(size=(160, 6, 6)) + y[:, None, None]  # learnable: the class shifts the image
    path = _save(tmp_path, "mine.npz", x=x.astype(np.float32), y=y)
    proc = _lab(
        "--quick",
        "--claim",
        "10",
        "--seeds",
        "1",
        "--data",
        path,
        "--out",
        str(tmp_path / "r"),
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["data"] == "mine.npz" and [c["id"] for c in results["claims"]] == [10]
    assert results["claims"][0]["verdict"] in VERDICTS and os.path.isfile(tmp_path / "r" / "claim10.png")


def test_per_step_input_norm_equals_one_bn_per_step():
    """The (step, feature) BatchNorm of W_x·x is exactly one BatchNorm1d per step, in training and eval."""
    import normkit
    from normkit.lab.models import NormLSTM

    torch.manual_seed(0)
    cell = NormLSTM(3, 2, 1, norm="bn_step", max_steps=4)
    x = 3 + 0.5 * torch.randn(9, 4, 3)
    per_step = [normkit.BatchNorm1d(8) for _ in range(4)]
    for bn in per_step:
        torch.nn.init.constant_(bn.weight, 0.1)
    z = cell.wx(x)
    expected = torch.stack([bn(z[:, t]) for t, bn in enumerate(per_step)], dim=1)
    torch.testing.assert_close(cell._input_projection(x), expected)
    for t, bn in enumerate(per_step):  # the running statistics moved the same way
        torch.testing.assert_close(cell.norm_x.running_mean[8 * t : 8 * t + 8], bn.running_mean)
    cell.eval()
    longer = torch.randn(5, 6, 3)  # steps 4 and 5 reuse step 3's statistics
    z = cell.wx(longer)
    bn3 = per_step[3].eval()
    torch.testing.assert_close(cell._input_projection(longer)[:, 5], bn3(z[:, 5]))


def test_an_arm_whose_layer_is_missing_is_skipped(monkeypatch):
    import normkit
    from normkit.lab.models import available, missing_note

    assert available("bn") and available("none")
    monkeypatch.delattr(normkit, "GhostBatchNorm1d", raising=False)
    assert not available("gbn")
    assert "GhostBatchNorm1d" in missing_note("gbn") and "not available" in missing_note("gbn")

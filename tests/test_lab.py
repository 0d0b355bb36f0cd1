"""Tests of ``normkit lab``: the verdict machinery, the sequential design (its error rate under
repeated looks, by simulation), the seed plan (deterministic, budgeted, never contradicting a
longer run), the data paths, argument errors, and small end-to-end runs whose files and JSON schema
are checked (not their verdicts: those belong to the data)."""

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
from normkit.lab.context import record
from normkit.lab.framework import (
    FAIL,
    INCONCLUSIVE,
    MIXED,
    NOT_EVALUATED,
    NOT_SUPPORTED,
    PASS,
    SKIPPED,
    SUPPORTED,
    UNDECIDED,
    VERDICTS,
    Check,
    Criterion,
    Result,
    at_least,
    bounds_of,
    censored,
    every_seed,
    interval,
    is_censored,
    need,
    paired,
    t95,
    verdict_of,
    within,
)
from normkit.lab.sequential import SEQUENTIAL, active

# ----------------------------------------------------------------------------- verdicts
CRITERION = Criterion(
    "a > 1 and b < 0, c (optional) positive",
    (
        Check("a > 1", lambda m: need(m, "a") > 1),
        Check("b < 0", lambda m: need(m, "b") < 0),
        Check("mean of c > 0", lambda m: at_least(need(m, "c"), 0.0)),
    ),
)

VERDICT_CASES = {
    "all_pass": ({"a": 2, "b": -1, "c": [1.0, 1.2, 0.9]}, SUPPORTED),
    "all_fail": ({"a": 0, "b": 1, "c": [-1.0, -2.0, -1.5]}, NOT_SUPPORTED),
    "one_fails": ({"a": 2, "b": 1, "c": [1.0, 1.1]}, MIXED),
    "pass_fail_and_undecided_is_mixed": ({"a": 2, "b": 1, "c": [1.0, -1.0]}, MIXED),
    "pass_and_undecided": ({"a": 2, "b": -1, "c": [1.0, -0.9]}, INCONCLUSIVE),
    "fail_and_undecided": ({"a": 0, "b": 1, "c": [1.0, -0.9]}, INCONCLUSIVE),
    "one_seed_cannot_decide": ({"a": 2, "b": -1, "c": [5.0]}, INCONCLUSIVE),
    "skipped_arm_ignored_pass": ({"a": 2, "b": -1, "c": None}, SUPPORTED),
    "skipped_arm_ignored_fail": ({"a": 0, "b": 3}, NOT_SUPPORTED),
    "none_inside_list_is_skipped": ({"a": 0, "b": 3, "c": [1.0, None]}, NOT_SUPPORTED),
    "nothing_measured": ({}, NOT_EVALUATED),
}


@pytest.mark.parametrize("name", VERDICT_CASES)
def test_verdict_from_metrics(name):
    metrics, expected = VERDICT_CASES[name]
    verdict, results = CRITERION.evaluate(metrics)
    assert verdict == expected, [(d, r) for d, r in results]
    assert len(results) == 3


R = {s: Result(s) for s in (PASS, FAIL, UNDECIDED, SKIPPED)}


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
        ([R[PASS], R[UNDECIDED]], INCONCLUSIVE),
        ([R[FAIL], R[UNDECIDED]], INCONCLUSIVE),
        ([R[PASS], R[FAIL], R[UNDECIDED]], MIXED),
        ([R[UNDECIDED], R[SKIPPED]], INCONCLUSIVE),
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
        assert any(str(y) in claim.anchor for y in range(2015, 2022)), claim.anchor  # cites a paper's year
        # with nothing measured no check may pass: a skipped arm never becomes a "supported"
        verdict, results = claim.criterion.evaluate({})
        assert verdict == NOT_EVALUATED, (claim.id, results)


# ----------------------------------------------------------------------------- the stated test
def test_t95_table():
    assert t95(1) == pytest.approx(6.314) and t95(2) == pytest.approx(2.920) and t95(4) == pytest.approx(2.132)
    assert t95(11) == t95(10)  # between entries: the smaller df's larger (conservative) quantile
    assert t95(1000) == pytest.approx(1.697)
    with pytest.raises(ValueError):
        t95(0)


def test_interval_matches_the_formula():
    v = [1.0, 2.0, 4.0]
    iv = interval(v)
    sd = np.std(v, ddof=1)
    assert iv.mean == pytest.approx(7 / 3) and iv.n == 3
    assert iv.lo == pytest.approx(7 / 3 - 2.920 * sd / np.sqrt(3))
    assert iv.hi == pytest.approx(7 / 3 + 2.920 * sd / np.sqrt(3))


@pytest.mark.parametrize(
    "values,margin,status",
    [
        ([3.0, 3.2, 2.9], 1.0, PASS),  # clearly above
        ([0.2, 0.1, 0.3], 1.0, FAIL),  # clearly below
        ([1.8, 0.1, 0.9], 0.5, UNDECIDED),  # the mean is above the margin, the noise too large to say
        ([87.8 - 86.9, 88.8 - 89.2], 0.5, UNDECIDED),  # the claim-8 flip: inside the noise
        ([2.0, 2.0], 1.0, PASS),  # no spread: decided by the mean
        ([5.0], 1.0, UNDECIDED),  # one seed decides nothing
    ],
)
def test_at_least(values, margin, status):
    r = at_least(values, margin)
    assert r.status == status, r.detail
    if status == UNDECIDED:
        assert r.detail.startswith("too little data")


@pytest.mark.parametrize(
    "values,status",
    [([0.1, -0.2, 0.3], PASS), ([5.0, 5.5, 4.8], FAIL), ([1.5, -1.0], UNDECIDED), ([-4.0, -4.2, -3.9], FAIL)],
)
def test_within(values, status):
    assert within(values, 2.0).status == status


def test_paired_differences_use_the_seeds_both_arms_have():
    assert paired([3, 4], [1, 1]) == [2.0, 3.0]
    assert paired([1, 2, 7], [1]) == [0.0]  # one arm got more seeds for another check: seeds 0.. of both


def test_every_seed_is_a_proportion_test():
    assert every_seed([True] * 5, "x").status == PASS  # Clopper-Pearson lower bound 0.55 > 1/2
    assert every_seed([True] * 4 + [False], "x").status == UNDECIDED  # 4 of 5: lower bound 0.34
    assert every_seed([False] * 5, "x").status == FAIL
    assert every_seed([True, True], "x").status == UNDECIDED  # two seeds decide nothing
    assert every_seed([True] * 4 + [None], "x").status == UNDECIDED


def test_proportion_bounds():
    from normkit.lab.framework import proportion_bounds

    lo, hi = proportion_bounds(5, 5)
    assert lo == pytest.approx(0.05 ** (1 / 5), abs=1e-6) and hi == 1.0
    lo, hi = proportion_bounds(0, 5)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.05 ** (1 / 5), abs=1e-6)
    lo, hi = proportion_bounds(4, 5)
    assert lo == pytest.approx(0.3426, abs=1e-3) and hi == pytest.approx(0.9898, abs=1e-3)


# ----------------------------------------------------------------------------- the sequential design
def test_sequential_t_bounds_are_the_calibrated_ones():
    """The stored critical values come from calibrate_t_bounds (2e7 sequences); 300,000 other sequences
    give the same values within their Monte Carlo error."""
    from normkit.lab.sequential import LOOKS, T_BOUNDS, calibrate_t_bounds

    again = calibrate_t_bounds(paths=300_000, seed=7)
    assert list(again) == list(LOOKS) == sorted(T_BOUNDS)
    assert again[3] == pytest.approx(T_BOUNDS[3], abs=1e-3)  # the first look is the exact t quantile
    for n in LOOKS[1:]:
        assert again[n] == pytest.approx(T_BOUNDS[n], rel=0.04), n
    values = list(T_BOUNDS.values())
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert all(T_BOUNDS[n] > t95(n - 1) for n in LOOKS)  # every look is stricter than a fixed test's


def _first_crossing(paths, decide) -> np.ndarray:
    """For each simulated sequence (rows of per-seed values), the status at its first decisive look."""
    from normkit.lab.sequential import LOOKS

    out = np.full(len(paths), UNDECIDED, dtype=object)
    for i, row in enumerate(paths):
        for n in LOOKS:
            status = decide(list(row[:n]))
            if status != UNDECIDED:
                out[i] = status
                break
    return out


def test_sequential_error_rate_stays_at_alpha_over_all_looks():
    """Under the null (the true mean is on the margin), a check judged at all 8 looks and stopped at its
    first decision passes wrongly in at most 5 % of the sequences (and fails wrongly as often) with the
    sequential bounds; with the fixed design's bounds at every look it would pass wrongly about 3x as often."""
    rng = np.random.default_rng(2026)
    sims = 4000
    paths = 3.0 + 2.0 * rng.standard_normal((sims, 40))  # mean 3 = the margin, any spread

    with active(SEQUENTIAL):
        seq = _first_crossing(paths, lambda v: at_least(v, 3.0).status)
    naive = _first_crossing(paths, lambda v: at_least(v, 3.0).status)  # the fixed design at every look
    se = np.sqrt(0.05 * 0.95 / sims)
    assert (seq == PASS).mean() <= 0.05 + 3 * se, (seq == PASS).mean()
    assert (seq == FAIL).mean() <= 0.05 + 3 * se, (seq == FAIL).mean()
    assert (naive == PASS).mean() > 0.10  # what the sequential bounds prevent


def test_sequential_within_and_share_tests_keep_their_error_rate():
    from normkit.lab.sequential import B_BOUNDS, LOOKS, spent

    rng = np.random.default_rng(11)
    sims = 3000
    se = np.sqrt(0.05 * 0.95 / sims)
    edge = 2.0 + 1.5 * rng.standard_normal((sims, 40))  # the true mean on the tolerance: passing is wrong
    with active(SEQUENTIAL):
        assert (_first_crossing(edge, lambda v: within(v, 2.0).status) == PASS).mean() <= 0.05 + 3 * se
        coins = rng.random((sims, 40)) < 0.5  # a share of exactly 1/2
        shares = _first_crossing(coins, lambda v: every_seed([bool(x) for x in v], "x").status)
    assert (shares == PASS).mean() <= 0.05 + 3 * se and (shares == FAIL).mean() <= 0.05 + 3 * se
    # the exact binomial boundaries: the first-crossing probability by each look within the spending
    alive, prev, total = np.array([1.0]), 0, 0.0
    for n in LOOKS:
        from math import comb

        step = np.array([comb(n - prev, k) for k in range(n - prev + 1)]) / 2.0 ** (n - prev)
        alive = np.convolve(alive, step)
        total += alive[B_BOUNDS[n]:].sum()
        alive[B_BOUNDS[n]:] = 0.0
        prev = n
        assert total <= spent(n) + 1e-12, n


def test_sequential_checks_use_the_seeds_of_their_last_look():
    with active(SEQUENTIAL):
        r = at_least([5.0, 5.1, 4.9, -100.0], 1.0)  # 4 seeds: the look at 3 uses the first 3
        assert r.status == PASS and r.n == 3 and "look 1 of 8" in r.detail
        assert at_least([5.0, 5.1], 1.0).status == UNDECIDED  # before the first look
        assert "first look is at 3" in at_least([5.0, 5.1], 1.0).detail
        assert every_seed([True] * 8, "x").status == PASS  # 8 of 8: the binomial boundary at 8
        assert every_seed([True] * 7 + [False], "x").status == UNDECIDED
        assert every_seed([True] * 5, "x").status == UNDECIDED  # 5 of 5 is not yet enough
        assert every_seed([False] * 8, "x").status == FAIL
    assert at_least([5.0, 5.1], 1.0).status == PASS  # the fixed design decides with 2


# ----------------------------------------------------------------------------- the seed plan
def _fake_values(effect: float, spread: float, seed: int) -> dict:
    rng = np.random.default_rng(1000 + seed)
    return {"x": effect + spread * float(rng.standard_normal()), "steps": 10}


def _fake_claim(cid: int, effect: float, spread: float = 1.0, cost: float = 1.0):
    """A claim whose one check asks whether the mean of x is above 0; each seed costs ``cost`` modeled seconds."""
    from normkit.lab.costs import Cost
    from normkit.lab.framework import Claim, Outcome, Part

    return Claim(
        cid, f"fake {cid}", "c", "a 2020", Criterion("x > 0", (Check("x > 0", lambda m: at_least(need(m, "x"), 0.0)),)),
        parts=lambda ctx: [Part("p", _fake_values, (effect, spread), cost=Cost(cost))],
        collect=lambda ctx, res: Outcome({"x": [r["x"] for r in res["p"]]}, lambda fig, m: None),
    )


FAKES = [(1, 3.0), (2, -2.0), (3, 0.6), (4, -0.5), (5, 0.3), (6, 0.0), (7, 1.0), (8, -0.8)]


def _plan(budget):
    from normkit.lab.context import Context
    from normkit.lab.runner import Runner

    runner = Runner([_fake_claim(c, e) for c, e in FAKES], Context(show_progress=False), SEQUENTIAL, budget=budget,
                    log=lambda *a: None)
    runner.run()
    return runner


def test_the_plan_is_deterministic_and_a_shorter_run_never_contradicts_a_longer_one():
    small, large = _plan(60.0), _plan(400.0)
    again = _plan(60.0)
    assert [(st.checks, st.looks) for st in small.states] == [(st.checks, st.looks) for st in again.states]
    assert small.rounds and [r["runs"] for r in small.rounds] == [r["runs"] for r in again.rounds]
    assert small.modeled <= 60.0 and large.modeled <= 400.0
    decided_small = decided_large = 0
    for a, b in zip(small.states, large.states, strict=True):
        (_, ra), (_, rb) = a.checks[0], b.checks[0]
        decided_small += ra.status != UNDECIDED
        decided_large += rb.status != UNDECIDED
        if ra.status != UNDECIDED:  # the same decision at the same look: the longer run only adds looks
            assert (rb.status, rb.n, rb.detail) == (ra.status, ra.n, ra.detail), a.claim.id
    assert decided_large > decided_small >= 2
    assert "budget ran out" in " ".join(st.open.get(0, "") for st in small.states)


def test_a_decision_is_final_and_only_needed_runs_get_seeds():
    """Check a passes at the first look; seeds added later for check b (whose values would now fail a)
    do not reopen it. A part no open check reads gets no more seeds."""
    from normkit.lab.context import Context
    from normkit.lab.costs import Cost
    from normkit.lab.framework import Claim, Outcome, Part
    from normkit.lab.runner import Runner

    claim = Claim(
        1, "t", "c", "a 2020",
        Criterion("a and b", (
            Check("a > 0", lambda m: at_least(need(m, "a"), 0.0), needs=("p",)),
            Check("b > 0", lambda m: at_least(need(m, "b"), 0.0), needs=("p",)),
            Check("c > 0", lambda m: at_least(need(m, "c"), 0.0), needs=("q",)),
        )),
        parts=lambda ctx: [Part("p", _turning, (), cost=Cost(1.0)), Part("q", _fake_values, (5.0, 0.1), cost=Cost(1.0)),
                           Part("d", _fake_values, (0.0, 1.0), cost=Cost(1.0), display=True)],
        collect=lambda ctx, res: Outcome({"a": [r["a"] for r in res["p"]], "b": [r["b"] for r in res["p"]],
                                          "c": [r["x"] for r in res["q"]]}, lambda fig, m: None),
    )
    runner = Runner([claim], Context(show_progress=False), SEQUENTIAL, budget=1000.0, log=lambda *a: None)
    runner.run()
    (_, a), (_, b), (_, c) = runner.states[0].checks
    assert a.status == PASS and a.n == 3 and c.status == PASS and c.n == 3
    assert b.status == PASS and b.n == 12  # b needed 12 seeds of p ...
    with active(SEQUENTIAL):  # ... over which a would now fail
        assert at_least([_turning(s)["a"] for s in range(12)], 0.0).status == FAIL
    counts = {p.name: runner.count[p.key] for p in runner.states[0].parts}
    assert counts == {"p": 12, "q": 3, "d": 3}


def _turning(seed: int) -> dict:
    return {"a": 5.0 + 0.1 * (seed % 2) if seed < 3 else -20.0, "b": 1.0 + 0.8 * ((-1) ** seed), "steps": 1}


def test_makespan_models_two_processes():
    from normkit.lab.costs import Cost, makespan

    assert makespan([3, 3, 2, 2, 2]) == 7 and makespan([10, 1, 1]) == 10 and makespan([]) == 0
    assert Cost(2.0, per_step=0.001, per_eval=0.01).of({"steps": 1000, "evals": 10}) == pytest.approx(1.1)
    assert Cost(2.0).of({"steps": 1000}) == 2.0


def test_checks_name_parts_their_claim_has():
    from normkit.lab.context import Context

    for quick in (False, True):
        ctx = Context(quick=quick, show_progress=False)
        for claim in ALL:
            parts = claim.parts(ctx)
            names = {p.name for p in parts}
            assert len(names) == len(parts), claim.id
            for check in claim.criterion.checks:
                assert set(check.needs) <= {p.name for p in parts if not p.display}, (claim.id, check.description)


# ----------------------------------------------------------------------------- censored outcomes
def test_censored_values():
    c = censored(300)
    assert c == "> 300" and is_censored(c) and not is_censored(300)
    assert bounds_of(c) == (300.0, float("inf")) and bounds_of(70) == (70.0, 70.0)
    m = {}
    record(m, "steps", [70, c])
    assert m["steps"] == [70, "> 300"] and m["steps_mean"] == "> 185" and m["steps_std"] is None
    record(m, "plain", [1, 3])
    assert m["plain_mean"] == 2.0


@pytest.mark.parametrize(
    "bn,none,status",
    [
        ([60] * 5, ["> 100"] * 5, UNDECIDED),  # the quick run: 100/60 < 2 says nothing
        ([60, 70, 60, 50, 60], ["> 300"] * 5, PASS),  # 300/70 >= 2 whatever the true values
        ([60, 70, 60, 50, 60], [100, 110, 90, 80, 100], FAIL),  # observed ratios < 2
        (["> 300"] * 5, ["> 300"] * 5, UNDECIDED),  # both censored: unknown ratios
        ([50] * 5, [200, 150, 300, 110, "> 300"], PASS),
        ([50, 50], [200, 150], UNDECIDED),  # two seeds: too little data
    ],
)
def test_claim1_censored_steps(bn, none, status):
    from normkit.lab.claims.optimization import _bn_twice_as_fast

    assert _bn_twice_as_fast({"steps_to_target_bn": bn, "steps_to_target_none": none}).status == status


def test_claim1_decides_a_large_gap_with_three_seeds():
    """The issue's quick run: BN at 87 %, the plain network at 42 % — a paired test on the accuracies
    decides with the first look's 3 seeds, where a share-of-seeds test could not."""
    reached, faster = BY_ID[1].criterion.checks
    m = {"final_acc_bn": [87.1, 86.4, 88.0], "acc_at_half_bn": [85.9, 84.8, 86.7],
         "final_acc_none": [42.3, 45.1, 40.2]}
    with active(SEQUENTIAL):
        assert reached(m).status == PASS and faster(m).status == PASS
        assert every_seed([True] * 3, "x").status == UNDECIDED  # what the old criterion could say
        m = {"final_acc_bn": [60.0, 62.0, 61.0], "acc_at_half_bn": [50.0, 52.0, 51.0],
             "final_acc_none": [70.0, 71.0, 72.0]}
        assert reached(m).status == FAIL and faster(m).status == FAIL


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
    "x_1d": (dict(x=np.zeros(30), y=np.zeros(30, int)), "x: expected a real-valued array"),
    "y_float": (dict(x=np.zeros((30, 4)), y=np.zeros(30)), "y: expected integer labels"),
    "y_wrong_length": (dict(x=np.zeros((30, 4)), y=np.zeros(29, int)), "y: expected integer labels"),
    "too_few": (dict(x=np.zeros((5, 4)), y=np.arange(5)), "at least 20 samples"),
    "one_class": (dict(x=np.zeros((30, 4)), y=np.zeros(30, int)), "at least 2 classes"),
    "nan": (dict(x=np.full((30, 4), np.nan), y=np.arange(30) % 2), "finite"),
    "label_1e6": (dict(x=np.zeros((30, 4)), y=np.r_[np.arange(29) % 2, 1_000_000]), "K <= 1000"),
    "negative_label": (dict(x=np.zeros((30, 4)), y=np.r_[np.arange(29) % 2, -1]), "K <= 1000"),
    "uint64_labels_that_would_wrap": (
        dict(x=np.zeros((30, 4)), y=np.r_[np.arange(29, dtype=np.uint64) % 2, np.uint64(2**63 + 5)]),
        "labels from 0 to 9223372036854775813",
    ),
    "zero_width_x": (dict(x=np.zeros((30, 0)), y=np.arange(30) % 2), "at least 1 feature"),
    "zero_width_image": (dict(x=np.zeros((30, 3, 0, 4)), y=np.arange(30) % 2), "at least 1 feature"),
    "complex_x": (dict(x=np.ones((30, 4), np.complex64), y=np.arange(30) % 2), "real-valued"),
    "string_x": (dict(x=np.array([["a"] * 4] * 30), y=np.arange(30) % 2), "real-valued"),
    "object_x": (dict(x=np.array([[{}] * 4] * 30, dtype=object), y=np.arange(30) % 2), "pickled"),
}


@pytest.mark.parametrize("name", BAD_NPZ)
def test_load_npz_refuses_bad_files(tmp_path, name):
    arrays, message = BAD_NPZ[name]
    with pytest.raises(D.DataError, match=message):
        D.load_npz(_save(tmp_path, f"{name}.npz", **arrays))


def _npz_declaring(path, shape, dtype="<f8", extra=b""):
    """An .npz whose x.npy declares ``shape`` but holds only ``extra`` bytes: a 2 GiB claim in a tiny file."""
    import io
    import zipfile

    def member(shape, descr, payload):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
        return buf.getvalue() + payload

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", member(shape, dtype, extra))
        z.writestr("y.npy", member((shape[0],), "<i8", np.zeros(shape[0], np.int64).tobytes()))
    return str(path)


def test_load_npz_refuses_a_huge_declared_array_before_reading_it(tmp_path, monkeypatch):
    path = _npz_declaring(tmp_path / "bomb.npz", (2**18, 1024))  # 2 GiB of float64 declared
    assert os.path.getsize(path) < 3_000_000  # the "2 MB npz that expands to 2 GiB"

    def no_load(*args, **kwargs):
        raise AssertionError("np.load was called on a file the headers already refuse")

    monkeypatch.setattr(D.np, "load", no_load)
    with pytest.raises(D.DataError, match=r"at most 256 MiB .* declaring 2,050 MiB"):
        D.load_npz(path)


def test_load_npz_refuses_a_truncated_member(tmp_path):
    path = _npz_declaring(tmp_path / "short.npz", (40, 3), extra=b"\0" * 16)  # 16 of 960 bytes
    with pytest.raises(D.DataError, match="readable .npz"):
        D.load_npz(path)


def test_load_npz_refuses_a_pickle(tmp_path):
    import pickle

    path = tmp_path / "data.npz"
    path.write_bytes(pickle.dumps({"x": np.zeros((30, 4)), "y": np.arange(30) % 2}))
    with pytest.raises(D.DataError, match="not one"):
        D.load_npz(str(path))


@pytest.mark.parametrize("name", ["label_1e6", "uint64_labels_that_would_wrap", "complex_x", "object_x"])
def test_cli_refuses_hostile_data_with_one_line(tmp_path, capsys, name):
    arrays, _ = BAD_NPZ[name]
    path = _save(tmp_path, f"{name}.npz", **arrays)
    assert cli_main(["lab", "--data", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normkit lab: error: --data:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_cli_refuses_a_declared_bomb(tmp_path, capsys):
    path = _npz_declaring(tmp_path / "bomb.npz", (2**18, 1024))
    assert cli_main(["lab", "--data", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "256 MiB" in err and "\n" not in err


def test_lab_without_its_extra_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("mlxtend", "sklearn") else real(name, *a)
    )
    assert cli_main(["lab", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "mlxtend" in err and "matplotlib" not in err
    assert "pip install 'normkit[lab]'" in err and not (tmp_path / "out").exists()


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
    "budget_zero": (["--budget", "0"], "--budget: expected a positive number of seconds"),
    "budget_text": (["--budget", "soon"], "--budget: expected a number of seconds"),
    "seeds_and_budget": (["--seeds", "3", "--budget", "60"], "give one of them"),
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
def tiny_run(tmp_path_factory):
    """One small end-to-end ``normkit lab --quick --claim 4 --seeds 2`` run, shared by the checks below."""
    out = tmp_path_factory.mktemp("lab") / "report"
    proc = _lab("--quick", "--claim", "4", "--seeds", "2", "--out", str(out), cwd=str(out.parent))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


ENTRY_KEYS = {
    "id": int,
    "claim": str,
    "anchor": str,
    "criterion": str,
    "test": str,
    "verdict": str,
    "verdict_reason": str,
    "metrics": dict,
    "figure": str,
    "checks": list,
}


def _is_metric(v) -> bool:
    if v is None or isinstance(v, (int, float)) and not isinstance(v, bool) or is_censored(v):
        return True
    return isinstance(v, list) and all(_is_metric(x) for x in v)


def test_tiny_run_writes_the_schema(tiny_run):
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"normkit_version", "quick", "seeds", "elapsed_s", "claims", "threads"}
    assert results["quick"] is True and results["seeds"] == [0, 1] and results["elapsed_s"] > 0
    assert [c["id"] for c in results["claims"]] == [4]
    for c in results["claims"]:
        for key, typ in ENTRY_KEYS.items():
            assert isinstance(c[key], typ), (c["id"], key)
        assert c["verdict"] in VERDICTS
        assert all(ch["status"] in (PASS, FAIL, UNDECIDED, SKIPPED) and ch["detail"] for ch in c["checks"])
        assert c["metrics"] and all(_is_metric(v) for v in c["metrics"].values()), c["id"]
        assert len(c["metrics"]["acc_bn"]) == 2 and len(c["metrics"]["acc_bn"][0]) == 4  # seeds x scales
        assert c["figure"] == f"claim{c['id']:02d}.png" and (out / c["figure"]).stat().st_size > 5000
        assert not c.get("traceback")


def test_tiny_run_report_and_summary(tiny_run):
    out, stdout = tiny_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # self-contained: the figure embedded
    assert 'src="claim' not in page and "Student-t" in page
    assert BY_ID[4].title in page and BY_ID[4].title in stdout
    assert "verdict" in stdout and "report:" in stdout


def test_runs_are_deterministic():
    """The same seed gives the same numbers: initialization, batch order, plateau stop."""
    from normkit.lab.data import ImageData
    from normkit.lab.models import mlp
    from normkit.lab.train import Plateau, seed_everything, train_to_plateau

    g = torch.Generator().manual_seed(1)
    y = torch.arange(120) % 3
    x = torch.randn(120, 1, 2, 4, generator=g) + y[:, None, None, None]
    data = ImageData("toy", x[:90], y[:90], x[90:], y[90:])

    def run():
        gen = seed_everything(3)
        model = mlp(8, 3, width=16, depth=2, norm="bn")
        h = train_to_plateau(model, data, batch_size=8, lr=0.05, generator=gen,
                             plateau=Plateau(every=0.5, patience=2, min_epochs=1, max_epochs=6))
        return h.steps, h.test_acc, h.losses, h.converged, [p.detach().clone() for p in model.parameters()]

    a, b = run(), run()
    assert a[:4] == b[:4]
    assert all(torch.equal(p, q) for p, q in zip(a[4], b[4], strict=True))
    assert a[0][-1] <= 6 * (90 // 8)  # the cap holds


def test_values_per_statistic():
    from normkit.lab.claims.batch import values_per_statistic

    assert values_per_statistic("mlp", 2) == 2 and values_per_statistic("cnn", 2) == 32


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
        "--jobs",
        "1",
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


def test_execute_shares_the_runs_with_a_worker():
    """--jobs: the worker takes runs from the front; this process takes those no worker started from the back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from normkit.lab.context import Context

    gate = threading.Event()

    def slow(x):
        gate.wait(10)
        return (10 * x, threading.get_ident())

    def fast(x):
        return (10 * x, threading.get_ident())

    def fails(x):
        raise RuntimeError("broken run")

    with ThreadPoolExecutor(1) as ex:
        ctx = Context(executor=ex, show_progress=False)
        threading.Timer(0.3, gate.set).start()
        out = ctx.execute([(("a",), slow, (1,)), (("b",), fast, (2,)), (("c",), fast, (3,)), (("d",), fails, (4,))])
    here = threading.get_ident()
    assert out[("a",)][0][0] == 10 and out[("a",)][0][1] != here  # the worker's
    assert out[("b",)][0] == (20, here) and out[("c",)][0] == (30, here)  # taken over here
    assert out[("d",)][0] is None and "broken run" in out[("d",)][2]  # a failure is kept, not raised


@pytest.fixture
def one_thread():
    """The lab's setting (--threads 1): tiny models on a shared machine are many times slower with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lean_sgd_is_torch_sgd_bit_for_bit(one_thread):
    from normkit.lab.models import mlp
    from normkit.lab.train import LeanSGD

    torch.manual_seed(0)
    x, y = 3 + 0.5 * torch.randn(64, 8), torch.randint(0, 3, (64,))
    for momentum in (0.0, 0.9):
        models = [mlp(8, 3, width=16, depth=2, norm="bn") for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        opts = [torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=momentum),
                LeanSGD(models[1].parameters(), lr=0.1, momentum=momentum)]
        for step in range(20):
            idx = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
            for model, opt in zip(models, opts, strict=True):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        for p, q in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
            assert torch.equal(p, q)


def test_two_sequential_runs_of_a_real_claim_are_identical(tmp_path, one_thread):
    from normkit.lab.context import Context
    from normkit.lab.runner import run_all

    def once(out):
        entries, runner = run_all([BY_ID[4]], Context(show_progress=False), str(out), budget=30.0, log=lambda *a: None)
        e = entries[0]
        return e["metrics"], [(c["status"], c["seeds"], c["detail"]) for c in e["checks"]], e["seeds_by_part"]

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    assert a == b and a[2] == {"seed": 3}


def test_report_escapes_names_and_shows_censored_values(tmp_path):
    from normkit.lab.report import summary_table, write_html

    results = {
        "normkit_version": "0", "quick": True, "seeds": [0, 1], "elapsed_s": 1.0, "cpu_s": 1.0, "jobs": 1,
        "data": "<script>alert(1)</script>.npz", "device": "cpu",
        "claims": [{
            "id": 1, "title": "t", "claim": "c", "anchor": "a", "criterion": "k", "test": "t-bounds",
            "checks": [{"check": "x", "passed": None, "status": UNDECIDED, "detail": "too little data: <b>"}],
            "verdict": INCONCLUSIVE, "verdict_reason": "x: too little data", "notes": [], "setup": "s",
            "metrics": {"steps": [60, "> 300"], "steps_mean": "> 180"}, "figure": None, "elapsed_s": 1.0,
        }],
    }
    page = open(write_html(results, str(tmp_path)), encoding="utf-8").read()
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
    assert "&gt; 300" in page and "&gt; 180" in page and "Why inconclusive" in page
    assert "claim 1 is inconclusive: x: too little data" in summary_table(results)

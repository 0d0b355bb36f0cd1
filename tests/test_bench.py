"""Smoke test of ``normkit bench``: a tiny run writes a JSON file with the documented schema.

No timing is asserted (timings belong to the benchmark, not to tests); what is checked is
that every record is complete and self-consistent.
"""

from __future__ import annotations

import json
import math

import pytest

from normkit import cli, ops

IMPL_KEYS = {"median_ms", "min_ms", "p25_ms", "p75_ms", "max_ms", "times_ms", "speedup_vs_torch", "GBps",
             "pct_roofline"}
RECORD_KEYS = {"op", "op_key", "mode", "shape", "layout", "dtype", "device", "bytes", "copy_GBps", "impls"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--only-shapes", "--shape", "bn2d=2x3x4x5", "--shape", "bn_add_relu=2x3x4x5",
            "--shape", "ln=4x9", "--layouts", "both", "--modes", "fwd,bwd,fwd+bwd,eval", "--rounds", "2",
            "--no-compile", "--e2e-batch", "2", "--e2e-rounds", "2", "--copy-mb", "32",
            "--json", str(out / "b.json"), "--plot", str(out / "b.png")]
    assert cli.main(argv) == 0
    return json.loads((out / "b.json").read_text()), out / "b.png"


def test_json_schema(tiny_run):
    doc, _ = tiny_run
    assert doc["schema"] == "normkit-bench/1"
    assert doc["copy_bandwidth_GBps"] > 0
    assert {"torch", "cpu kernels", "normkit"} <= set(doc["versions"])
    assert doc["skipped"] == []
    # bn2d and bn_add_relu in two layouts, ln in one, four modes each
    assert len(doc["records"]) == (2 + 2 + 1) * 4
    for rec in doc["records"]:
        assert RECORD_KEYS <= set(rec), rec.keys()
        assert set(rec["impls"]) == {"torch", "normkit"}
        assert rec["copy_GBps"] > 0
        assert rec["normkit_backend"] == "cpu"
        for impl in rec["impls"].values():
            assert IMPL_KEYS <= set(impl)
            assert len(impl["times_ms"]) == 2
            assert impl["min_ms"] <= impl["median_ms"] <= impl["max_ms"]
        assert rec["impls"]["torch"]["speedup_vs_torch"] == 1.0


def test_bytes_follow_the_roofline_model(tiny_run):
    doc, _ = tiny_run
    by = {(r["op_key"], r["layout"], r["mode"]): r["bytes"] for r in doc["records"]}
    tensor = 2 * 3 * 4 * 5 * 4
    assert by[("bn2d", "nchw", "fwd")] == 2 * tensor  # a channel's runs stay in cache between the passes
    assert by[("bn2d", "channels_last", "fwd")] == 3 * tensor  # strided channels: x is read twice
    assert by[("bn2d", "channels_last", "fwd+bwd")] == 8 * tensor
    assert by[("bn_add_relu", "nchw", "bwd")] == 5 * tensor
    assert by[("bn_add_relu", "channels_last", "bwd")] == 8 * tensor
    assert by[("ln", "nchw", "eval")] == 2 * 4 * 9 * 4


def test_end_to_end_losses_agree(tiny_run):
    doc, _ = tiny_run
    step = doc["e2e"][0]
    assert step["op"] == "ResNet train step"
    assert set(step["impls"]) == {"torch", "normkit"}
    assert step["max_loss_diff"] < 1e-3


def test_plot_is_a_png(tiny_run):
    _, png = tiny_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_shape_is_refused():
    with pytest.raises(SystemExit, match="--shape"):
        cli.main(["bench", "--shape", "bn2d=2xfoo", "--no-e2e"])


# --- the models suite -----------------------------------------------------------------------------

MODEL_RECORD_KEYS = {"op", "op_key", "group", "mode", "shape", "layout", "dtype", "device", "impls"}
MODEL_IMPL_KEYS = {"median_ms", "min_ms", "p25_ms", "p75_ms", "max_ms", "times_ms", "speedup_vs_torch"}


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    """``--suite models`` on tiny sizes, one round. The reference backend keeps it to seconds (no
    kernel compilation); what is checked is the machinery and that both models compute the same."""
    import torch

    import normkit

    out = tmp_path_factory.mktemp("models")
    argv = ["bench", "--suite", "models", "--quick", "--sizes", "tiny", "--rounds", "1", "--e2e-rounds", "1",
            "--no-cold", "--threads", "1", "--json", str(out / "m.json"), "--plot", str(out / "m.png")]
    threads = torch.get_num_threads()
    try:
        with normkit.backend("reference"):
            assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "m.json").read_text()), out / "m.png"


def test_models_suite_schema(models_run):
    doc, png = models_run
    assert doc["schema"] == "normkit-bench/1" and doc["suite"] == "models"
    assert doc["skipped"] == []
    assert doc["settings"]["sizes"] == "tiny"
    assert doc["settings"]["normkit_backend"] == "reference"  # the fixture's choice, recorded
    groups = [r["group"] for r in doc["records"]]
    assert groups.count("everyday") == 8 and groups.count("per call") == 4
    assert groups.count("network") == 1 and groups.count("saved_bytes") == 1
    assert "first_call" not in groups  # --no-cold
    s = doc["summary"]
    assert s["everyday_cases"] == 8 and s["per_call_cases"] == 4
    ratios = [r["impls"]["normkit"]["speedup_vs_torch"] for r in doc["records"] if r["group"] == "everyday"]
    assert s["geomean_everyday"] == pytest.approx(math.prod(ratios) ** (1 / len(ratios)))
    for rec in doc["records"]:
        assert MODEL_RECORD_KEYS - {"impls"} <= set(rec), rec.keys()
        if rec["group"] == "saved_bytes":
            continue
        assert set(rec["impls"]) == {"torch", "normkit"}
        for impl in rec["impls"].values():
            assert MODEL_IMPL_KEYS <= set(impl)
            assert len(impl["times_ms"]) == 1
        assert rec["impls"]["torch"]["speedup_vs_torch"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_suite_compares_equal_computations(models_run):
    doc, _ = models_run
    for rec in doc["records"]:
        diff = rec.get("max_output_diff", rec.get("max_loss_diff"))
        if rec["group"] != "saved_bytes":
            assert diff is not None and diff < 1e-4, (rec["op_key"], diff)


def test_saved_bytes_counts_what_autograd_keeps(models_run):
    doc, _ = models_run
    (rec,) = [r for r in doc["records"] if r["group"] == "saved_bytes"]
    for name in ("torch", "normkit"):
        got = rec["saved_bytes"][name]
        assert 0 < got["distinct"] <= got["total"]
    assert rec["ratio_normkit_vs_torch"]["distinct"] == (rec["saved_bytes"]["normkit"]["distinct"] /
                                                         rec["saved_bytes"]["torch"]["distinct"])


def test_inplace_group_reports_memory_and_agreement(models_run):
    doc, _ = models_run
    recs = {r["op_key"]: r for r in doc["records"] if r["group"] == "inplace"}
    assert set(recs) == {"inplace_preact_resnet_leaky", "inplace_resnet_leaky", "inplace_efficientnet_block"}
    pre = recs["inplace_preact_resnet_leaky"]
    assert pre["ratio_saved_normkit_vs_torch"]["distinct"] < 0.6 and pre["inplace_layers"] == 13
    for rec in recs.values():
        agree = rec["agreement"]
        assert agree["normkit_grad_err"] <= 3 * agree["torch_grad_err"] + 1e-6, agree
        peaks = rec["peak_step_bytes"]
        assert peaks is None or (peaks["torch"] > 0 and peaks["normkit"] > 0)


def test_saved_bytes_of_a_known_graph():
    import torch

    from normkit.bench.models import saved_bytes

    # Linear saves its input (4x3 fp32) and weight (5x3); cross_entropy its log-softmax (4x5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5, bias=False))
    got = saved_bytes(model, torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    assert got["total"] >= (4 * 3 + 5 * 3 + 4 * 5) * 4
    assert got["distinct"] <= got["total"]


def test_first_call_in_a_fresh_process():
    from normkit.bench import coldstart

    rec = coldstart.run(rounds=1, threads=1)
    assert rec["group"] == "first_call"
    for name in ("torch", "normkit"):
        im = rec["impls"][name]
        assert len(im["runs"]) == 1
        assert im["process_s"] >= im["import_torch_s"] + im["build_s"] + im["first_step_s"] > 0
    assert rec["impls"]["torch"]["import_normkit_s"] < rec["impls"]["normkit"]["import_normkit_s"]


def test_help_lists_the_models_route_and_zoo_suites(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "--suite {ops,models,route,zoo}" in text and "--no-cold" in text and "--route-margin" in text


# --- the route suite ------------------------------------------------------------------------------
@pytest.mark.skipif(ops.native_ops() is None, reason="the C++ extension is not built: no kernel route to time")
def test_route_suite_times_both_routes_and_reports_the_rule(tmp_path, capsys):
    """``--suite route`` on tiny sizes: every op × size has both routes timed, the rule's choice
    recorded as prefer_aten makes it, and the table marks a choice MISS exactly when it costs more
    than the margin over the faster route."""
    import torch

    from normkit import route

    out = tmp_path / "route.json"
    assert cli.main(["bench", "--suite", "route", "--sizes", "tiny", "--rounds", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["suite"] == "route" and doc["settings"]["aten_below"] == route.ATEN_BELOW
    rows = doc["records"]
    assert {r["op"] for r in rows} == {"bn_train", "bn_infer", "gn", "ln_train", "ln_infer", "rms_train"}
    for r in rows:
        assert r["aten_us"] > 0 and r["kernel_us"] > 0
        assert r["faster"] == ("aten" if r["aten_us"] <= r["kernel_us"] else "kernel")
        x = torch.empty(r["shape"])
        op = {"bn_train": "batch_norm_train", "bn_infer": "batch_norm_infer", "gn": "group_norm",
              "ln_train": "layer_norm", "ln_infer": "layer_norm", "rms_train": "rms_norm"}[r["op"]]
        grad = not r["op"].endswith("infer")
        assert r["chosen"] == ("aten" if route.prefer_aten(op, x, needs_grad=grad) else "kernel")
        assert r["aten_admissible"] == route.aten_admissible(op, x, needs_grad=grad)
        assert r["miss"] == (r["aten_admissible"] and r["chosen_cost"] > 1.10)
    table = capsys.readouterr().out
    assert table.count("MISS") == sum(r["miss"] for r in rows) == doc["summary"]["misses"]

"""Smoke test of ``normkit bench``: a tiny run writes a JSON file with the documented schema.

No timing is asserted (timings belong to the benchmark, not to tests); what is checked is
that every record is complete and self-consistent.
"""

from __future__ import annotations

import json

import pytest

from normkit import cli

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
    assert {"torch", "numba", "normkit"} <= set(doc["versions"])
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

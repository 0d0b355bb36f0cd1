"""Export: torch.export and ONNX (onnxruntime) reproduce eager output of models with every norm layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
import normkit.functional as NF

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (pip install normkit[test])")


def zoo(lib, c=6):
    """One of every norm layer of ``lib`` (normkit or torch.nn), on the input shape each one takes."""

    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.bn2d, self.gn = lib.BatchNorm2d(c), lib.GroupNorm(3, c)
            self.in2d = lib.InstanceNorm2d(c, affine=True, track_running_stats=True)
            self.ln, self.rms = lib.LayerNorm([7, 5]), lib.RMSNorm(5)
            self.bn1d, self.in1d = lib.BatchNorm1d(c), lib.InstanceNorm1d(c)
            self.bn3d, self.in3d = lib.BatchNorm3d(c), lib.InstanceNorm3d(c, affine=True)
            self.bn1d_flat = lib.BatchNorm1d(c)

        def forward(self, x):
            y = z = self.conv(x)
            y = self.rms(self.ln(self.in2d(self.gn(self.bn2d(y)))))               # (N, C, 7, 5)
            y = self.in1d(self.bn1d(y.flatten(2))).reshape(y.shape)              # (N, C, 35)
            y = self.in3d(self.bn3d(y.unsqueeze(2))).squeeze(2)                  # (N, C, 1, 7, 5)
            if lib is normkit:  # the fused forms: residual + activation
                y = self.bn2d._normalize(y, residual=x.mean(1, keepdim=True).expand_as(y), act="silu")
                y = self.gn._normalize(y, residual=y, act="gelu")
                y = NF.batch_norm(y, None, None, training=True, act="relu", residual=y)
            # (N, C) from the conv, not from the end of the chain: a dozen batch normalizations in a
            # row amplify float32 rounding (measured: 1.4e-5 of the max between onnxruntime and eager)
            return y, self.bn1d_flat(z.mean(dim=(2, 3)))

    return Zoo()


def perturb(model, gen):
    """Running statistics and affine parameters away from their initial 0/1."""
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(0.5 * torch.randn(t.shape, generator=gen))
            for name in ("running_var", "weight"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() <= 2:
                    t.copy_(0.5 + torch.rand(t.shape, generator=gen))


# torch.nn layers: exported by torch in eval mode, converted to normkit's by export_onnx in train mode
CASES = {"normkit_eval": (normkit, False), "normkit_train": (normkit, True), "torch_eval": (nn, False),
         "torch_train": (nn, True)}


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_close(got, want):
    for g, w in zip(got, want, strict=True):
        g = torch.as_tensor(g)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.fixture(params=list(CASES))
def case(request):
    lib, training = CASES[request.param]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = zoo(lib)
    perturb(model, gen)
    model.train(training)
    x = 3 + 0.5 * torch.randn(8, 3, 7, 5, generator=gen)
    with torch.no_grad():
        want = _flat(copy.deepcopy(model)(x))
    return model, x, want


def test_export_round_trips(case, tmp_path):
    """torch.export (and the decomposition table, a no-op here) and ONNX through onnxruntime == eager."""
    model, x, want = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ep = torch.export.export(model, (x,))
    decomposed = ep.run_decompositions(normkit.tools.decompositions())
    for k, v in model.state_dict().items():  # exporting changes no running statistic
        assert torch.equal(v, before[k]), k
    is_normkit = isinstance(model.bn2d, normkit.BatchNorm2d)
    # normkit layers export as torch's own operators: the program runs, and translates, without normkit
    assert not any(str(n.target).startswith("normkit.") for n in ep.graph.nodes)
    assert not any(str(n.target).startswith("normkit.") for n in decomposed.graph.nodes)
    with torch.no_grad():  # (a training-mode program updates running statistics when run, as eager does)
        _assert_close(_flat(copy.deepcopy(ep).module()(x)), want)
        _assert_close(_flat(decomposed.module()(x)), want)
    path = tmp_path / "model.onnx"
    # normkit models: the ExportedProgram made above; torch.nn ones: the model (see export_onnx)
    # (optimize=False: onnxscript's graph optimizer doubles the test's time and is not what is tested)
    program = normkit.export_onnx(ep if is_normkit else model, (x,), path, opset_version=18, optimize=False)
    assert path.exists() and program.model_proto.opset_import[0].version >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    _assert_close(got[:len(want)], want)


def test_export_program_decomposes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.BatchNorm2d(4), normkit.LayerNorm(4)).eval()
    x = 3 + 0.5 * torch.randn(2, 3, 5, 4)
    ep = normkit.tools.export_program(model, (x,))
    assert not any(str(n.target).startswith("normkit.") for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_plain_onnx_export_works(tmp_path):
    """The call users make, torch.onnx.export(model, args, path), on a model with normkit layers."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.BatchNorm2d(4), normkit.GroupNorm(2, 4)).eval()
    x = 3 + 0.5 * torch.randn(2, 3, 4, 4)
    path = tmp_path / "plain.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _assert_close(session.run(None, {session.get_inputs()[0].name: x.numpy()}), [model(x)])


def test_opset_below_17_is_refused():
    with pytest.raises(ValueError, match="opset_version: expected >= 17, got 16"):
        normkit.export_onnx(nn.Sequential(normkit.BatchNorm1d(3)), (torch.randn(4, 3),), opset_version=16)


def test_onnx_dynamic_batch(tmp_path):
    """A batch dimension left dynamic: the decomposed statistics follow the batch size at run time."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), normkit.BatchNorm2d(6), normkit.GroupNorm(2, 6),
                          normkit.LayerNorm(5), nn.Flatten(2), normkit.BatchNorm1d(6)).train()
    gen = torch.Generator().manual_seed(3)
    x = 3 + 0.5 * torch.randn(4, 3, 7, 7, generator=gen)
    path = tmp_path / "dynamic.onnx"
    batch = torch.export.Dim("batch", min=2)
    normkit.export_onnx(model, (x,), path, dynamic_shapes=({0: batch},), optimize=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x9 = 3 + 0.5 * torch.randn(9, 3, 7, 7, generator=gen)
    with torch.no_grad():
        want = copy.deepcopy(model)(x9)
    _assert_close(session.run(None, {session.get_inputs()[0].name: x9.numpy()}), [want])

"""``normkit bench --suite models``: everyday models, torch.nn vs the same model converted to normkit.

Each case builds one torch.nn model and a deep copy converted with
``normkit.convert(model, to="normkit", fuse=True)`` (fusion only changes models with
``norm → activation`` pairs in an ``nn.Sequential``); both start from the same weights and see
the same inputs. Their steps run in paired, interleaved rounds (:mod:`.timing`); a record holds
both medians and ``speedup_vs_torch`` = torch median ÷ normkit median (> 1: normkit faster).
Before timing, the first output (or loss) of the two models is compared: ``max_output_diff``
must be fp32 rounding, else the timing compares different computations.

Groups:

* ``everyday`` — a training step (forward, cross-entropy, backward, SGD with momentum) of an
  MLP with BatchNorm1d (batch 64 and 256), a small CNN with BatchNorm2d (batch 32 and 128), the
  same CNN with GroupNorm, a 2-block pre-LN Transformer encoder, and batch-1 inference of the
  CNN and the MLP. Their geometric mean is ``geomean_everyday``.
* ``per call`` — single tiny layers, one call each: BatchNorm1d(256) eval on 1×256,
  LayerNorm(256) on 1×16×256, BatchNorm1d(256) fwd+bwd on 64×256, GroupNorm(8, 32) fwd+bwd on
  32×32×14×14 — the fixed cost of a call.
* ``compiled`` — the ``everyday`` cases again, both models under ``torch.compile`` (default mode,
  Inductor): normkit compiles to torch's own norms wherever Inductor's fused code is as fast
  (:data:`normkit.route.COMPILE_KEEPS_OP`), so the ratio is the cost of normkit's semantics in the
  graph (checkpoint-safe, non-finite-safe running statistics); the first call of each (compile time)
  is recorded as ``compile_s``. With ``--compile``.
* ``network`` — the ResNet-18-style training step of :mod:`.e2e`.
* ``inplace`` — in-place activated BatchNorm (:mod:`.inplace`): a pre-activation ResNet with BN → LeakyReLU,
  the ResNet with LeakyReLU, an EfficientNet-style MBConv stack, torch.nn vs ``convert(model, inplace=True)``:
  bytes saved for backward, peak memory of the step (fresh process, resident-set high-water mark), paired
  step times, and the gradients' error against float64 beside torch's.
* ``saved_bytes`` — bytes autograd keeps for backward during one training step
  (``torch.autograd.graph.saved_tensors_hooks``): the sum over every saved tensor, and the
  distinct storages (a tensor saved twice counted once — the memory actually held).
* ``first_call`` — a fresh Python process (:mod:`.coldstart`): import, build the model and run
  its first training step, torch vs normkit, wall time of the whole process and its parts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import normkit

from .timing import Clock, paired, summary

_CLASSES = 10


def mlp(width: int = 512, features: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, _CLASSES))


def cnn(norm: str = "bn", widths: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """conv3×3 → norm → ReLU per stage (stride 2 after the first), global pool, linear head."""
    layers: list[nn.Module] = []
    cin = 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(cin, w, 3, 1 if i == 0 else 2, 1, bias=False),
                   nn.BatchNorm2d(w) if norm == "bn" else nn.GroupNorm(8, w), nn.ReLU()]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, _CLASSES)]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Pre-LN Transformer encoder block (Xiong et al., 2020): x + attn(LN(x)), x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4, blocks: int = 2, features: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(blocks)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, _CLASSES)

    def forward(self, x):
        return self.head(self.ln(self.blocks(self.embed(x))).mean(dim=1))


@dataclass
class ModelCase:
    key: str
    label: str
    group: str  # "everyday" or "per call"
    mode: str  # "train step", "inference", "eval" (one layer, no grad) or "fwd+bwd" (one layer)
    shape: tuple[int, ...]  # the input's
    build: Callable[[], nn.Module]
    offset: float = 0.0  # inputs are offset + randn (non-zero means, as real activations)


def cases(tiny: bool = False) -> list[ModelCase]:
    """The suite; ``tiny`` shrinks every size (a smoke test of the machinery, not a benchmark)."""
    w = 32 if tiny else 512
    widths = (8, 16, 16) if tiny else (32, 64, 128)
    img = 8 if tiny else 32
    f, d, seq = (16, 32, 8) if tiny else (32, 128, 64)

    def b(n):
        return max(2, n // 16) if tiny else n

    k = 16 if tiny else 256
    gn = (4, 16, 6, 6) if tiny else (32, 32, 14, 14)
    return [
        ModelCase("mlp_bn_b64", "MLP+BatchNorm1d", "everyday", "train step", (b(64), 256), lambda: mlp(w)),
        ModelCase("mlp_bn_b256", "MLP+BatchNorm1d", "everyday", "train step", (b(256), 256), lambda: mlp(w)),
        ModelCase("cnn_bn_b32", "CNN+BatchNorm2d", "everyday", "train step", (b(32), 3, img, img),
                  lambda: cnn("bn", widths)),
        ModelCase("cnn_bn_b128", "CNN+BatchNorm2d", "everyday", "train step", (b(128), 3, img, img),
                  lambda: cnn("bn", widths)),
        ModelCase("cnn_gn_b32", "CNN+GroupNorm", "everyday", "train step", (b(32), 3, img, img),
                  lambda: cnn("gn", widths)),
        ModelCase("transformer_ln", "Transformer+LayerNorm", "everyday", "train step", (b(32), seq, f),
                  lambda: Transformer(d, 4, 2, f)),
        ModelCase("cnn_bn_infer_b1", "CNN+BatchNorm2d", "everyday", "inference", (1, 3, img, img),
                  lambda: cnn("bn", widths)),
        ModelCase("mlp_bn_infer_b1", "MLP+BatchNorm1d", "everyday", "inference", (1, 256), lambda: mlp(w)),
        ModelCase("bn1d_eval_1", "BatchNorm1d", "per call", "eval", (1, k), lambda: nn.BatchNorm1d(k), 3.0),
        ModelCase("ln_1x16", "LayerNorm", "per call", "eval", (1, 16, k), lambda: nn.LayerNorm(k), 3.0),
        ModelCase("bn1d_fwdbwd_64", "BatchNorm1d", "per call", "fwd+bwd", (64, k), lambda: nn.BatchNorm1d(k), 3.0),
        ModelCase("gn_fwdbwd", "GroupNorm(8)", "per call", "fwd+bwd", gn, lambda: nn.GroupNorm(8, gn[1]), 3.0),
    ]


def _pair(case: ModelCase, device: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = case.build().to(device)
    for m in base.modules():  # non-trivial running statistics, so eval differs from training
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return {"torch": base, "normkit": normkit.convert(copy.deepcopy(base), to="normkit", fuse=True)}


def _steps(case: ModelCase, models: dict[str, nn.Module], device: str, clock: Clock, compiled: bool = False):
    """name -> timed step, and the first outputs' largest difference (checked before timing); ``compiled``:
    each model under ``torch.compile``, and also name -> seconds of its first step (the compile)."""
    import time

    g = torch.Generator().manual_seed(1)
    x = (case.offset + torch.randn(case.shape, generator=g)).to(device)
    y = torch.randint(0, _CLASSES, (case.shape[0],), generator=g).to(device)
    dy = torch.randn(case.shape, generator=g).to(device)
    steps, firsts, compile_s = {}, {}, {}
    for name, module in models.items():
        model = torch.compile(module) if compiled else module
        if case.mode == "train step":
            module.train()
            opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

            def body(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                return loss.detach()
        elif case.mode == "fwd+bwd":
            module.train()
            xg = x.clone().requires_grad_(True)

            def body(model=model, module=module, xg=xg):
                for t in (xg, *module.parameters()):
                    t.grad = None
                out = model(xg)
                out.backward(dy)
                return out.detach()
        else:  # "inference" / "eval": the model in eval mode, no autograd
            module.eval()

            def body(model=model):
                with torch.no_grad():
                    return model(x)
        started = time.perf_counter()
        firsts[name] = body()
        compile_s[name] = time.perf_counter() - started
        steps[name] = (lambda body=body: clock.time(body))
    diff = float((firsts["torch"].double() - firsts["normkit"].double()).abs().max())
    return steps, diff, compile_s


def _record(case_key, label, group, mode, shape, device, times, extra) -> dict:
    base = summary(times["torch"])["median_ms"]
    impls = {}
    for name, ts in times.items():
        s = summary(ts)
        impls[name] = {**s, "times_ms": [t * 1e3 for t in ts], "speedup_vs_torch": base / s["median_ms"]}
    return {"op": label, "op_key": case_key, "group": group, "mode": mode, "shape": list(shape),
            "layout": "nchw", "dtype": "float32", "device": device, "impls": impls, **extra}


def run_case(case: ModelCase, device: str, rounds: int, clock: Clock, compiled: bool = False) -> dict:
    """One case, eager (or, ``compiled``, both models under ``torch.compile``: group ``compiled``)."""
    models = _pair(case, device)
    if compiled:
        torch._dynamo.reset()
    steps, diff, compile_s = _steps(case, models, device, clock, compiled)
    # the fixed cost of a tiny call is microseconds: time a batch of calls, report per call
    reps = 20 if case.group == "per call" else 1
    if reps > 1:
        steps = {k: (lambda s=s: sum(s() for _ in range(reps)) / reps) for k, s in steps.items()}
    times = paired(steps, rounds=rounds, warmup=2)
    extra = {"max_output_diff": diff, "fuse": True, "calls_per_sample": reps}
    if compiled:
        extra["compile_s"] = compile_s
    return _record(case.key, case.label, "compiled" if compiled else case.group, case.mode, case.shape, device,
                   times, extra)


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Bytes autograd saves for backward in one forward + loss: every save, and distinct storages."""
    total, storages = 0, {}

    def pack(t):
        nonlocal total
        nbytes = t.numel() * t.element_size()
        total += nbytes
        try:
            st = t.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # no storage (e.g. a wrapper subclass)
            storages[id(t)] = nbytes
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return {"total": total, "distinct": sum(storages.values())}


def saved_bytes_record(device: str, batch: int, tiny: bool) -> dict:
    """The ResNet-18-style model (:mod:`.e2e`) in training: torch vs ``convert(fuse=True)``."""
    from .e2e import SmallResNet

    torch.manual_seed(0)
    base = SmallResNet(widths=(8, 16, 16) if tiny else (32, 64, 128)).to(device)
    models = {"torch": base, "normkit": normkit.convert(copy.deepcopy(base), fuse=True)}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    got = {k: saved_bytes(m, x, y) for k, m in models.items()}
    return {"op": "bytes saved for backward: ResNet train step", "op_key": "saved_bytes", "group": "saved_bytes",
            "mode": "train step", "shape": [batch, 3, 32, 32], "layout": "nchw", "dtype": "float32",
            "device": device, "saved_bytes": got,
            "ratio_normkit_vs_torch": {k: got["normkit"][k] / got["torch"][k] for k in ("total", "distinct")}}


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def main(args) -> int:
    """``normkit bench --suite models``: run the suite, print the table, write JSON and plot."""
    import datetime
    import sys

    from tqdm import tqdm

    from . import coldstart, e2e, report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("normkit bench: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    tiny = args.sizes == "tiny"
    rounds = args.rounds or (5 if args.quick else 15)
    clock = Clock(device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records, problems = [], []
    jobs: list[tuple[str, Callable[[], list[dict]]]] = [
        (c.key, (lambda c=c: [run_case(c, device, rounds, clock)])) for c in cases(tiny)]
    if getattr(args, "compile", False):
        jobs += [(f"{c.key} compiled", (lambda c=c: [run_case(c, device, rounds, clock, compiled=True)]))
                 for c in cases(tiny) if c.group == "everyday"]
    e2e_batch = args.e2e_batch or (2 if tiny else 32)
    if not args.no_e2e:
        jobs.append(("resnet", lambda: [{**r, "group": "network"} for r in e2e.run(
            device, e2e_batch, rounds=args.e2e_rounds or (3 if args.quick else 21),
            widths=(8, 16, 16) if tiny else (32, 64, 128))[:1]]))
    jobs.append(("saved_bytes", lambda: [saved_bytes_record(device, e2e_batch, tiny)]))
    from . import inplace

    jobs += [(f"inplace {k}", (lambda k=k: [inplace.record(k, device, e2e_batch, args.e2e_rounds or
                                                           (3 if args.quick else 11), tiny, args.threads)]))
             for k in inplace.NETWORKS]
    if not args.no_cold and device == "cpu":
        jobs.append(("first_call", lambda: [coldstart.run(1 if args.quick else 3, args.threads)]))
    for key, job in tqdm(jobs, desc="normkit bench models", unit="case", file=sys.stderr):
        try:
            records += job()
        except Exception as err:  # one broken case must not sink the whole run
            problems.append(f"{key}: {type(err).__name__}: {err}")
    everyday = [r["impls"]["normkit"]["speedup_vs_torch"] for r in records if r["group"] == "everyday"]
    per_call = [r["impls"]["normkit"]["speedup_vs_torch"] for r in records if r["group"] == "per call"]
    compiled = [r["impls"]["normkit"]["speedup_vs_torch"] for r in records if r["group"] == "compiled"]
    summary_ = {"geomean_everyday": geomean(everyday), "geomean_per_call": geomean(per_call),
                "geomean_compiled": geomean(compiled), "everyday_cases": len(everyday),
                "per_call_cases": len(per_call), "compiled_cases": len(compiled)}
    backend = _backend(device)
    print(f"{torch.get_num_threads()} threads, device {device}, normkit backend {backend}"
          + (" (tiny sizes: not a benchmark)" if tiny else ""))
    print(report.models_table(records, summary_))
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)
    doc = {"schema": report.SCHEMA, "suite": "models",
           "command": "normkit " + " ".join(sys.argv[1:]) if sys.argv else "",
           "started_utc": started, "machine": report.machine(device), "versions": report.versions(),
           "settings": {"rounds": rounds, "quick": args.quick, "sizes": args.sizes, "fuse": True,
                        "compiled": bool(compiled), "normkit_backend": backend},
           "summary": summary_, "records": records, "skipped": problems}
    if args.json:
        report.write_json(args.json, doc)
    if args.plot:
        report.models_plot(args.plot, records, summary_,
                           f"normkit bench --suite models — {doc['machine']['processor']}, "
                           f"{torch.get_num_threads()} threads")
    return 0


def _backend(device: str) -> str:
    """The backend normkit's kernels resolve to for an fp32 tensor here (cpu, triton or reference).

    normkit may still hand a small tensor to aten's own kernel (the route); this names the
    kernels it uses otherwise — a missing C++ extension shows here as ``reference``.
    """
    import warnings

    from .. import backends

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return backends.resolve("channel_stats", torch.empty(2, 2, device=device)).name
        except backends.BackendUnavailableError as err:
            return f"none: {err}"

"""First-call time: a fresh Python process imports, builds a small model and runs its first training step.

The model has BatchNorm2d, GroupNorm and LayerNorm (every kernel family a first step may have
to load or compile). ``torch`` runs it as torch.nn; ``normkit`` also imports normkit and
converts the model (``fuse=True``). The parent measures the wall time of the whole process
(interpreter start included); the child reports its parts: imports, build, first step, and a
second step (the warm cost, for comparison). Contenders alternate, one process each per round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from torch import nn
t_torch = time.perf_counter()
use_nk = sys.argv[1] == "normkit"
if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
if use_nk:
    import normkit
t_import = time.perf_counter()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
                      nn.Flatten(2), nn.LayerNorm(64), nn.Flatten(), nn.Linear(16 * 64, 10))
if use_nk:
    model = normkit.convert(model, fuse=True)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = 3 + torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
t_build = time.perf_counter()
def step():
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
step()
t_first = time.perf_counter()
step()
t_second = time.perf_counter()
print(json.dumps({"import_torch_s": t_torch - t0, "import_normkit_s": t_import - t_torch,
                  "build_s": t_build - t_import, "first_step_s": t_first - t_build,
                  "second_step_s": t_second - t_first}))
"""


def _one(name: str, env: dict, threads: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, name, str(threads)], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"first-call child ({name}) failed: {out.stderr.strip()[-500:]}")
    return {"process_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def run(rounds: int, threads: int | None = None) -> dict:
    """The record: per contender the medians of each part and every process's figures.

    ``threads``: torch threads in the children (default: torch's own choice, as a user gets).
    """
    import statistics

    import normkit

    env = dict(os.environ)
    # the child imports the parent's normkit, wherever it was found
    root = os.path.dirname(os.path.dirname(os.path.abspath(normkit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    runs: dict[str, list[dict]] = {"torch": [], "normkit": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(_one(name, env, threads or 0))
    impls = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        impls[name] = {**med, "median_ms": 1e3 * med["process_s"], "runs": rs}
    for im in impls.values():
        im["speedup_vs_torch"] = impls["torch"]["median_ms"] / im["median_ms"]
    return {"op": "first training step in a fresh process", "op_key": "first_call", "group": "first_call",
            "mode": "cold start", "shape": [8, 3, 8, 8], "layout": "nchw", "dtype": "float32", "device": "cpu",
            "impls": impls, "threads": threads,
            "extra_s_normkit": impls["normkit"]["process_s"] - impls["torch"]["process_s"]}

"""The code Inductor generates for a timm model and for its normkit conversion (``normkit.convert``), side by side.

Nothing is timed: the script builds the timm model from its config (no weights, 10 classes, ``img_size=64`` for a
ViT), converts a deep copy with ``normkit.convert``, compiles each with ``torch.compile`` (dynamo reset between the
two) and captures the generated code with ``torch._inductor.utils.run_and_get_code`` on one 4×3×64×64 batch, two
threads. Printed, one line: the number of fused CPU kernels (``cpp_fused_*``), the length of the generated code and
the number of ``extern_kernels.`` calls for each, and how often ``normkit`` occurs in normkit's code (its custom ops
kept opaque). The two codes are written to ``/tmp/code_{model}_{mode}_torch.py`` and ``..._normkit.py`` for a diff.

Modes: ``train`` = a training step (forward + ``y.sum().backward()``), ``eval`` = eval-mode forward under no_grad,
``freeze`` = the same with ``torch._inductor.config.freezing`` (BatchNorm folded into the convolutions).

    PYTHONPATH=src .venv/bin/python scripts/compile_generated_code.py resnet18 train
    PYTHONPATH=src .venv/bin/python scripts/compile_generated_code.py resnet18 eval
    PYTHONPATH=src .venv/bin/python scripts/compile_generated_code.py resnet18 freeze
    PYTHONPATH=src .venv/bin/python scripts/compile_generated_code.py convnext_atto train
    PYTHONPATH=src .venv/bin/python scripts/compile_generated_code.py vit_tiny_patch16_224 train

Its results are quoted in docs/benchmarks.md, section "One front door, torch.compile and per-call cost (issue 21,
5 Dec)" (the table of kernels torch / normkit).
"""

from __future__ import annotations

import argparse
import copy
import re
import warnings

import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

import normkit


def define_torchvision_schemas():
    """Define the ``torchvision::nms`` / ``qnms`` schemas so that ``import timm`` (which imports torchvision) works.

    The torchvision wheel here is a CUDA build whose compiled ops do not load beside the CPU torch; torchvision
    registers fake kernels for these two ops at import, and that fails unless their schemas exist. Schemas only, no
    kernels: nothing here calls them.
    """
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def generated_code(model, x, mode):
    """The code Inductor generates for ``model`` on ``x`` in ``mode``, all of its files joined."""
    torch._dynamo.reset()
    model.train(mode == "train")
    compiled = torch.compile(model)

    def step():
        if mode == "train":
            y = compiled(x)
            y.sum().backward()
            return y
        with torch.no_grad():
            return compiled(x)

    _, code = run_and_get_code(step)
    return "\n".join(code)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a timm model name, e.g. resnet18, convnext_atto, vit_tiny_patch16_224")
    p.add_argument("mode", choices=("train", "eval", "freeze"),
                   help="train: a training step; eval: eval forward; freeze: eval forward with Inductor's freezing")
    args = p.parse_args()
    name, mode = args.model, args.mode

    warnings.filterwarnings("ignore")
    define_torchvision_schemas()  # before timm imports torchvision
    import timm

    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=10, **({"img_size": 64} if "vit" in name else {}))
    ours = normkit.convert(copy.deepcopy(base))
    x = torch.randn(4, 3, 64, 64)
    if mode == "freeze":
        inductor_config.freezing = True

    a, b = generated_code(base, x, mode), generated_code(ours, x, mode)
    ka = re.findall(r"cpp_fused_\w+ = ", a)
    kb = re.findall(r"cpp_fused_\w+ = ", b)
    print(f"{name} {mode}: kernels torch {len(ka)} normkit {len(kb)}; code chars torch {len(a)} normkit {len(b)}; "
          f"extern calls torch {a.count('extern_kernels.')} normkit {b.count('extern_kernels.')}; "
          f"normkit ops in normkit's code: {b.count('normkit')}")
    for who, code in (("torch", a), ("normkit", b)):
        with open(f"/tmp/code_{name}_{mode}_{who}.py", "w") as f:
            f.write(code)


if __name__ == "__main__":
    main()

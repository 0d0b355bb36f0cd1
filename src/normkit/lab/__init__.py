"""``normkit lab``: experiments that measure the claims made about Batch Normalization.

Each claim (:mod:`normkit.lab.claims`) declares, before it runs, the paper it comes from, the
number it echoes and the :class:`~normkit.lab.framework.Criterion` it will be judged by; the
verdict is computed from the measurements with a stated test over seeds
(:mod:`normkit.lab.framework`), whose seeds are added sequentially with error rates that hold over
the repeated looks (:mod:`normkit.lab.sequential`) within a budget of modeled time
(:mod:`normkit.lab.costs`, :mod:`normkit.lab.runner`). The lab is a user of normkit: its models use
normkit's public layers only.
"""

from .framework import Check, Claim, Criterion, Outcome, Part, Result, evaluate

__all__ = ["Check", "Claim", "Criterion", "Outcome", "Part", "Result", "evaluate"]

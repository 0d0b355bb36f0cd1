"""What :func:`normkit.convert` did to a model's norm layers: swapped, fused, left (and why).

``normkit.convert(model, report=True)`` returns ``(model, ConversionReport)``. The report counts
every norm layer of the model as it was (the census of :func:`normkit.tools.recipes.is_norm_layer`:
torch.nn norms and their subclasses, and any class named ``…Norm…`` whose children hold no
parameters), per class: how many became which normkit class, how many of those run an activation
inside the norm's kernel ("fused"), how many were left and the reason for each. ``str(report)`` is
a table; ``report.as_dict()`` the same as plain data (``normkit bench --suite zoo`` stores it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["ConversionReport", "ClassReport"]


@dataclass
class ClassReport:
    """One original class: its layers' fate."""

    name: str  # library.QualName
    layers: int = 0
    became: Counter = field(default_factory=Counter)  # target class -> count
    fused: Counter = field(default_factory=Counter)  # activation name -> count (among the swapped)
    left: Counter = field(default_factory=Counter)  # reason -> count
    recipes: Counter = field(default_factory=Counter)  # recipe -> count (among the swapped)
    already: int = 0  # layers that were the target library's already (counted apart)

    @property
    def swapped(self) -> int:
        return sum(self.became.values())


@dataclass
class ConversionReport:
    """Per class of norm layer: swapped → target, fused, left → reason; totals and coverage."""

    to: str
    classes: dict[str, ClassReport] = field(default_factory=dict)
    verified: int = 0  # swaps checked on probes
    verify_failed: int = 0  # swaps undone because the probe showed a difference
    verify_seconds: float = 0.0
    seconds: float = 0.0

    def entry(self, name: str) -> ClassReport:
        if name not in self.classes:
            self.classes[name] = ClassReport(name)
        return self.classes[name]

    @property
    def norm_layers(self) -> int:
        """Norm layers that were not the target library's already."""
        return sum(c.layers - c.already for c in self.classes.values())

    @property
    def swapped(self) -> int:
        return sum(c.swapped for c in self.classes.values())

    @property
    def fused(self) -> int:
        return sum(sum(c.fused.values()) for c in self.classes.values())

    @property
    def left(self) -> int:
        return sum(sum(c.left.values()) for c in self.classes.values())

    @property
    def already(self) -> int:
        return sum(c.already for c in self.classes.values())

    @property
    def coverage(self) -> float | None:
        """Share of the norm layers (not the target's already) that were swapped; None if there are none."""
        n = self.norm_layers
        return self.swapped / n if n else None

    def left_by_reason(self) -> dict[str, dict[str, int]]:
        """class -> {reason: count} for every class with layers left."""
        return {n: dict(c.left) for n, c in self.classes.items() if c.left}

    def as_dict(self) -> dict:
        return {
            "to": self.to, "norm_layers": self.norm_layers, "swapped": self.swapped, "fused": self.fused,
            "left": self.left, "already": self.already, "coverage": self.coverage, "verified": self.verified,
            "verify_failed": self.verify_failed, "verify_seconds": self.verify_seconds, "seconds": self.seconds,
            "classes": {n: {"layers": c.layers, "became": dict(c.became), "fused": dict(c.fused),
                            "left": dict(c.left), "recipes": dict(c.recipes), "already": c.already}
                        for n, c in self.classes.items()},
        }

    def __str__(self) -> str:
        cov = "-" if self.coverage is None else f"{100 * self.coverage:.0f}%"
        head = (f"normkit.convert(to={self.to!r}): swapped {self.swapped} of {self.norm_layers} norm layers ({cov}), "
                f"fused {self.fused}, left {self.left}")
        if self.already:
            head += f"; {self.already} were {self.to}'s already"
        if self.verified or self.verify_failed:
            head += (f"; verified {self.verified} swap(s) on probes in {self.verify_seconds * 1e3:.0f} ms"
                     + (f", {self.verify_failed} undone" if self.verify_failed else ""))
        lines = [head]
        width = max((len(n) for n in self.classes), default=10)
        for name, c in sorted(self.classes.items(), key=lambda kv: (-kv[1].layers, kv[0])):
            parts = []
            for target, n in c.became.most_common():
                fused = ", ".join(f"{a} ×{k}" for a, k in c.fused.most_common())
                parts.append(f"→ {target} ×{n}" + (f" (fused {fused})" if fused else ""))
            for reason, n in c.left.most_common():
                parts.append(f"left ×{n}: {reason}")
            if c.already:
                parts.append(f"{self.to}'s already ×{c.already}")
            lines.append(f"  {name:<{width}} {c.layers:>5}  " + "; ".join(parts))
        return "\n".join(lines)

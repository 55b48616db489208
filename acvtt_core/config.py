"""Model configuration and named presets.

A `ModelConfig` fully determines the parameter shapes of an ACVTT model, so it is what a checkpoint
stores next to its weights and what a load checks the weights against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# MRNLA sites, named by the scale of the feature map they act on. Index i has patch size b = 2**i so
# that every site sees the same (H/8) x (W/8) token grid.
MRNLA_LEVELS: tuple[str, ...] = ("1/8", "1/4", "1/2", "1/1")

HU_MIN = -1024.0
HU_MAX = 3071.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an ACVTT model.

    width: C, the stage-1 encoder widths are C, 2C, 4C, 8C.
    n_refs: R, the number of axial reference slices.
    mrnla_levels: indices into MRNLA_LEVELS (0 = bottleneck at 1/8 scale ... 3 = full scale).
    fusion_width: width of the stage-2 fusion U-Net (defaults to `width`).
    factor_conditioning: when on, stage 1 adds a learned embedding of 1/factor to its stem
        features; off keeps the published architecture.
    """

    width: int = 64
    n_refs: int = 3
    mrnla_levels: tuple[int, ...] = (0, 1, 2, 3)
    fusion_width: int | None = None
    factor_conditioning: bool = False

    def __post_init__(self) -> None:
        if self.width < 1 or self.n_refs < 1:
            raise ValueError(f"width and n_refs must be >= 1, got {self.width}, {self.n_refs}")
        levels = tuple(sorted(set(int(v) for v in self.mrnla_levels)))
        if any(v not in range(len(MRNLA_LEVELS)) for v in levels):
            raise ValueError(f"mrnla_levels must be within 0..3, got {self.mrnla_levels}")
        object.__setattr__(self, "mrnla_levels", levels)

    @property
    def fusion_c(self) -> int:
        return self.fusion_width or self.width

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mrnla_levels"] = list(self.mrnla_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        if "mrnla_levels" in d:
            d["mrnla_levels"] = tuple(d["mrnla_levels"])
        return cls(**d)


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        ModelConfig(width=64, n_refs=3, mrnla_levels=(0, 1, 2, 3)),
        "As published: C=64, R=3, MRNLA at all four decoder levels.",
    ),
    # Chosen by measurement on a 2-core CPU, see docs/ACVTT.md ("Choosing the compact preset").
    "compact": Preset(
        "compact",
        ModelConfig(width=8, n_refs=2, mrnla_levels=(0,), fusion_width=8),
        "CPU deployment: C=8, R=2, MRNLA at the 1/8 bottleneck only, fusion width 8.",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

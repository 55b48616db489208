"""Checkpoints: safetensors weights plus a JSON metadata sidecar (`x.safetensors` + `x.json`).

Loading never unpickles. A checkpoint whose tensors do not match the model its metadata describes
fails with one `CheckpointMismatchError` that lists the differences.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from acvtt_core import __version__
from acvtt_core.config import HU_MAX, HU_MIN, ModelConfig
from acvtt_core.model import ACVTT

FORMAT_VERSION = 1
NORMALISATION = {"hu_min": HU_MIN, "hu_max": HU_MAX, "map": "clip then linear to [0, 1]"}


class CheckpointError(ValueError):
    """A checkpoint file (weights or metadata) cannot be read."""


class CheckpointMismatchError(ValueError):
    """The weights in a checkpoint do not fit the model its metadata (or the caller) asks for."""


@dataclass
class CheckpointMeta:
    preset: str
    model: ModelConfig
    factors: list[int]
    training_data: str | dict[str, Any] = "untrained"
    metrics: dict[str, Any] = field(default_factory=dict)
    normalisation: dict[str, Any] = field(default_factory=lambda: dict(NORMALISATION))
    code_version: str = ""
    model_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # code_version is stamped when the checkpoint is saved (`save_checkpoint`), not here:
        # metadata is built often (every load, every untrained model) and git costs a process.
        if not self.model_id:
            self.model_id = f"acvtt-{self.preset}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d["model"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@functools.cache
def code_version() -> str:
    """Package version and git commit of this code (git runs once per process)."""
    v = f"acvtt_core {__version__}"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v} (git {sha})" if sha else v


def meta_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(path: str | Path, model: ACVTT, meta: CheckpointMeta) -> Path:
    """Write `path` (.safetensors) and its `.json` metadata. Returns the weights path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if meta.model != model.cfg:
        raise ValueError("metadata model config differs from the model being saved")
    if not meta.code_version:
        meta.code_version = code_version()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    text = json.dumps(meta.to_dict(), indent=2, sort_keys=True)
    save_file(tensors, str(path), metadata={"acvtt_meta": text})
    meta_path(path).write_text(text + "\n")
    return path


def weights_version(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def read_meta(path: str | Path) -> CheckpointMeta:
    """Metadata from the JSON sidecar, or from the safetensors header if the sidecar is missing."""
    path = Path(path)
    mp = meta_path(path)
    if mp.exists():
        return CheckpointMeta.from_dict(json.loads(mp.read_text()))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("acvtt_meta")
    if text is None:
        raise FileNotFoundError(f"no metadata for checkpoint {path}: expected {mp}")
    return CheckpointMeta.from_dict(json.loads(text))


def check_state(model: ACVTT, tensors: dict[str, torch.Tensor], source: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    problems += [
        f"{k}: checkpoint {got[k]} vs model {want[k]}"
        for k in sorted(want.keys() & got.keys())
        if got[k] != want[k]
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match model config {model.cfg.to_dict()}: "
            f"{len(problems)} problem(s): {shown}"
        )


def load_checkpoint(
    path: str | Path, expect: ModelConfig | None = None
) -> tuple[ACVTT, CheckpointMeta, str]:
    """Load (model, metadata, version) from safetensors + JSON. If `expect` is given, the
    checkpoint must describe exactly that config."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        meta = read_meta(path)
    except Exception as exc:  # corrupt header or JSON: say which file, whatever the parser says
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if expect is not None and expect != meta.model:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds model config {meta.model.to_dict()}, "
            f"but {expect.to_dict()} was requested"
        )
    model = ACVTT(meta.model)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    check_state(model, tensors, str(path))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, meta, weights_version(path)

"""Training recipes: named samplers, the model to start from, and `run_training`, the one entry
point that `acvtt train` and `acvtt adapt` call.

`run_training` builds the model (a preset, factor conditioning, He or PyTorch initialisation, or
a checkpoint's weights), the named sampler over the training sources, the checkpoint metadata
(training volumes, held-out cases, sampler, degradations), and runs `acvtt_core.train.train`,
which resumes from the run folder. The shipped default model is stage 1 trained with the
`selfsup` sampler (docs/MODEL.md); `selfsup-torch` makes the same samples on the training device
(the GPU recipe, scripts/gpu_train.sh).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from acvtt_core.config import ModelConfig, get_preset
from acvtt_core.evaluate import METRICS
from acvtt_core.model import ACVTT, INITS, fresh_model
from acvtt_core.selfsup import MixedSampler, Source
from acvtt_core.train import (
    Batch,
    FusionSampler,
    Sampler,
    SyntheticZSampler,
    TrainConfig,
    stage1_predictions,
    train,
)
from acvtt_core.volume import normalise_hu

DEGRADATIONS = {
    "decimate": "thick slice k = thin row k*r (point sample)",
    "slab": "thick slice k = weighted mean of thin rows k*r-r..k*r+r with a slice profile: box "
    "(exactly r rows thick, half weight at the edges) or Gaussian (FWHM r*U(0.8,1.2))",
}

SAMPLERS = {
    "selfsup": "stage 1: in-plane self-supervision + synthetic z, decimation + slab averaging "
    "(selfsup.MixedSampler, made on the CPU; the default model's recipe)",
    "selfsup-torch": "stage 1: the same samples made on the training device "
    "(device_sampler.DeviceMixedSampler; the GPU recipe)",
    "synthetic-z": "stage 1: the paper's samples, synthetic z by decimation only "
    "(train.SyntheticZSampler)",
    "fusion": "stage 2: axial crops of a stage-1 predictor's coronal and sagittal results "
    "(train.FusionSampler)",
}
# Slices smaller than this give synthetic-z samples only (in-plane crops would be too small).
MIN_INPLANE_SLICE = 96


@dataclasses.dataclass
class Recipe:
    """What to train, apart from the loop settings (`TrainConfig`).

    sampler: a SAMPLERS name. preset + overrides (ModelConfig fields) + factor_conditioning: the
    architecture, unless `init` is a checkpoint path ("he" or "default": how a new model's
    stage-1 convolutions are initialised). predictor/allow_leak: stage 2 only.
    """

    sampler: str = "selfsup"
    preset: str = "compact"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    factor_conditioning: bool = True
    init: str = "he"
    factors: tuple[int, ...] = (2, 3, 4, 5)
    crop: int = 128
    p_inplane: float = 0.6
    p_slab: float = 0.4
    thin_mm: tuple[float, float] = (0.8, 5.0)
    held_out: Sequence[str] = ()
    predictor: str | None = None
    allow_leak: bool = False


def default_sampler(stage: int, device: str) -> str:
    """fusion for stage 2; stage 1 samples on the device when it is a GPU."""
    if stage == 2:
        return "fusion"
    return "selfsup-torch" if device.startswith("cuda") else "selfsup"


# -- sources ------------------------------------------------------------------------------------
def parse_source(spec: str) -> tuple[Path, str | None, float | None]:
    """PATH[:ROLES[:WEIGHT]], ROLES a subset of 'iz' (i: in-plane, z: synthetic z); None where
    not given (`load_source` then decides from the slice size)."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[1] and set(parts[1]) <= set("iz"):
        return Path(parts[0]), parts[1], float(parts[2])
    parts = spec.rsplit(":", 1)
    if len(parts) == 2 and parts[1] and set(parts[1]) <= set("iz"):
        return Path(parts[0]), parts[1], None
    return Path(spec), None, None


def volume_name(path: str | Path) -> str:
    n = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if n.endswith(ext):
            return n[: -len(ext)]
    return n


def load_source(path: str | Path, roles: str | None = None, weight: float | None = None) -> Source:
    """A training source from a volume file or DICOM folder, read in the model's slice order and
    normalised. Without `roles`, slices of at least MIN_INPLANE_SLICE pixels a side give in-plane
    and synthetic-z samples, smaller ones (a spine crop) synthetic z only at weight 0.3."""
    from acvtt_core.volume_io import read_volume

    path = Path(path)
    vol, geom = read_volume(path)
    sx, sy, sz = geom.spacing
    if roles is None:
        small = min(vol.shape[1:]) < MIN_INPLANE_SLICE
        roles, auto_weight = ("z", 0.3) if small else ("iz", 1.0)
        weight = auto_weight if weight is None else weight
    return Source(
        volume_name(path),
        normalise_hu(vol),
        (float(sz), float(sy), float(sx)),
        inplane="i" in roles,
        synthetic_z="z" in roles,
        weight=1.0 if weight is None else weight,
    )


# -- model ----------------------------------------------------------------------------------------
def model_config(
    preset: str, factor_conditioning: bool = True, overrides: dict[str, Any] | None = None
) -> tuple[str, ModelConfig]:
    """(label, config): the preset's config with overrides; the label is the preset, plus
    '+factor' with factor conditioning, or '+custom' with other changes."""
    base = get_preset(preset).model
    cfg = dataclasses.replace(base, **(overrides or {}), factor_conditioning=factor_conditioning)
    if cfg == base:
        return preset, cfg
    if dataclasses.replace(cfg, factor_conditioning=base.factor_conditioning) == base:
        return f"{preset}+factor", cfg
    return f"{preset}+custom", cfg


def build_model(recipe: Recipe, seed: int) -> tuple[ACVTT, str, CheckpointMeta | None, str]:
    """(model, label, base metadata or None, base version or "") for the recipe's `init`."""
    if recipe.init not in INITS:
        model, base_meta, version = load_checkpoint(recipe.init)
        return model, base_meta.preset, base_meta, version
    label, cfg = model_config(recipe.preset, recipe.factor_conditioning, recipe.overrides)
    return fresh_model(cfg, recipe.init, seed), label, None, ""


# -- samplers -------------------------------------------------------------------------------------
def build_sampler(
    recipe: Recipe,
    sources: Sequence[Source],
    model: ACVTT,
    base_meta: CheckpointMeta | None,
    device: str,
    log: Callable[[str], None] = print,
) -> Sampler:
    """The named sampler of `recipe` over `sources` (normalised volumes)."""
    name, n_refs = recipe.sampler, model.cfg.n_refs
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")
    common = dict(factors=tuple(recipe.factors), n_refs=n_refs, crop=recipe.crop)
    mixed = dict(common, ref_crop=recipe.crop, p_inplane=recipe.p_inplane, p_slab=recipe.p_slab)
    mixed["thin_mm"] = tuple(recipe.thin_mm)
    if name == "selfsup":
        return MixedSampler(list(sources), **mixed)
    if name == "selfsup-torch":
        from acvtt_core.device_sampler import DeviceMixedSampler

        return DeviceMixedSampler(list(sources), **mixed, device=device)
    names = [s.name for s in sources]
    if name == "synthetic-z":
        return SyntheticZSampler([s.vol for s in sources], **common, names=names)
    return fusion_sampler(recipe, sources, model, base_meta, device, log)


def _trained_on(meta: CheckpointMeta | None) -> set[str]:
    data = meta.training_data if meta is not None else None
    if not isinstance(data, dict):
        return set()
    return set(data.get("volumes", [])) | set(data.get("train_volumes", {}))


def fusion_sampler(recipe, sources, model, base_meta, device, log) -> FusionSampler:
    """Stage-2 samples: the stage-1 results of the predictor (`recipe.predictor`, else the model
    itself) on every source and factor. Refuses a predictor trained on any of the sources
    (its results there would be better than on new patients) unless `allow_leak`."""
    predictor, seen = model, _trained_on(base_meta)
    if recipe.predictor is not None:
        predictor, pmeta, _ = load_checkpoint(recipe.predictor)
        seen = _trained_on(pmeta)
    leak = seen & {s.name for s in sources}
    if leak and not recipe.allow_leak:
        raise ValueError(
            f"stage-1 predictor was trained on {sorted(leak)}; stage 2 would learn from leaked "
            "results. Pass --predictor trained on other volumes (or --allow-leak)."
        )
    records = []
    for s in sources:
        for r in recipe.factors:
            log(f"stage-1 predictions for {s.name} x{r}")
            cor, sag, hr = stage1_predictions(predictor, s.vol, r, device)
            records.append((cor, sag, hr, r))
    return FusionSampler(records, recipe.crop, [s.name for s in sources])


# -- metadata and the entry point ---------------------------------------------------------------
def build_meta(
    recipe: Recipe,
    stage: int,
    sources: Sequence[Source],
    model: ACVTT,
    label: str,
    sampler: Sampler,
    base: tuple[CheckpointMeta | None, str],
    loss: str,
) -> CheckpointMeta:
    """Metadata of the run's checkpoints. From a checkpoint, its training volumes, factors and
    training record are kept (the weights carry them)."""
    base_meta, base_version = base
    prev = (
        base_meta.training_data if base_meta and isinstance(base_meta.training_data, dict) else {}
    )
    this = {s.name: s.describe() for s in sources}
    training_data = {
        **prev,
        "volumes": sorted(_trained_on(base_meta) | set(this)),
        "train_volumes": {**prev.get("train_volumes", {}), **this},
        "held_out": list(recipe.held_out),
        f"stage{stage}": sampler.describe(),
    }
    extra: dict[str, Any] = dict(base_meta.extra) if base_meta else {}
    extra.update(
        recipe="acvtt train",
        sampler=recipe.sampler,
        init=recipe.init if base_meta is None else "checkpoint",
        loss=loss,
    )
    if recipe.sampler.startswith("selfsup"):
        extra["degradations"] = DEGRADATIONS
    if stage == 1:
        extra["factor_handling"] = (
            "one model for all factors, conditioned on 1/factor (stem embedding)"
            if model.cfg.factor_conditioning
            else "one unconditioned model for all factors"
        )
        extra.setdefault("stage2", "fusion head zero-initialised: output = mean(cor, sag)")
    if base_meta is not None:
        extra.update(base_checkpoint=str(recipe.init), base_version=base_version)
    factors = set(recipe.factors) | set(base_meta.factors if base_meta else [])
    return CheckpointMeta(
        preset=label,
        model=model.cfg,
        factors=sorted(factors),
        training_data=training_data,
        extra=extra,
    )


def run_training(
    sources: Sequence[Source],
    out: Path,
    recipe: Recipe,
    cfg: TrainConfig,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train (or resume) in `out`: out/last.safetensors (+json) and train state, checkpointed as
    `cfg` says; out/train_log.jsonl and out/phases.jsonl (per checkpoint: loss next to the
    baseline's on the same batches, seconds per step, sample counts); the result is copied to
    out/model.safetensors (+json). Returns out/last.safetensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not sources:
        raise ValueError("no training volumes")
    if (recipe.sampler == "fusion") != (cfg.stage == 2):
        raise ValueError(f"sampler {recipe.sampler!r} does not train stage {cfg.stage}")
    model, label, base_meta, base_version = build_model(recipe, cfg.seed)
    sampler = build_sampler(recipe, sources, model, base_meta, cfg.device, log)
    meta = build_meta(
        recipe, cfg.stage, sources, model, label, sampler, (base_meta, base_version), cfg.loss
    )
    if resume and (out / "train_state.json").exists():
        log(f"resuming at step {json.loads((out / 'train_state.json').read_text())['step']}")
    baseline = "linear" if cfg.stage == 1 else "viewmean"

    def on_checkpoint(rec: dict[str, Any]) -> None:
        rec[f"{cfg.loss}_{baseline}"] = rec.pop(f"{cfg.loss}_baseline")
        with open(out / "phases.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(json.dumps(rec))

    train(model, sampler, cfg, meta, out, resume=resume, on_checkpoint=on_checkpoint)
    if (out / "last.safetensors").exists():
        shutil.copy(out / "last.safetensors", out / "model.safetensors")
        shutil.copy(out / "last.json", out / "model.json")
    return out / "last.safetensors"


# -- kept for training/continue_default.py (a driver of its own around `train`) ------------------
class LoggingSampler:
    """Wraps a sampler and records the L1 and MSE of the linear-interpolation input per batch.
    (`train` now logs that baseline itself; this stays for drivers that read it here.)"""

    def __init__(self, inner):
        self.inner = inner
        self.linear_l1: list[float] = []
        self.linear_mse: list[float] = []

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        b = self.inner.sample(batch_size, rng)
        self.linear_l1.append(float((b.x - b.target).abs().mean()))
        self.linear_mse.append(float(((b.x - b.target) ** 2).mean()))
        return b


def train_stage1(
    model: ACVTT, sampler, cfg: TrainConfig, meta: CheckpointMeta, out_dir: Path, loss: str = "mse"
) -> list[float]:
    """`train` for stage 1 with `loss`; resumes from `out_dir`."""
    cfg = dataclasses.replace(cfg, stage=1, loss=loss)
    return train(model, sampler, cfg, meta, out_dir, resume=True)


def ship(
    checkpoint: Path,
    eval_json: Path | None = None,
    out: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Copy a trained checkpoint to the shipped default weights (acvtt_core/weights/default.*),
    with the `acvtt eval` results (rows + summary) in its metadata. Returns the weights path."""
    from acvtt_core.checkpoint import code_version
    from acvtt_core.infer import DEFAULT_CHECKPOINT

    model, meta, version = load_checkpoint(checkpoint)
    meta.code_version = code_version()
    meta.model_id = "acvtt-default"
    if eval_json is not None:
        res = json.loads(Path(eval_json).read_text())
        keep = ("case", "factor", "method", *METRICS, "seconds")
        meta.metrics = {
            "protocol": "acvtt eval: paper protocol (LR = HR[::r], 5 slices dropped per end, "
            "PSNR data range 1, 3D SSIM skimage defaults), held-out patients only",
            "rows": [{k: r[k] for k in keep if k in r} for r in res["rows"]],
            "summary": res["summary"],
            "model_version_evaluated": res.get("model", {}).get("version", version),
        }
    meta.extra = {**meta.extra, **(extra or {}), "trained_checkpoint_version": version}
    return save_checkpoint(out or DEFAULT_CHECKPOINT, model, meta)

"""The default-model training recipe: stage 1 trained on `selfsup.MixedSampler` (in-plane
self-supervision + synthetic z, decimation + slab averaging, factors x2..x5), one model
conditioned on the factor, stage-2 fusion left at its zero-initialised head (output = mean of the
coronal and sagittal results; see docs/MODEL.md for why).

Training runs in phases of `phase_steps` on top of `acvtt_core.train.train` (which resumes from
`out/last.safetensors` + `out/train_state.*`), until `steps` or a wall-clock budget is reached, so
a killed run resumes where it stopped. The learning rate drops by 4x for the last quarter.

    python -m acvtt_core.recipe --out runs/default \\
        --source var/sample-data/volumes/chest_cta_thin.nii.gz:iz:1 \\
        --source var/sample-data/volumes/lung1_image.nrrd:iz:1 ...
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from acvtt_core.config import ModelConfig, get_preset
from acvtt_core.model import ACVTT
from acvtt_core.selfsup import MixedSampler, Source
from acvtt_core.train import Batch, TrainConfig, train
from acvtt_core.volume import normalise_hu

DEGRADATIONS = {
    "decimate": "thick slice k = thin row k*r (point sample)",
    "slab": "thick slice k = weighted mean of thin rows k*r-r..k*r+r with a slice profile: box "
    "(exactly r rows thick, half weight at the edges) or Gaussian (FWHM r*U(0.8,1.2))",
}


def parse_source(spec: str) -> tuple[Path, str, float]:
    """PATH[:ROLES[:WEIGHT]], ROLES a subset of 'iz' (i: in-plane, z: synthetic z)."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and set(parts[1]) <= set("iz") and parts[1]:
        return Path(parts[0]), parts[1], float(parts[2])
    parts = spec.rsplit(":", 1)
    if len(parts) == 2 and parts[1] and set(parts[1]) <= set("iz"):
        return Path(parts[0]), parts[1], 1.0
    return Path(spec), "iz", 1.0


def volume_name(path: Path) -> str:
    n = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if n.endswith(ext):
            return n[: -len(ext)]
    return n


def load_source(path: Path, roles: str = "iz", weight: float = 1.0) -> Source:
    from acvtt_core.volume_io import read_volume

    vol, geom = read_volume(path)
    sx, sy, sz = geom.spacing
    return Source(
        volume_name(path),
        normalise_hu(vol),
        (float(sz), float(sy), float(sx)),
        inplane="i" in roles,
        synthetic_z="z" in roles,
        weight=weight,
    )


class LoggingSampler:
    """Wraps a sampler and records the L1 of the linear-interpolation input per batch, so the
    training log shows the model loss next to the linear baseline on the same batches."""

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
    model: ACVTT,
    sampler,
    cfg: TrainConfig,
    meta: CheckpointMeta,
    out_dir: Path,
    loss: str = "mse",
) -> list[float]:
    """`acvtt_core.train.train` for stage 1 with the recipe's loss; resumes from `out_dir`."""
    cfg = dataclasses.replace(cfg, stage=1, loss=loss)
    return train(model, sampler, cfg, meta, out_dir, resume=True)


def _set_saved_lr(out: Path, lr: float) -> None:
    p = out / "train_state.json"
    if p.exists():
        info = json.loads(p.read_text())
        for g in info["param_groups"]:
            g["lr"] = lr
        p.write_text(json.dumps(info))


def he_init(model: ACVTT) -> None:
    """Kaiming-normal (fan-in, ReLU) weights and zero biases for every stage-1 conv except the
    zero-initialised output head. PyTorch's default conv init shrinks activations ~0.6x per
    layer, so after the ~12 convs of this un-normalised U-Net the head sees almost no signal and
    learning starts very slowly; this keeps activation variance. The model still starts as
    linear interpolation (zero head)."""
    from torch import nn

    for name, mod in model.stage1.named_modules():
        if isinstance(mod, nn.Conv2d) and not name.endswith("head"):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)


def model_config(preset: str, factor_conditioning: bool = True) -> tuple[str, ModelConfig]:
    cfg = dataclasses.replace(get_preset(preset).model, factor_conditioning=factor_conditioning)
    label = preset if cfg == get_preset(preset).model else f"{preset}+factor"
    return label, cfg


def run_recipe(
    sources: list[Source],
    out: Path,
    preset: str = "compact",
    factors: tuple[int, ...] = (2, 3, 4, 5),
    steps: int = 20000,
    budget_min: float = 55.0,
    batch_size: int = 4,
    crop: int = 128,
    lr: float = 1e-3,
    phase_steps: int = 250,
    seed: int = 0,
    threads: int = 1,
    p_inplane: float = 0.6,
    p_slab: float = 0.4,
    base: Path | None = None,
    held_out: list[str] | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
    init: str = "he",
    loss: str = "mse",
    log=print,
) -> Path:
    """Train (or resume) stage 1 in `out`; returns out/last.safetensors."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if base is not None:
        model, base_meta, _ = load_checkpoint(base)
        cfg, label = model.cfg, base_meta.preset
    else:
        label, cfg = model_config(preset)
        torch.manual_seed(seed)
        model = ACVTT(cfg)
        if init == "he":
            he_init(model)
    sampler = MixedSampler(
        sources,
        factors=factors,
        n_refs=cfg.n_refs,
        crop=crop,
        ref_crop=crop,
        p_inplane=p_inplane,
        p_slab=p_slab,
        **(sampler_kwargs or {}),
    )
    wrapped = LoggingSampler(sampler)
    meta = CheckpointMeta(
        preset=label,
        model=cfg,
        factors=list(factors),
        training_data={
            "train_volumes": {
                s.name: {
                    "spacing_mm_zyx": list(s.spacing),
                    "shape": list(s.vol.shape),
                    "inplane": s.inplane,
                    "synthetic_z": s.synthetic_z,
                }
                for s in sources
            },
            "held_out": held_out or [],
            "sampler": sampler.describe(),
        },
        extra={
            "degradations": DEGRADATIONS,
            "factor_handling": "one model for x2..x5, conditioned on 1/factor (stem embedding)"
            if cfg.factor_conditioning
            else "one unconditioned model for all factors",
            "stage2": "fusion head zero-initialised and not trained: output = mean(cor, sag)",
            "recipe": "acvtt_core.recipe",
            "init": init if base is None else "base checkpoint",
            "loss": loss,
            **({"base_checkpoint": str(base)} if base is not None else {}),
        },
    )
    if base is not None and not (out / "train_state.json").exists():
        save_checkpoint(out / "last.safetensors", model, meta)  # start point for resume
    t0 = time.time()
    done = 0
    if (out / "train_state.json").exists():
        done = int(json.loads((out / "train_state.json").read_text())["step"])
        log(f"resuming at step {done}")
    deadline = t0 + budget_min * 60
    while done < steps and time.time() < deadline:
        frac = (time.time() - t0) / (budget_min * 60)
        cur_lr = lr if frac < 0.75 and done < 0.75 * steps else lr / 4
        _set_saved_lr(out, cur_lr)
        target = min(steps, done + phase_steps)
        tc = TrainConfig(
            stage=1,
            steps=target,
            batch_size=batch_size,
            lr=cur_lr,
            seed=seed + done,
            log_every=25,
            ckpt_every=phase_steps,
            extra={"lr_final": lr / 4},
        )
        wrapped.linear_l1.clear()
        wrapped.linear_mse.clear()
        tp = time.time()
        losses = train_stage1(model, wrapped, tc, meta, out, loss)
        done = target
        rec = {
            "step": done,
            "lr": cur_lr,
            f"{loss}_model": float(np.mean(losses)) if losses else None,
            f"{loss}_linear": float(np.mean(getattr(wrapped, f"linear_{loss}")))
            if losses
            else None,
            "s_per_step": round((time.time() - tp) / max(1, len(losses)), 3),
            "elapsed_min": round((time.time() - t0) / 60, 1),
            "samples": dict(sampler.counts),
        }
        with open(out / "phases.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(json.dumps(rec))
    return out / "last.safetensors"


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--source", action="append", required=True, help="PATH[:iz[:WEIGHT]]")
    ap.add_argument("--held-out", action="append", default=[], help="names, for the metadata")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--factors", default="2,3,4,5")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--budget-min", type=float, default=55.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=("he", "default"), default="he")
    ap.add_argument("--loss", choices=("mse", "l1"), default="mse")
    ap.add_argument("--p-slab", type=float, default=0.4)
    ap.add_argument("--p-inplane", type=float, default=0.6)
    a = ap.parse_args(argv)
    srcs = [load_source(*parse_source(s)) for s in a.source]
    for s in srcs:
        print(
            f"source {s.name}: {s.vol.shape} spacing zyx {s.spacing} inplane={s.inplane} "
            f"synthetic_z={s.synthetic_z} weight={s.weight}",
            flush=True,
        )
    run_recipe(
        srcs,
        a.out,
        a.preset,
        tuple(int(f) for f in a.factors.split(",")),
        a.steps,
        a.budget_min,
        a.batch_size,
        a.crop,
        a.lr,
        seed=a.seed,
        threads=a.threads,
        p_inplane=a.p_inplane,
        p_slab=a.p_slab,
        held_out=a.held_out,
        init=a.init,
        loss=a.loss,
        log=lambda m: print(m, flush=True),
    )


if __name__ == "__main__":
    main()


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
        keep = (
            "case",
            "factor",
            "method",
            "psnr",
            "ssim",
            "psnr_synth",
            "ssim_axial",
            "ssim_coronal",
            "ssim_sagittal",
            "seconds",
        )
        meta.metrics = {
            "protocol": "acvtt eval: paper protocol (LR = HR[::r], 5 slices dropped per end, "
            "PSNR data range 1, 3D SSIM skimage defaults), held-out patients only",
            "rows": [{k: r[k] for k in keep if k in r} for r in res["rows"]],
            "summary": res["summary"],
            "model_version_evaluated": res.get("model", {}).get("version", version),
        }
    meta.extra = {**meta.extra, **(extra or {}), "trained_checkpoint_version": version}
    return save_checkpoint(out or DEFAULT_CHECKPOINT, model, meta)

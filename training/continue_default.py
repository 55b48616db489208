"""Continue training the shipped default model (stage 1) on more data, resumably, on one core.

    nohup nice -n 19 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python \\
        training/continue_default.py --run runs/h15 --state training/state \\
        --source var/sample-data/volumes/chest_cta_thin.nii.gz:iz:1 ... \\
        --phase 60:2.5e-4 --phase 30:6.25e-5 > var/h15-train.log 2>&1 &

The run starts from `--base` (default: the shipped weights) with a fresh Adam, and trains in
chunks of 250 steps through `acvtt_core.train.train` with `acvtt_core.selfsup.MixedSampler`
samples (the recipe's sampler and MSE loss). Each `--phase MINUTES:LR` runs at LR for MINUTES of
training time (paused time does not count). After every chunk the resumable state (weights,
optimizer, rng, step, phase progress) is copied atomically into `--state`; a rerun resumes from the
run folder, or from `--state` when the run folder is missing (a fresh machine). While the file
RUN/PAUSE exists the run sleeps between chunks (for benchmarks). See training/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from acvtt_core.checkpoint import (
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
    weights_version,
)
from acvtt_core.config import ModelConfig
from acvtt_core.model import INITS, fresh_model
from acvtt_core.selfsup import MixedSampler, Source
from acvtt_core.train import TrainConfig, train
from acvtt_core.volume import normalise_hu
from acvtt_core.volume_io import read_volume

# Only the library's stable pieces (checkpoint, selfsup sampler, train loop, volume I/O) are used,
# so that a rework of acvtt_core.recipe or the CLI does not break resuming this run.

REPO = Path(__file__).resolve().parent.parent
STATE_FILES = (
    "last.safetensors",
    "last.json",
    "train_state.safetensors",
    "train_state.json",
    "progress.json",
    "phases.jsonl",
)
CHUNK = 250


def parse_source(spec: str) -> tuple[Path, str, float]:
    """PATH[:ROLES[:WEIGHT]], ROLES from 'iz' (i: in-plane self-supervision, z: synthetic z)."""
    parts = spec.split(":")
    path, roles = Path(parts[0]), parts[1] if len(parts) > 1 else "iz"
    return path, roles, float(parts[2]) if len(parts) > 2 else 1.0


def load_source(path: Path, roles: str, weight: float) -> Source:
    vol, geom = read_volume(path)  # slices ascending along the normal, as the model was trained
    sx, sy, sz = geom.spacing
    name = path.name.split(".")[0]
    return Source(
        name,
        normalise_hu(vol),
        (float(sz), float(sy), float(sx)),
        inplane="i" in roles,
        synthetic_z="z" in roles,
        weight=weight,
    )


class LoggingSampler:
    """Wraps the sampler and keeps the MSE of each batch's linear-interpolation input, so the log
    shows the model's loss next to linear interpolation's on the same batches."""

    def __init__(self, inner: MixedSampler):
        self.inner = inner
        self.linear_mse: list[float] = []

    def describe(self) -> dict:
        return self.inner.describe()

    def sample(self, batch_size: int, rng: np.random.Generator):
        b = self.inner.sample(batch_size, rng)
        self.linear_mse.append(float(((b.x - b.target) ** 2).mean()))
        return b


def parse_phase(spec: str) -> tuple[float, float]:
    minutes, lr = spec.split(":")
    return float(minutes), float(lr)


def copy_state(src: Path, dst: Path) -> None:
    """Copy the state files atomically (tmp + rename each), between chunks, so that a commit of
    `dst` never sees a half-written file."""
    dst.mkdir(parents=True, exist_ok=True)
    averages = sorted(p.name for p in src.glob("average_from_phase*.*"))
    for name in (*STATE_FILES, *averages):
        if (src / name).exists():
            tmp = dst / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)


def average_name(phase: int) -> str:
    return f"average_from_phase{phase}.safetensors"


def update_average(run: Path, phase: int, model, meta: CheckpointMeta, step: int) -> None:
    """Fold the weights after a chunk into RUN/average_from_phaseN: the uniform mean of the
    weights at the end of every chunk since phase ``phase`` began (a tail average, as in
    stochastic weight averaging). Idempotent per step, so a resumed run never counts a chunk
    twice. The model has layer norms only, so the mean needs no recalibration."""
    path = run / average_name(phase)
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    chunks = 0
    if path.exists():
        prev, prev_meta, _ = load_checkpoint(path)
        info = prev_meta.extra["tail_average"]
        if info["through_step"] >= step:
            return
        chunks, mean = int(info["chunks"]), prev.state_dict()
        current = {
            k: mean[k] + (v - mean[k]) / (chunks + 1) if v.is_floating_point() else v
            for k, v in current.items()
        }
    out = copy.deepcopy(model)
    out.load_state_dict(current)
    out_meta = copy.deepcopy(meta)
    out_meta.extra = {
        **meta.extra,
        "tail_average": {"from_phase": phase, "chunks": chunks + 1, "through_step": step},
    }
    save_checkpoint(path, out, out_meta)


def set_lr(run: Path, lr: float) -> None:
    """`train` rebuilds Adam from train_state.json, whose param_groups carry the lr."""
    p = run / "train_state.json"
    if p.exists():
        info = json.loads(p.read_text())
        for g in info["param_groups"]:
            g["lr"] = lr
        p.write_text(json.dumps(info))


def build_meta(base_meta, sources, held_out: list[str], sampler, base: Path, phases):
    meta = copy.deepcopy(base_meta)
    data = base_meta.training_data if isinstance(base_meta.training_data, dict) else {}
    old = dict(data.get("train_volumes", {}))
    meta.training_data = {
        "train_volumes": {**old, **{s.name: s.describe() for s in sources}},
        "held_out": held_out,
        "sampler": sampler.describe(),
    }
    prev = {k: v for k, v in base_meta.extra.items() if k not in ("training", "adaptation")}
    meta.extra = {
        **prev,
        "continued": {
            "from": str(base),
            "from_version": weights_version(base),
            "driver": "training/continue_default.py",
            "phases_min_lr": phases,
            "optimizer": "Adam, fresh at the start of the continuation",
        },
    }
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="working folder (git-ignored)")
    ap.add_argument("--state", type=Path, default=None, help="committed copy of the state")
    ap.add_argument("--base", type=Path, default=REPO / "acvtt_core/weights/default.safetensors")
    ap.add_argument("--source", action="append", required=True, help="PATH[:iz[:WEIGHT]]")
    ap.add_argument("--held-out", action="append", default=[])
    ap.add_argument("--phase", action="append", required=True, help="MINUTES:LR")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--p-slab", type=float, default=0.4)
    ap.add_argument("--p-inplane", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--width",
        type=int,
        default=None,
        help="train a fresh model (--init, --seed) of the base's architecture at this width "
        "(U-Net and fusion) instead of continuing the base's weights",
    )
    ap.add_argument(
        "--init",
        choices=INITS,
        default="he",
        help="initialisation of a fresh --width model: 'he' (the recipe's, "
        "acvtt_core.model.he_init) or 'default' (PyTorch's, which the first width-10 run used)",
    )
    ap.add_argument(
        "--average-from-phase",
        type=int,
        action="append",
        default=[],
        help="also keep RUN/average_from_phaseN.safetensors, the mean of the weights after every "
        "chunk from phase N on (0 = the first --phase); repeatable",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 leaves the other core of a 2-core machine free; the phases count "
        "training minutes, so more threads give more steps per phase)",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run: Path = a.run
    run.mkdir(parents=True, exist_ok=True)
    if (
        not (run / "train_state.json").exists()
        and a.state
        and (a.state / "train_state.json").exists()
    ):
        copy_state(a.state, run)  # a fresh machine: pick up the committed state
        print(f"resumed from the committed state in {a.state}", flush=True)
    phases = [parse_phase(p) for p in a.phase]
    sources = [load_source(*parse_source(s)) for s in a.source]
    model, base_meta, _ = load_checkpoint(a.base)
    if a.width:
        cfg = ModelConfig.from_dict(
            {**model.cfg.to_dict(), "width": a.width, "fusion_width": a.width}
        )
        model = fresh_model(cfg, a.init, a.seed)
        base_meta = CheckpointMeta(
            preset=f"compact-w{a.width}", model=cfg, factors=list(base_meta.factors)
        )
    cfg = model.cfg
    sampler = MixedSampler(
        sources,
        factors=tuple(base_meta.factors or (2, 3, 4, 5)),
        n_refs=cfg.n_refs,
        crop=a.crop,
        ref_crop=a.crop,
        p_inplane=a.p_inplane,
        p_slab=a.p_slab,
    )
    wrapped = LoggingSampler(sampler)
    meta = build_meta(base_meta, sources, a.held_out, sampler, a.base, a.phase)
    if a.width:
        meta.extra["continued"] = {
            "fresh": f"width {a.width}, init {a.init}, seed {a.seed}",
            "architecture_of": str(a.base),
            "driver": "training/continue_default.py",
            "phases_min_lr": a.phase,
        }
    if not (run / "train_state.json").exists():
        save_checkpoint(run / "last.safetensors", model, meta)  # start point (no optimizer yet)
    prog_path = run / "progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    used = (prog.get("used_min", []) + [0.0] * len(phases))[: len(phases)]
    for s in sources:
        print(
            f"source {s.name} {s.vol.shape} zyx {s.spacing} {s.inplane}/{s.synthetic_z} "
            f"w={s.weight}",
            flush=True,
        )
    for i, (minutes, lr) in enumerate(phases):
        while used[i] < minutes:
            while (run / "PAUSE").exists():
                time.sleep(5)
            step = 0
            if (run / "train_state.json").exists():
                step = int(json.loads((run / "train_state.json").read_text())["step"])
            set_lr(run, lr)
            tc = TrainConfig(
                stage=1,
                steps=step + CHUNK,
                batch_size=a.batch_size,
                lr=lr,
                seed=a.seed + step,
                log_every=25,
                ckpt_every=CHUNK,
                loss="mse",
                extra={"phases_min_lr": a.phase},
            )
            wrapped.linear_mse.clear()
            t0 = time.time()
            losses = train(model, wrapped, tc, meta, run, resume=True)
            dt = (time.time() - t0) / 60
            used[i] += dt
            rec = {
                "step": step + CHUNK,
                "phase": i,
                "lr": lr,
                "mse_model": float(np.mean(losses)),
                "mse_linear": float(np.mean(wrapped.linear_mse)),
                "gain_db": round(10 * np.log10(np.mean(wrapped.linear_mse) / np.mean(losses)), 3),
                "s_per_step": round(dt * 60 / max(1, len(losses)), 3),
                "threads": a.threads,
                "used_min": [round(u, 2) for u in used],
                "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "samples": dict(sampler.counts),
            }
            for first in a.average_from_phase:
                if i >= first:
                    update_average(run, first, model, meta, step + CHUNK)
            with open(run / "phases.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            prog_path.write_text(json.dumps({"used_min": used, "phases": a.phase}))
            if a.state:
                copy_state(run, a.state)
            print(json.dumps(rec), flush=True)
    print("all phases done", flush=True)


if __name__ == "__main__":
    main()

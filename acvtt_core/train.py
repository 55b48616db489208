"""Training: stage 1 (cross-view transfer) and stage 2 (fusion), resumable, Adam.

`train` is the one training loop: a `Sampler` supplies batches (the paper's synthetic-z samples
here, in-plane self-supervision in `selfsup`, the same on the training device in
`device_sampler`), so sample generators plug in without touching it. It stops at a step count or
a wall-clock budget, checkpoints every N steps and/or every N seconds (resumable: weights
safetensors + JSON, optimizer tensors, step and RNG state, no pickles), can drop the learning rate
for the last part, and runs bf16 autocast (and optionally torch.compile) on CUDA.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from acvtt_core.checkpoint import CheckpointMeta, save_checkpoint
from acvtt_core.model import ACVTT
from acvtt_core.volume import linear_upsample_z, trim_for_factor


@dataclass
class Batch:
    """One training batch, normalised intensities.

    x: (N, 1, h, w) input (linearly z-upsampled through-plane images for stage 1; for stage 2
       the coronal result), target: (N, 1, h, w), refs: (N, R, hr, wr) axial references (stage 1),
    x2: (N, 1, h, w) sagittal result (stage 2 only), factor: (N,) float through-plane factor.
    """

    x: torch.Tensor
    target: torch.Tensor
    factor: torch.Tensor
    refs: torch.Tensor | None = None
    x2: torch.Tensor | None = None

    def to(self, device: str) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.x), mv(self.target), mv(self.factor), mv(self.refs), mv(self.x2))


class Sampler(Protocol):
    """Produces training batches. `describe()` goes into the checkpoint metadata."""

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class SyntheticZSampler:
    """The paper's stage-1 samples from thin volumes: LR = HR[::r] (decimation).

    A sample is a random coronal or sagittal image (50/50) of the trimmed HR volume, cropped to
    height k*r+1 starting on a thick slice (so thin row k*r is thick slice k) and width <= crop;
    its input is the corner-aligned linear upsampling of its thick rows. References are R random
    axial slices of the LR volume, each with its own random crop.
    """

    volumes: Sequence[np.ndarray]  # normalised (D, H, W)
    factors: Sequence[int] = (4,)
    crop: int = 256
    n_refs: int = 3
    names: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.volumes:
            raise ValueError("no training volumes")
        for v in self.volumes:
            if v.ndim != 3 or v.shape[0] < max(self.factors) + 1:
                raise ValueError(f"volume of shape {v.shape} too small for factors {self.factors}")

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": "synthetic_z_decimation",
            "volumes": list(self.names) or len(self.volumes),
            "factors": list(self.factors),
            "crop": self.crop,
        }

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        r = int(rng.choice(self.factors))
        depths = [(v.shape[0] - 1) // r * r + 1 for v in self.volumes]
        h = (min(self.crop, min(depths)) - 1) // r * r + 1
        inplane = min(min(v.shape[1:]) for v in self.volumes)
        w = min(self.crop, inplane)
        rc = min(self.crop, inplane)
        xs, ts, refs = [], [], []
        for _ in range(batch_size):
            vol = trim_for_factor(self.volumes[int(rng.integers(len(self.volumes)))], r)
            d = vol.shape[0]
            if rng.random() < 0.5:  # coronal: fix y
                img = vol[:, int(rng.integers(vol.shape[1])), :]
            else:  # sagittal: fix x
                img = vol[:, :, int(rng.integers(vol.shape[2]))]
            z0 = r * int(rng.integers((d - h) // r + 1))
            x0 = int(rng.integers(img.shape[1] - w + 1))
            tgt = img[z0 : z0 + h, x0 : x0 + w]
            xs.append(linear_upsample_z(tgt[::r], r))
            ts.append(tgt)
            lr = vol[::r]
            sl = []
            for _ in range(self.n_refs):
                a = lr[int(rng.integers(lr.shape[0]))]
                y1, x1 = (
                    int(rng.integers(a.shape[0] - rc + 1)),
                    int(rng.integers(a.shape[1] - rc + 1)),
                )
                sl.append(a[y1 : y1 + rc, x1 : x1 + rc])
            refs.append(np.stack(sl))
        return Batch(
            x=torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)),
            target=torch.from_numpy(np.stack(ts)[:, None].astype(np.float32)),
            factor=torch.full((batch_size,), float(r)),
            refs=torch.from_numpy(np.stack(refs).astype(np.float32)),
        )


@dataclass
class FusionSampler:
    """Stage-2 samples: random axial crops of (coronal result, sagittal result, HR target)."""

    records: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, int]]  # cor, sag, hr, factor
    crop: int = 256
    names: Sequence[str] = ()

    def describe(self) -> dict[str, Any]:
        return {"sampler": "fusion_axial", "volumes": list(self.names), "crop": self.crop}

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        h = min(self.crop, min(r[0].shape[1] for r in self.records))
        w = min(self.crop, min(r[0].shape[2] for r in self.records))
        cs, gs, ts, fs = [], [], [], []
        for _ in range(batch_size):
            cor, sag, hr, f = self.records[int(rng.integers(len(self.records)))]
            z = int(rng.integers(hr.shape[0]))
            y0, x0 = int(rng.integers(hr.shape[1] - h + 1)), int(rng.integers(hr.shape[2] - w + 1))
            sl = (z, slice(y0, y0 + h), slice(x0, x0 + w))
            cs.append(cor[sl])
            gs.append(sag[sl])
            ts.append(hr[sl])
            fs.append(float(f))

        def t(a):
            return torch.from_numpy(np.stack(a)[:, None].astype(np.float32))

        return Batch(x=t(cs), target=t(ts), factor=torch.tensor(fs), x2=t(gs))


@dataclass
class TrainConfig:
    """How `train` runs. The defaults are the library's (constant lr, step-based checkpoints);
    `acvtt train` sets the recipe's (docs/ACVTT.md)."""

    stage: int = 1
    steps: int = 1000  # total steps, including resumed ones
    batch_size: int = 2
    lr: float = 1e-4
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100  # checkpoint every this many steps ...
    device: str = "cpu"
    loss: str = "l1"  # the paper's L1; "mse" is the option the shipped model's recipe uses
    extra: dict[str, Any] = field(default_factory=dict)
    minutes: float | None = None  # wall-clock budget of this call (None: steps only)
    ckpt_seconds: float | None = None  # ... and when this many seconds passed since the last
    lr_drop_at: float | None = None  # lr / 4 once this fraction of `minutes` or `steps` is done
    bf16: bool | None = None  # autocast; None: on CUDA, off on CPU
    channels_last: bool | None = None  # None: on CUDA, off on CPU
    compile: bool = False  # torch.compile the trained stage
    clip_grad: float | None = None  # clip the gradient norm to this


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,
    "mse": F.mse_loss,
}


def _opt_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _opt_from_tensors(opt: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_train_state(
    out_dir: Path, model: ACVTT, meta: CheckpointMeta, opt, step: int, rng
) -> None:
    """Resumable state without pickles: weights checkpoint (last.safetensors + last.json),
    optimizer tensors and torch RNG (train_state.safetensors), step, param groups and numpy RNG
    (train_state.json). Each file is written aside and renamed into place, train_state.json
    last, so a run killed while saving (a per-minute checkpoint) still resumes."""
    from safetensors.torch import save_file

    tmp = save_checkpoint(out_dir / "last.tmp.safetensors", model, meta)
    tensors, info = _opt_to_tensors(opt)
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(out_dir / "train_state.tmp.safetensors"))
    info.update(step=step, numpy_rng=rng.bit_generator.state)
    (out_dir / "train_state.tmp.json").write_text(json.dumps(info))
    os.replace(tmp, out_dir / "last.safetensors")
    os.replace(tmp.with_suffix(".json"), out_dir / "last.json")
    os.replace(out_dir / "train_state.tmp.safetensors", out_dir / "train_state.safetensors")
    os.replace(out_dir / "train_state.tmp.json", out_dir / "train_state.json")


def load_train_state(out_dir: Path, model: ACVTT, opt) -> tuple[int, dict] | None:
    from safetensors.torch import load_file

    from acvtt_core.checkpoint import load_checkpoint

    if not (out_dir / "train_state.json").exists():
        return None
    saved, _, _ = load_checkpoint(out_dir / "last.safetensors", expect=model.cfg)
    model.load_state_dict(saved.state_dict())
    tensors = load_file(str(out_dir / "train_state.safetensors"))
    info = json.loads((out_dir / "train_state.json").read_text())
    _opt_from_tensors(opt, tensors, info)
    torch.set_rng_state(tensors["torch_rng"])
    return int(info["step"]), info["numpy_rng"]


def _lr_at(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """cfg.lr, or a quarter of it once `lr_drop_at` of the time budget or of the steps is done."""
    if cfg.lr_drop_at is None:
        return cfg.lr
    time_frac = elapsed_s / (cfg.minutes * 60) if cfg.minutes else 0.0
    late = time_frac >= cfg.lr_drop_at or step >= cfg.lr_drop_at * cfg.steps
    return cfg.lr / 4 if late else cfg.lr


class _Window:
    """Per-step losses kept as device tensors (no host sync per step on CUDA), read at log and
    checkpoint times."""

    def __init__(self) -> None:
        self.model: list[torch.Tensor] = []
        self.base: list[torch.Tensor] = []
        self.t0 = time.monotonic()

    def add(self, loss: torch.Tensor, base: torch.Tensor) -> None:
        self.model.append(loss.detach())
        self.base.append(base.detach())

    def means(self, last: int | None = None) -> tuple[float, float]:
        m, b = self.model[-last:] if last else self.model, self.base[-last:] if last else self.base
        return float(torch.stack(m).float().mean()), float(torch.stack(b).float().mean())


class _Loop:
    """One training run of `train`: model on the device, optimizer, forward, checkpointing."""

    def __init__(self, model: ACVTT, sampler: Sampler, cfg: TrainConfig, meta, out_dir: Path):
        self.model, self.sampler, self.cfg, self.meta, self.out = model, sampler, cfg, meta, out_dir
        cuda = cfg.device.startswith("cuda")
        self.bf16 = cuda if cfg.bf16 is None else cfg.bf16
        self.fmt = (
            torch.channels_last
            if (cuda if cfg.channels_last is None else cfg.channels_last)
            else torch.contiguous_format
        )
        model.to(cfg.device, memory_format=self.fmt).train()
        self.module = model.stage1 if cfg.stage == 1 else model.fusion
        self.fwd = torch.compile(self.module) if cfg.compile else self.module
        self.opt = torch.optim.Adam(self.module.parameters(), lr=cfg.lr)
        self.loss_fn = LOSSES[cfg.loss]

    def step(self, b: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, baseline loss) as device tensors. The baseline is
        the model's residual input (linear interpolation for stage 1, the view mean for stage
        2) scored the same way, so the log shows the gain on the same batches."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = b.x.contiguous(memory_format=self.fmt)
        dev_type = self.cfg.device.split(":")[0]
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.cfg.stage == 1:
                pred = self.fwd(x, refs=b.refs, factor=b.factor)
            else:
                pred = self.fwd(x, b.x2.contiguous(memory_format=self.fmt))
        loss = self.loss_fn(pred.float(), b.target)
        with torch.no_grad():
            base_in = b.x if self.cfg.stage == 1 else 0.5 * (b.x + b.x2)
            base = self.loss_fn(base_in, b.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip_grad)
        self.opt.step()
        return loss, base

    def checkpoint(self, step: int, rng: np.random.Generator, window: _Window, lr: float):
        """Save the resumable state (after checking the weights did not diverge); returns the
        record of the steps since the previous checkpoint."""
        model_loss, base_loss = window.means()
        if not np.isfinite(model_loss):
            raise RuntimeError(
                f"training diverged before step {step} (loss {model_loss}); not saved, the last "
                f"checkpoint in {self.out} is intact (lower --lr or set --clip-grad)"
            )
        cfg = self.cfg
        self.meta.extra.setdefault("training", {})[f"stage{cfg.stage}"] = {
            "steps": step,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "loss": cfg.loss,
            "data": self.sampler.describe(),
            **cfg.extra,
        }
        save_train_state(self.out, self.model, self.meta, self.opt, step, rng)
        secs = time.monotonic() - window.t0
        return {
            "step": step,
            "lr": lr,
            f"{cfg.loss}_model": model_loss,
            f"{cfg.loss}_baseline": base_loss,
            "s_per_step": round(secs / max(1, len(window.model)), 4),
            "samples": dict(getattr(self.sampler, "counts", {})),
        }


def _checkpoint(loop: _Loop, step, rng, window: _Window, lr: float, t0: float, callback) -> None:
    rec = loop.checkpoint(step, rng, window, lr)
    rec["elapsed_min"] = round((time.monotonic() - t0) / 60, 2)
    if callback:
        callback(rec)


def train(
    model: ACVTT,
    sampler: Sampler,
    cfg: TrainConfig,
    meta: CheckpointMeta,
    out_dir: str | Path,
    resume: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Train stage `cfg.stage` of `model` until `cfg.steps` total steps or `cfg.minutes` of wall
    clock (continuing from `out_dir`'s saved state when `resume`). Only that stage's parameters
    are optimised. Checkpoints (see `save_train_state`) every `ckpt_every` steps, every
    `ckpt_seconds` seconds and at the end; logs JSON lines to out_dir/train_log.jsonl (and to
    `log`); `on_checkpoint` gets each checkpoint's record (loss next to the baseline loss on the
    same batches). Returns the losses of the steps run in this call."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; one of {sorted(LOSSES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    loop = _Loop(model, sampler, cfg, meta, out_dir)
    step = 0
    if resume:
        state = load_train_state(out_dir, model, loop.opt)
        if state is not None:
            step, rng.bit_generator.state = state[0], state[1]
    t0 = last_ckpt = time.monotonic()
    deadline = t0 + cfg.minutes * 60 if cfg.minutes is not None else float("inf")
    run, window = _Window(), _Window()
    lr = cfg.lr
    logf = open(out_dir / "train_log.jsonl", "a")  # noqa: SIM115 - kept open for the loop
    try:
        while step < cfg.steps and time.monotonic() < deadline:
            lr = _lr_at(cfg, step, time.monotonic() - t0)
            b = sampler.sample(cfg.batch_size, rng).to(cfg.device)
            loss, base = loop.step(b, lr)
            step += 1
            run.add(loss, base)
            window.add(loss, base)
            now = time.monotonic()
            if step % cfg.log_every == 0 or step == cfg.steps or now >= deadline:
                m, bl = run.means(min(cfg.log_every, len(run.model)))
                rec = {"step": step, "stage": cfg.stage, "loss": m, "baseline": bl, "lr": lr}
                rec["elapsed_s"] = round(now - t0, 1)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if log:
                    log(rec)
            due = cfg.ckpt_seconds is not None and now - last_ckpt >= cfg.ckpt_seconds
            if step % cfg.ckpt_every == 0 or step == cfg.steps or due or now >= deadline:
                _checkpoint(loop, step, rng, window, lr, t0, on_checkpoint)
                window, last_ckpt = _Window(), time.monotonic()
        if window.model:  # the budget ran out between the checks above
            _checkpoint(loop, step, rng, window, lr, t0, on_checkpoint)
    finally:
        logf.close()
        model.eval()
    return [float(v) for v in torch.stack(run.model).cpu()] if run.model else []


@torch.inference_mode()
def stage1_predictions(
    model: ACVTT, hr: np.ndarray, factor: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coronal result, sagittal result, trimmed HR) of stage 1 on a decimated normalised HR
    volume, the inputs stage 2 trains on. Run it with a model that never saw `hr`."""
    from acvtt_core.checkpoint import CheckpointMeta as _Meta
    from acvtt_core.infer import Interpolator
    from acvtt_core.volume import decimate

    hr, lr = decimate(hr, factor)
    interp = Interpolator(
        model, _Meta("custom", model.cfg, []), "tmp", device=device, crop_body=False
    )
    cor, sag = interp.stage1_normalised(lr, factor)
    return cor, sag, hr

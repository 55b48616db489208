"""Training: stage 1 (cross-view transfer) and stage 2 (fusion), resumable, L1 loss, Adam.

Data comes from a `Sampler`, so other sample generators (for example in-plane self-supervision)
plug in without touching the loop. The built-in samplers follow the paper's recipe on synthetic
z-decimated volumes with corner-aligned crops.
"""

from __future__ import annotations

import json
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
from acvtt_core.volume import trim_for_factor


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


def _upsample_rows(img: np.ndarray, r: int) -> np.ndarray:
    """Corner-aligned linear upsampling of a 2D image's rows: (k+1, w) -> (k*r+1, w)."""
    out = np.empty(((img.shape[0] - 1) * r + 1, img.shape[1]), np.float32)
    out[::r] = img
    for j in range(1, r):
        t = j / r
        out[j::r] = (1 - t) * img[:-1] + t * img[1:]
    return out


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
            xs.append(_upsample_rows(tgt[::r], r))
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
    stage: int = 1
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    device: str = "cpu"
    loss: str = "l1"  # the paper's L1; "mse" is the option the shipped model's recipe uses
    extra: dict[str, Any] = field(default_factory=dict)


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
    """Resumable state without pickles: weights checkpoint + optimizer tensors + JSON."""
    from safetensors.torch import save_file

    save_checkpoint(out_dir / "last.safetensors", model, meta)
    tensors, info = _opt_to_tensors(opt)
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(out_dir / "train_state.safetensors"))
    info.update(step=step, numpy_rng=rng.bit_generator.state)
    (out_dir / "train_state.json").write_text(json.dumps(info))


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


def train(
    model: ACVTT,
    sampler: Sampler,
    cfg: TrainConfig,
    meta: CheckpointMeta,
    out_dir: str | Path,
    resume: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Train stage `cfg.stage` of `model` for `cfg.steps` total steps (continuing from
    `out_dir`'s saved state when `resume`). Only that stage's parameters are optimised.
    Writes out_dir/last.safetensors (+json, train state) periodically and at the end, and
    out_dir/train_log.jsonl. Returns the losses of the steps run in this call."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; one of {sorted(LOSSES)}")
    loss_fn = LOSSES[cfg.loss]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device).train()
    module = model.stage1 if cfg.stage == 1 else model.fusion
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    step = 0
    if resume:
        state = load_train_state(out_dir, model, opt)
        if state is not None:
            step, rng_state = state
            rng.bit_generator.state = rng_state
    losses: list[float] = []
    logf = open(out_dir / "train_log.jsonl", "a")  # noqa: SIM115 - kept open for the loop
    t0 = time.perf_counter()
    try:
        while step < cfg.steps:
            b = sampler.sample(cfg.batch_size, rng).to(cfg.device)
            if cfg.stage == 1:
                pred = model.stage1(b.x, refs=b.refs, factor=b.factor)
            else:
                pred = model.fusion(b.x, b.x2)
            loss = loss_fn(pred, b.target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {
                    "step": step,
                    "stage": cfg.stage,
                    "loss": float(np.mean(losses[-cfg.log_every :])),
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                }
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if log:
                    log(rec)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                meta.extra.setdefault("training", {})[f"stage{cfg.stage}"] = {
                    "steps": step,
                    "batch_size": cfg.batch_size,
                    "lr": cfg.lr,
                    "loss": cfg.loss,
                    "data": sampler.describe(),
                    **cfg.extra,
                }
                save_train_state(out_dir, model, meta, opt, step, rng)
    finally:
        logf.close()
        model.eval()
    return losses


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

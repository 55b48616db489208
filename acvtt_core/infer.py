"""Whole-volume ACVTT inference.

One volume goes through: normalise -> corner-aligned linear z upsampling -> body-box crop ->
references encoded once (k/v cached per MRNLA level) -> coronal and sagittal stage-1 passes in
batched chunks -> axial stage-2 fusion -> paste into the upsampled volume -> HU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from acvtt_core.config import ModelConfig, get_preset
from acvtt_core.model import ACVTT, RefCache, pad_to_multiple
from acvtt_core.volume import (
    BBox,
    body_bbox,
    denormalise_hu,
    linear_upsample_z,
    normalise_hu,
    output_depth,
    reference_indices,
)

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "default.safetensors"

Progress = Callable[[int, int], None]

# In-plane flips of (D, H, W) averaged by `flip_ensemble`. No z flip: the model is not symmetric in
# z (it learned the order it was trained in; docs/MODEL.md), and z-flipped passes lowered the
# held-out chest CT.
INPLANE_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (1,), (1, 2))
FLIP_ENSEMBLE_SUFFIX = "+flip4"


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:n], got {device!r}")
    return device


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


class Interpolator:
    """Interpolates thick-slice CT volumes with one ACVTT model. Thread-compatible, not
    thread-safe: use one instance per worker."""

    def __init__(
        self,
        model: ACVTT,
        meta: CheckpointMeta,
        model_version: str,
        device: str = "auto",
        crop_body: bool = True,
        body_threshold_hu: float = -500.0,
        max_chunk: int = 32,
        autocast_bf16: bool | None = None,
        keep_input_slices: bool = True,
        flip_ensemble: bool = False,
    ):
        self.device = resolve_device(device)
        # channels_last roughly doubles CPU conv throughput at these small widths (measured,
        # docs/ACVTT.md); CUDA convs under bf16 autocast prefer it too.
        self.memory_format = torch.channels_last
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.meta = meta
        self.cfg: ModelConfig = meta.model
        self.model_id = meta.model_id
        # The ensemble changes the output, so it is part of the version (the node keys derived
        # UIDs on it).
        self.flip_ensemble = flip_ensemble
        self.model_version = model_version + (FLIP_ENSEMBLE_SUFFIX if flip_ensemble else "")
        self.crop_body = crop_body
        self.body_threshold_hu = body_threshold_hu
        self.max_chunk = max_chunk
        self.keep_input_slices = keep_input_slices
        self.last_run: dict[str, object] = {}
        # bf16 autocast on CUDA; fp32 on CPU (see docs/ACVTT.md for the CPU bf16 measurement).
        self.autocast_bf16 = (
            self.device.startswith("cuda") if autocast_bf16 is None else autocast_bf16
        )

    @property
    def factors(self) -> list[int]:
        return list(self.meta.factors)

    # -- helpers ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def chunk_size(self, h: int, w: int, width: int) -> int:
        """Images per forward, from available memory: about 12 feature maps of `width` channels
        at full resolution alive at once, using at most a quarter of what is free."""
        per_image = 4 * (h + 8) * (w + 8) * width * 12 + 1
        n = int(_available_bytes(self.device) * 0.25 // per_image)
        return max(1, min(self.max_chunk, n))

    def _to_dev(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, torch.float32)

    def _images(self, a: np.ndarray) -> torch.Tensor:
        """(n, h, w) numpy -> (n, 1, h, w) device tensor in the engine's memory format."""
        return self._to_dev(a)[:, None].contiguous(memory_format=self.memory_format)

    def encode_references(self, lr: np.ndarray) -> RefCache:
        """Pick R uniformly spaced axial slices of the normalised thick volume and cache their
        per-level [v | k] tensors (batch axis 1, shared by every through-plane image)."""
        idx = reference_indices(lr.shape[0], self.cfg.n_refs)
        refs, _ = pad_to_multiple(self._to_dev(lr[idx])[None])
        with self._autocast():
            return self.model.stage1.encode_refs(refs)

    def _stage1_view(
        self, up: np.ndarray, axis: int, cache: RefCache, factor: int, tick: Callable[[int], None]
    ) -> np.ndarray:
        """Run stage 1 over every image along `axis` (1: coronal, 2: sagittal) of (D, H, W)."""
        d = up.shape[0]
        n_img = up.shape[axis]
        other = up.shape[3 - axis]
        out = np.empty_like(up)
        chunk = self.chunk_size(d, other, self.cfg.width)
        for s in range(0, n_img, chunk):
            e = min(n_img, s + chunk)
            block = up[:, s:e, :] if axis == 1 else up[:, :, s:e]
            x = self._images(np.moveaxis(block, axis, 0))  # (n, 1, D, other)
            with self._autocast():
                y = self.model.stage1(x, cache=cache, factor=factor)
            y = y[:, 0].float().cpu().numpy()
            if axis == 1:
                out[:, s:e, :] = np.moveaxis(y, 0, 1)
            else:
                out[:, :, s:e] = np.moveaxis(y, 0, 2)
            tick(e - s)
        return out

    def _fuse(self, cor: np.ndarray, sag: np.ndarray, tick: Callable[[int], None]) -> np.ndarray:
        d, h, w = cor.shape
        out = np.empty_like(cor)
        chunk = self.chunk_size(h, w, self.cfg.fusion_c)
        for s in range(0, d, chunk):
            e = min(d, s + chunk)
            c, g = self._images(cor[s:e]), self._images(sag[s:e])
            with self._autocast():
                y = self.model.fusion(c, g)
            out[s:e] = y[:, 0].float().cpu().numpy()
            tick(e - s)
        return out

    def _run_crop(
        self,
        lr_c: np.ndarray,
        up_c: np.ndarray,
        flip_axes: tuple[int, ...],
        factor: int,
        tick: Callable[[int], None],
        seconds: dict[str, float],
    ) -> np.ndarray:
        """One pass over the cropped normalised volume flipped along `flip_axes`: references,
        coronal and sagittal stage 1, fusion. Returns the fused result in the flipped frame and
        adds each stage's seconds to `seconds`."""
        lr_c = np.ascontiguousarray(np.flip(lr_c, flip_axes))
        up = np.ascontiguousarray(np.flip(up_c, flip_axes))
        t0 = time.perf_counter()
        cache = self.encode_references(lr_c)
        t1 = time.perf_counter()
        cor = self._stage1_view(up, 1, cache, factor, tick)
        t2 = time.perf_counter()
        sag = self._stage1_view(up, 2, cache, factor, tick)
        t3 = time.perf_counter()
        del cache, up
        fused = self._fuse(cor, sag, tick)
        t4 = time.perf_counter()
        for key, secs in zip(
            ("refs_s", "coronal_s", "sagittal_s", "fusion_s"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            strict=True,
        ):
            seconds[key] += secs
        return fused

    # -- public ----------------------------------------------------------------------------------
    def bbox(self, volume_hu: np.ndarray) -> BBox:
        d, h, w = volume_hu.shape
        if not self.crop_body:
            return BBox(0, h, 0, w)
        return body_bbox(volume_hu, self.body_threshold_hu)

    @torch.inference_mode()
    def stage1_normalised(self, lr: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 coronal and sagittal results for a whole normalised thick volume, no crop
        (the inputs stage 2 trains on)."""
        up = linear_upsample_z(lr, factor)
        cache = self.encode_references(lr)
        cor = self._stage1_view(up, 1, cache, factor, lambda n: None)
        sag = self._stage1_view(up, 2, cache, factor, lambda n: None)
        return cor, sag

    @torch.inference_mode()
    def interpolate(
        self,
        volume_hu: np.ndarray,
        factor: int,
        progress: Progress | None = None,
        ascending: bool = True,
    ) -> np.ndarray:
        """Interpolate a (D, H, W) HU volume (axial slices on axis 0) by an integer factor >= 2.

        Returns float32 HU of shape ((D-1)*factor+1, H, W) with out[k*factor] at in[k]'s
        position. Any H, W; D >= 2. `progress(done, total)` is called as work units complete.
        `ascending=False` says the slices run against the slice normal: the model then gets them
        reversed (the order it was trained in) and the result comes back in the given order.
        """
        if not ascending:
            vol = np.asarray(volume_hu)[::-1]
            return np.ascontiguousarray(self.interpolate(vol, factor, progress)[::-1])
        vol = np.asarray(volume_hu)
        if vol.ndim != 3:
            raise ValueError(f"volume must be (D, H, W), got shape {vol.shape}")
        if int(factor) != factor or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor}")
        factor = int(factor)
        d, h, w = vol.shape
        if d < 2:
            raise ValueError("need at least 2 slices")
        box = self.bbox(vol)
        ch, cw = box.shape
        dout = output_depth(d, factor)
        passes = INPLANE_FLIPS if self.flip_ensemble else ((),)
        total = (ch + cw + dout) * len(passes)
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        lr = normalise_hu(vol)
        up_full = linear_upsample_z(lr, factor)
        lr_c = lr[:, box.y0 : box.y1, box.x0 : box.x1]
        up = up_full[:, box.y0 : box.y1, box.x0 : box.x1]
        seconds = dict.fromkeys(("refs_s", "coronal_s", "sagittal_s", "fusion_s"), 0.0)
        fused: np.ndarray | None = None
        for axes in passes:
            out_pass = np.flip(self._run_crop(lr_c, up, axes, factor, tick, seconds), axes)
            if fused is None:
                fused = np.ascontiguousarray(out_pass)
            else:
                fused += out_pass
        assert fused is not None
        if len(passes) > 1:
            fused /= len(passes)
        self.last_run = {
            "bbox": [box.y0, box.y1, box.x0, box.x1],
            "passes": len(passes),
            **seconds,
        }
        up_full[:, box.y0 : box.y1, box.x0 : box.x1] = fused
        out = denormalise_hu(up_full)
        if self.keep_input_slices:
            # The thick slices are measured data: return them unchanged (unclipped) rather than
            # the network's estimate at those rows.
            out[::factor] = np.asarray(vol, dtype=np.float32)
        return out


def load_interpolator(
    checkpoint: str | Path | None = None,
    device: str = "auto",
    preset: str | None = None,
    allow_random_init: bool = False,
    seed: int = 0,
    **kwargs,
) -> Interpolator:
    """Build an `Interpolator`.

    checkpoint None loads the shipped `acvtt_core/weights/default.safetensors`. If no checkpoint
    exists and `allow_random_init` is set, builds an untrained model of `preset` (default
    "compact") with `seed`, model_version "untrained" (for tests and demos only). If `preset`
    is given together with a checkpoint, the checkpoint must be of that preset's config.
    """
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if path.exists():
        expect = get_preset(preset).model if preset else None
        model, meta, version = load_checkpoint(path, expect=expect)
        return Interpolator(model, meta, version, device=device, **kwargs)
    if not allow_random_init:
        if checkpoint is None:
            raise FileNotFoundError(
                f"no default ACVTT weights at {DEFAULT_CHECKPOINT}; train a model "
                "(acvtt train) and pass its checkpoint, or allow_random_init=True for tests"
            )
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return random_interpolator(preset or "compact", device=device, seed=seed, **kwargs)


def random_interpolator(
    preset: str = "compact", device: str = "auto", seed: int = 0, **kwargs
) -> Interpolator:
    """An untrained model of `preset` (seeded), model_version "untrained": for tests, demos and
    timing (speed does not depend on the weights)."""
    p = get_preset(preset)
    torch.manual_seed(seed)
    model = ACVTT(p.model)
    meta = CheckpointMeta(preset=p.name, model=p.model, factors=[], training_data="untrained")
    return Interpolator(model, meta, "untrained", device=device, **kwargs)


def shipped_checkpoint(preset: str) -> Path | None:
    """The shipped weights of `preset`: `weights/<preset>.safetensors`, else the default weights
    when their architecture is that preset's (factor conditioning aside: it adds 16 parameters
    and no time); None when nothing shipped fits."""
    own = WEIGHTS_DIR / f"{preset}.safetensors"
    if own.exists():
        return own
    if DEFAULT_CHECKPOINT.exists():
        cfg = read_meta(DEFAULT_CHECKPOINT).model
        if dataclasses.replace(cfg, factor_conditioning=False) == get_preset(preset).model:
            return DEFAULT_CHECKPOINT
    return None

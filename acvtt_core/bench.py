"""Benchmark: analytic FLOPs, whole-volume speed, machine matmul rate, memory, and a faithful
port of the authors' per-slice inference loop for the speed-up."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from acvtt_core.attention import mrnla_fused
from acvtt_core.config import ModelConfig
from acvtt_core.infer import Interpolator
from acvtt_core.model import ACVTT, pad_to_multiple
from acvtt_core.volume import (
    BBox,
    denormalise_hu,
    linear_upsample_z,
    normalise_hu,
    output_depth,
    reference_indices,
)


def _r8(n: int) -> int:
    return -(-n // 8) * 8


def unet_conv_flops(cin: int, c: int, h: int, w: int, decoder: bool = True) -> float:
    """Multiply-adds x2 of the U-Net convolutions (stem, encoder, decoder, head) on one image."""
    widths = [c, 2 * c, 4 * c, 8 * c]
    hw = h * w
    f = 2 * 9 * cin * c * hw
    prev = c
    for i, wi in enumerate(widths):
        f += 2 * 9 * (prev * wi + wi * wi) * hw / 4**i
        prev = wi
    if decoder:
        for j in range(3):
            lo, hi = widths[2 - j], widths[3 - j]
            f += 2 * 9 * ((hi + lo) * lo + lo * lo) * hw / 4 ** (2 - j)
        f += 2 * 9 * c * hw
    return f


def _att_units(n_refs: int, cpu: bool) -> int:
    """FLOPs per (Lq Lk d) of the fused call actually run: q.k (2) and A[v | k] (4); on CPU q and
    k are zero-padded to 2d (4 + 4); with one reference the call carries v alone (2 + 2)."""
    if n_refs == 1:
        return 4
    return 8 if cpu else 6


def mrnla_flops(
    cfg: ModelConfig, h: int, w: int, hr: int, wr: int, cpu: bool = True
) -> dict[str, float]:
    """Per through-plane image of padded size (h, w) with references (hr, wr). `paper` counts
    S = q k^T and A v (4 Lq Lk d per reference); `executed` counts the fused call that runs
    (see `_att_units`); both include the q and output 1x1 convs."""
    c = cfg.width
    lq, lk = (h // 8) * (w // 8), (hr // 8) * (wr // 8)
    chans = [8 * c, 4 * c, 2 * c, c]
    paper = executed = proj = 0.0
    for i in cfg.mrnla_levels:
        cl, b = chans[i], 2**i
        d = cl * b * b
        paper += 4 * lq * lk * d * cfg.n_refs
        executed += _att_units(cfg.n_refs, cpu) * lq * lk * d * cfg.n_refs
        proj += 2 * 2 * cl * cl * h * w / 4 ** (3 - i)
    return {"paper": paper + proj, "executed": executed + proj}


def volume_flops(
    cfg: ModelConfig, d: int, h: int, w: int, factor: int, box: BBox | None = None, cpu: bool = True
):
    """Analytic FLOPs of one whole-volume inference (images padded to multiples of 8)."""
    if box is not None:
        h, w = box.shape
    dout = output_depth(d, factor)
    dp, hp, wp = _r8(dout), _r8(h), _r8(w)
    conv1 = unet_conv_flops(1, cfg.width, dp, wp) * h + unet_conv_flops(1, cfg.width, dp, hp) * w
    att_c = mrnla_flops(cfg, dp, wp, hp, wp, cpu)
    att_s = mrnla_flops(cfg, dp, hp, hp, wp, cpu)
    refs = cfg.n_refs * unet_conv_flops(1, cfg.width, hp, wp, decoder=False)
    chans = [8 * cfg.width, 4 * cfg.width, 2 * cfg.width, cfg.width]
    refs += sum(cfg.n_refs * 4 * chans[i] ** 2 * hp * wp / 4 ** (3 - i) for i in cfg.mrnla_levels)
    fusion = unet_conv_flops(2, cfg.fusion_c, hp, wp) * dout
    out = {
        "stage1_convs": conv1,
        "mrnla_paper": att_c["paper"] * h + att_s["paper"] * w,
        "mrnla_executed": att_c["executed"] * h + att_s["executed"] * w,
        "references": refs,
        "fusion": fusion,
    }
    out["total_paper"] = conv1 + out["mrnla_paper"] + refs + fusion
    out["total_executed"] = conv1 + out["mrnla_executed"] + refs + fusion
    return out


def matmul_gflops(device: str, dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Clock:
    """Wall and process-CPU seconds since construction. On a shared machine the wall time
    depends on what else runs; the process CPU time (all threads) much less, so both are
    reported."""

    def __init__(self, device: str):
        self.device = device
        _sync(device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        _sync(self.device)
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def phantom_ct(d: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Deterministic body-like HU volume: an elliptical body with noisy soft tissue and bright
    structures in air, for benchmarks that need no data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    vol = np.full((d, h, w), -1000.0, np.float32)
    vol[:, body] = 40.0
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    for _ in range(8):
        cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), h // 12
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        z0 = rng.integers(0, max(1, d // 2))
        vol[z0 : z0 + d // 2, m] = 700.0
    return vol


@dataclass
class SlowLoop:
    """Port of the authors' inference loop: one through-plane image per forward, the R
    references re-encoded for every image, materialised attention, no body crop, fusion one
    axial slice at a time. Timed on `n_sample` images per pass and extrapolated."""

    model: ACVTT
    device: str = "cpu"

    @torch.inference_mode()
    def time(self, vol_hu: np.ndarray, factor: int, n_sample: int = 4) -> dict[str, Any]:
        m = self.model.to(self.device).eval()
        lr = normalise_hu(vol_hu)
        up = linear_upsample_z(lr, factor)
        dout, h, w = up.shape
        idx = reference_indices(lr.shape[0], m.cfg.n_refs)
        refs = torch.from_numpy(lr[idx]).to(self.device)[None]

        def one(img: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)[None, None]
            return m.stage1(x, refs=refs, factor=factor, materialised=True)  # re-encodes refs

        per = {}
        for name, n_total, get in (
            ("coronal", h, lambda i: up[:, i, :]),
            ("sagittal", w, lambda i: up[:, :, i]),
        ):
            picks = np.linspace(0, n_total - 1, min(n_sample, n_total)).astype(int)
            one(get(picks[0]))  # warm-up
            clock = _Clock(self.device)
            for i in picks:
                one(get(i))
            per[name] = ([v / len(picks) for v in clock.read()], n_total)
        picks = np.linspace(0, dout - 1, min(n_sample, dout)).astype(int)
        clock = _Clock(self.device)
        for z in picks:
            a = torch.from_numpy(up[z]).to(self.device)[None, None]
            m.fusion(a, a)
        per["fusion"] = ([v / len(picks) for v in clock.read()], dout)
        return {
            "seconds_extrapolated": sum(s[0] * n for s, n in per.values()),
            "cpu_seconds_extrapolated": sum(s[1] * n for s, n in per.values()),
            "sampled_images_per_pass": int(min(n_sample, h)),
            "per_image_s": {k: v[0][0] for k, v in per.items()},
            "per_image_cpu_s": {k: v[0][1] for k, v in per.items()},
            "images": {k: v[1] for k, v in per.items()},
        }


def component_rates(interp: Interpolator, d: int, hp: int, wp: int, chunk: int = 8) -> dict:
    """GFLOP/s of the fused attention call alone and of a pure-convolution U-Net (the fusion
    net), at this volume's shapes."""
    dev = interp.device
    cfg = interp.cfg
    lq, lk = (d // 8) * (wp // 8), (hp // 8) * (wp // 8)
    chans = [8 * cfg.width, 4 * cfg.width, 2 * cfg.width, cfg.width]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        flops = t_att = 0.0
        for i in cfg.mrnla_levels:
            dd = chans[i] * 4**i
            q = torch.randn(chunk, lq, dd, device=dev) * dd**-0.5
            vk = torch.randn(1, cfg.n_refs, lk, 2 * dd, device=dev)
            mrnla_fused(q, vk)
            _sync(dev)
            t = time.perf_counter()
            mrnla_fused(q, vk)
            _sync(dev)
            t_att += time.perf_counter() - t
            flops += _att_units(cfg.n_refs, dev == "cpu") * chunk * lq * lk * dd * cfg.n_refs
        if flops:
            out["attention_gflops"] = flops / t_att / 1e9
        x = torch.rand(chunk, 1, hp, wp, device=dev).contiguous(memory_format=torch.channels_last)
        stage1 = interp.model.stage1
        f = unet_conv_flops(1, cfg.width, hp, wp, decoder=False) * chunk
        stage1.encoder(x)
        _sync(dev)
        t = time.perf_counter()
        stage1.encoder(x)
        _sync(dev)
        out["conv_gflops"] = f / (time.perf_counter() - t) / 1e9
    return out


def run_bench(
    interp: Interpolator,
    vol_hu: np.ndarray,
    factor: int,
    slow_samples: int = 4,
    skip_slow: bool = False,
) -> dict[str, Any]:
    """Everything `acvtt bench` reports, measured in this process."""
    dev = interp.device
    cfg = interp.cfg
    d, h, w = vol_hu.shape
    res: dict[str, Any] = {
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "preset": interp.meta.preset,
        "model": cfg.to_dict(),
        "shape_in": [d, h, w],
        "factor": factor,
        "shape_out": [output_depth(d, factor), h, w],
        "autocast_bf16": interp.autocast_bf16,
    }
    res["matmul_fp32_gflops"] = matmul_gflops(dev)
    if dev.startswith("cuda"):
        res["matmul_bf16_gflops"] = matmul_gflops(dev, torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
    box = interp.bbox(vol_hu)
    res["bbox"] = [box.y0, box.y1, box.x0, box.x1]
    cpu = dev == "cpu"
    res["flops_full_plane"] = volume_flops(cfg, d, h, w, factor, cpu=cpu)
    res["flops"] = volume_flops(cfg, d, h, w, factor, box, cpu=cpu)
    interp.interpolate(vol_hu[: min(d, 3)], factor)  # warm-up (kernels, allocator)
    clock = _Clock(dev)
    out = interp.interpolate(vol_hu, factor)
    secs, res["cpu_seconds"] = clock.read()
    res["seconds"] = secs
    res["stage_seconds"] = dict(interp.last_run)
    res["achieved_gflops_paper_count"] = res["flops"]["total_paper"] / secs / 1e9
    res["achieved_gflops_executed"] = res["flops"]["total_executed"] / secs / 1e9
    if dev.startswith("cuda"):
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dp = _r8(output_depth(d, factor))
    hp, wp = _r8(box.shape[0]), _r8(box.shape[1])
    res["component_gflops"] = component_rates(interp, dp, hp, wp)
    res["output_hu_range"] = [float(out.min()), float(out.max())]
    if not skip_slow:
        slow = SlowLoop(interp.model, dev).time(vol_hu, factor, slow_samples)
        interp.model.to(memory_format=interp.memory_format)
        res["authors_loop"] = slow
        res["speedup_vs_authors_loop"] = slow["seconds_extrapolated"] / secs
        res["speedup_vs_authors_loop_cpu"] = slow["cpu_seconds_extrapolated"] / res["cpu_seconds"]
    return res


def format_report(res: dict[str, Any]) -> str:
    f = res["flops"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in res["stage_seconds"].items() if k.endswith("_s"))
    mm = res["matmul_fp32_gflops"]
    lines = [
        f"device {res['device']} ({res['torch_threads']} threads), preset {res['preset']}, "
        f"in {res['shape_in']} x{res['factor']} -> {res['shape_out']}, body box {res['bbox']}",
        f"analytic FLOPs/volume: {f['total_paper'] / 1e12:.2f} TFLOP (paper count; executed "
        f"{f['total_executed'] / 1e12:.2f}); full plane, no crop: "
        f"{res['flops_full_plane']['total_paper'] / 1e12:.2f} TFLOP",
        f"  stage-1 convs {f['stage1_convs'] / 1e12:.2f}, MRNLA {f['mrnla_paper'] / 1e12:.2f} "
        f"(executed {f['mrnla_executed'] / 1e12:.2f}), refs {f['references'] / 1e12:.3f}, "
        f"fusion {f['fusion'] / 1e12:.2f} TFLOP",
        f"seconds/volume {res['seconds']:.2f} wall, {res['cpu_seconds']:.2f} process CPU  "
        f"({stages})",
        f"achieved {res['achieved_gflops_paper_count']:.1f} GFLOP/s (paper count), "
        f"{res['achieved_gflops_executed']:.1f} executed; matmul fp32 {mm:.1f} GFLOP/s",
        "components: "
        + ", ".join(
            f"{k} {v:.1f} GFLOP/s ({100 * v / mm:.0f}% of matmul)"
            for k, v in res["component_gflops"].items()
        ),
        f"peak RSS {res['peak_rss_gib']:.2f} GiB"
        + (
            f", peak GPU mem {res['peak_gpu_mem_gib']:.2f} GiB" if "peak_gpu_mem_gib" in res else ""
        ),
    ]
    if "authors_loop" in res:
        a = res["authors_loop"]
        lines.append(
            f"authors' loop (one image per forward, refs re-encoded, materialised attention, no "
            f"crop): {a['seconds_extrapolated']:.1f} s wall, {a['cpu_seconds_extrapolated']:.1f} s "
            f"CPU, EXTRAPOLATED from {a['sampled_images_per_pass']} timed images per pass "
            f"({a['images']}); speed-up {res['speedup_vs_authors_loop']:.1f}x wall, "
            f"{res['speedup_vs_authors_loop_cpu']:.1f}x CPU time"
        )
    return "\n".join(lines)


__all__ = [
    "SlowLoop",
    "denormalise_hu",
    "format_report",
    "phantom_ct",
    "run_bench",
    "volume_flops",
    "pad_to_multiple",
]

"""ACVTT networks: the stage-1 cross-view texture-transfer U-Net and the stage-2 fusion U-Net.

All images are in normalised intensity ([0, 1] for HU in [-1024, 3071]). Inputs of any size are
reflect-padded to a multiple of 8 and the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from acvtt_core.attention import MRNLA
from acvtt_core.config import MRNLA_LEVELS, ModelConfig


def conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv3(cin, cout), nn.ReLU(inplace=True), conv3(cout, cout), nn.ReLU(True))


def pad_to_multiple(x: torch.Tensor, m: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the last two axes at the far end up to a multiple of m (replicate where the
    image is too small to reflect). Returns the padded tensor and the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        shape = x.shape
        x4 = x.reshape(-1, 1, h, w) if x.dim() != 4 else x
        x4 = F.pad(x4, (0, pw, 0, ph), mode=mode)
        x = x4.reshape(*shape[:-2], h + ph, w + pw)
    return x, (h, w)


class Encoder(nn.Module):
    """Stem conv (no activation) and four levels of widths C, 2C, 4C, 8C."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.stem = conv3(cin, c)
        widths = [c, 2 * c, 4 * c, 8 * c]
        self.levels = nn.ModuleList(
            [double_conv(c if i == 0 else widths[i - 1], widths[i]) for i in range(4)]
        )

    def forward(self, x: torch.Tensor, stem_bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        x = self.stem(x)
        if stem_bias is not None:
            x = x + stem_bias
        feats = []
        for i, level in enumerate(self.levels):
            if i > 0:
                x = F.avg_pool2d(x, 2)
            x = level(x)
            feats.append(x)
        return feats  # scales 1, 1/2, 1/4, 1/8


# Called at each decoder site i (0: the 1/8 bottleneck, 1..3: after each up block) with the
# feature map there; returns the map the decoder continues with (stage 1 puts MRNLA there).
SiteHook = Callable[[int, torch.Tensor], torch.Tensor]


class Decoder(nn.Module):
    """Three blocks of bilinear x2 up, skip concat and a double conv, then a 1-channel head."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [double_conv(12 * c, 4 * c), double_conv(6 * c, 2 * c), double_conv(3 * c, c)]
        )
        self.head = nn.Conv2d(c, 1, 3, padding=1)
        # Zero-init the head so that an untrained model is exactly its residual input (linear
        # interpolation for stage 1, the view mean for stage 2); training starts from there.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: list[torch.Tensor], site: SiteHook | None = None) -> torch.Tensor:
        """Decode encoder features (scales 1, 1/2, 1/4, 1/8) to one channel at scale 1.
        `site(i, y)`, if given, may replace the map at each of the four sites."""
        y = feats[3]
        if site is not None:
            y = site(0, y)
        for j, block in enumerate(self.blocks):
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            y = block(torch.cat([y, feats[2 - j]], dim=1))
            if site is not None:
                y = site(j + 1, y)
        return self.head(y)


class UNet(nn.Module):
    """Plain U-Net of the ACVTT shape (used for stage-2 fusion)."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.encoder = Encoder(cin, c)
        self.decoder = Decoder(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


RefCache = dict[int, torch.Tensor]  # MRNLA level index -> [v | k] tensor (Nr, R, Lk, 2d)


class Stage1(nn.Module):
    """Cross-view texture transfer U-Net with MRNLA at the configured decoder levels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.encoder = Encoder(1, c)
        self.decoder = Decoder(c)
        # Level i acts at scale 1/2**(3-i) with channels 8C, 4C, 2C, C and patch size 2**i.
        chans = [8 * c, 4 * c, 2 * c, c]
        self.mrnla = nn.ModuleDict({str(i): MRNLA(chans[i], 2**i) for i in cfg.mrnla_levels})
        if cfg.factor_conditioning:
            self.factor_embed = nn.Linear(1, c)

    def _stem_bias(
        self, factor: float | torch.Tensor | None, n: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        if not self.cfg.factor_conditioning:
            return None
        if factor is None:
            raise ValueError("this model is conditioned on the factor; pass factor=")
        dev = self.factor_embed.weight.device
        f = torch.as_tensor(factor, dtype=torch.float32, device=dev).reshape(-1, 1)
        f = (1.0 / f).expand(n, 1)
        return self.factor_embed(f).to(dtype)[:, :, None, None]

    def encode_refs(self, refs: torch.Tensor) -> RefCache:
        """Encode references (Nr, R, H, W), H and W multiples of 8, into the per-level cache."""
        nr, r, h, w = refs.shape
        if r != self.cfg.n_refs:
            raise ValueError(f"model expects {self.cfg.n_refs} references, got {r}")
        feats = self.encoder(refs.reshape(nr * r, 1, h, w))
        # Encoder feature at the scale of MRNLA level i is feats[3 - i].
        return {i: self.mrnla[str(i)].reference_vk(feats[3 - i], r) for i in self.cfg.mrnla_levels}

    def forward(
        self,
        x: torch.Tensor,
        refs: torch.Tensor | None = None,
        cache: RefCache | None = None,
        factor: float | None = None,
        materialised: bool = False,
        return_relevance: bool = False,
    ):
        """x: (N, 1, H, W) linearly z-upsampled through-plane images; refs: (N or 1, R, Hr, Wr)
        axial references, or a precomputed `cache` from `encode_refs`. Returns (N, 1, H, W)."""
        x_p, (h, w) = pad_to_multiple(x)
        if cache is None:
            if refs is None:
                raise ValueError("pass refs or cache")
            refs_p, _ = pad_to_multiple(refs)
            cache = self.encode_refs(refs_p)
        feats = self.encoder(x_p, self._stem_bias(factor, x.shape[0], x.dtype))
        rels: dict[int, torch.Tensor] = {}

        def mrnla_site(i: int, y: torch.Tensor) -> torch.Tensor:
            if i not in self.cfg.mrnla_levels:
                return y
            y, rels[i] = self.mrnla[str(i)](y, cache[i], materialised)
            return y

        out = (self.decoder(feats, mrnla_site) + x_p)[..., :h, :w]
        return (out, rels) if return_relevance else out


class Fusion(nn.Module):
    """Stage 2: axial U-Net over (coronal result, sagittal result); output = net + their mean."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = UNet(2, cfg.fusion_c)

    def forward(self, cor: torch.Tensor, sag: torch.Tensor) -> torch.Tensor:
        x = torch.cat([cor, sag], dim=1)
        x_p, (h, w) = pad_to_multiple(x)
        return (self.net(x_p)[..., :h, :w]) + 0.5 * (cor + sag)


class ACVTT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stage1 = Stage1(cfg)
        self.fusion = Fusion(cfg)


INITS = ("he", "default")  # how a fresh model is initialised: he_init, or PyTorch's own


def he_init(model: ACVTT) -> None:
    """Kaiming-normal (fan-in, ReLU) weights and zero biases for every stage-1 conv except the
    zero-initialised output head. PyTorch's default conv init shrinks activations ~0.6x per
    layer, so after the ~12 convs of this un-normalised U-Net the head sees almost no signal and
    learning starts very slowly; this keeps activation variance. The model still starts as
    linear interpolation (zero head)."""
    for name, mod in model.stage1.named_modules():
        if isinstance(mod, nn.Conv2d) and not name.endswith("head"):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)


def fresh_model(cfg: ModelConfig, init: str, seed: int) -> ACVTT:
    """A new model of `cfg` from `seed`, initialised by `init` (one of INITS)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; one of {', '.join(INITS)}")
    torch.manual_seed(seed)
    model = ACVTT(cfg)
    if init == "he":
        he_init(model)
    return model


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = [
    "ACVTT",
    "INITS",
    "Fusion",
    "MRNLA_LEVELS",
    "Stage1",
    "UNet",
    "fresh_model",
    "he_init",
    "pad_to_multiple",
    "param_count",
]

"""Vision Transformers for faces, in insightface arcface_torch's layout (`backbones/vit.py`).

    112×112 RGB -> 9×9 patches, stride 9 (a 12×12 grid: 144 tokens, the last 4 pixel rows and
    columns unused; no class token) + learned position embeddings
    -> depth × [x + attn(LN(x)), x + MLP(LN(x))]: 8 heads, no qkv bias, MLP ratio 4 with ReLU6
    -> LN -> flatten 144·D -> Linear(144·D, D) -> BN -> Linear(D, d) -> BN   (both Linear without bias)

    vit_t: D=256, depth 12     vit_s: D=512, depth 12     vit_b: D=512, depth 24     vit_l: D=768, depth 24

Module names follow arcface_torch exactly (`patch_embed.proj`, `blocks.N.attn.qkv`, `feature.0` ...), so
its released weights load as they are (`unitsface.models.load_pretrained`).

Training-only regularisers, both driven by the global torch RNG (so a resumed run replays them):
- token masking: each sample keeps `int(144 · (1 − mask_ratio))` random tokens through the blocks; after
  the final norm the dropped positions are filled with a learned mask token. arcface_torch masks 10 %
  whatever its `mask_ratio` says (only `mask_ratio > 0` is read); here the configured ratio is used.
- stochastic depth: block i skips its residual branches per sample with rate drop_path·i/(depth−1).

Attention scores and softmax are computed in float32 even under autocast (as upstream: fp16 logits of
144 tokens overflow); the projections and MLP follow the caller's autocast. `gradient_checkpointing`
(on by default for vit_b and vit_l, as upstream) recomputes each block in the backward pass.

Input contract: N×3×112×112 RGB float, (x − 127.5) / 127.5. Output: N×d raw embeddings.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from unitsface.errors import UnitsfaceError
from unitsface.models._base import INPUT_CONTRACT, FaceBackbone, register

PATCH = 9
HEADS = 8
MLP_RATIO = 4
_BN_EPS = 2e-5  # the feature head's BatchNorms, as upstream


class _PatchEmbed(nn.Module):
    """Non-overlapping 9×9 patches -> D channels, as N × tokens × D."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _no_autocast(device_type: str) -> AbstractContextManager:
    """Autocast switched off (devices without autocast, such as "meta" for FLOP counting, need nothing)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class _Attention(nn.Module):
    """Multi-head self-attention; q·kᵀ, the softmax and the weighted sum in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        with _no_autocast(x.device.type):
            q, k, v = qkv.float().unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√(D/8))·v
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the branch `x` for a random `rate` of the samples, scale the rest by 1/(1−rate)."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep)
    return x * mask.div_(keep)


class _Block(nn.Module):
    def __init__(self, dim: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_rate, self.training)


class VisionTransformer(FaceBackbone):
    """arcface_torch's face ViT (module docstring). `mask_ratio` in [0, 1) and `drop_path` in [0, 1) act in
    training only; `gradient_checkpointing` trades a second forward of each block for activation memory."""

    family = "vit"

    def __init__(self, dim: int, depth: int, embedding_size: int = 512, mask_ratio: float = 0.1,
                 drop_path: float = 0.1, gradient_checkpointing: bool = False) -> None:
        super().__init__(embedding_size)
        for name, value in (("mask_ratio", mask_ratio), ("drop_path", drop_path)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UnitsfaceError(f"vit {name} must be a number in [0, 1), got {value!r}")
        self.dim = dim
        self.mask_ratio = float(mask_ratio)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.num_patches = (INPUT_CONTRACT["size"] // PATCH) ** 2
        self.patch_embed = _PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.blocks = nn.ModuleList(_Block(dim, drop_path * i / max(1, depth - 1)) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=_BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Upstream's: truncated normal (std 0.02) linears and position embeddings, zero biases, N(0, 0.02)
        mask token; LayerNorm, BatchNorm and the patch conv keep torch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _keep_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A random subset of `int(L·(1 − mask_ratio))` tokens per sample: (kept tokens, their positions)."""
        n, length, dim = x.shape
        keep = int(length * (1.0 - self.mask_ratio))
        positions = torch.rand(n, length, device=x.device).argsort(dim=1)[:, :keep]
        return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, dim)), positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, positions = self._keep_tokens(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.float())
        if masking:
            n, _, dim = x.shape
            filled = self.mask_token.to(x.dtype).expand(n, self.num_patches, dim)
            x = filled.scatter(1, positions.unsqueeze(-1).expand(-1, -1, dim), x)
        return self.feature(x.reshape(x.shape[0], self.num_patches * self.dim))


# arcface_torch's vit_t, vit_s and vit_b (drop path 0.1, mask 0.1); its only ViT-L is vit_l_dp005_mask_005.
register("vit_t", VisionTransformer, dim=256, depth=12)
register("vit_s", VisionTransformer, dim=512, depth=12)
register("vit_b", VisionTransformer, dim=512, depth=24, defaults={"gradient_checkpointing": True})
register("vit_l", VisionTransformer, dim=768, depth=24,
         defaults={"gradient_checkpointing": True, "mask_ratio": 0.05, "drop_path": 0.05})

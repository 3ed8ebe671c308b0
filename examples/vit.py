"""A user's own vision transformer, as dfkd meets it: patch embedding, multi-head self-attention,
LayerNorm, a GELU MLP, a class token or mean pooling, and no BatchNorm anywhere. Attention is
``nn.MultiheadAttention`` (``attention="torch"``) or written by hand (``attention="hand"``); both are
plain PyTorch. dfkd imports this file only because the command line names it
(``--teacher examples/vit.py:teacher``)."""
import torch
from torch import nn


class HandAttention(nn.Module):
    """Multi-head self-attention written out: one qkv projection, softmax(q k^T / sqrt(d)) v, an output projection.
    The softmax is a module, so the attention maps ``[heads, T, T]`` have a path to record
    (``--layers blocks.0.att.softmax``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = self.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, attention: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = nn.MultiheadAttention(dim, heads, batch_first=True) if attention == "torch" else \
            HandAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + (self.att(h, h, h, need_weights=False)[0] if isinstance(self.att, nn.MultiheadAttention)
                 else self.att(h))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image: int = 32, patch: int = 4, dim: int = 64,
                 depth: int = 3, heads: int = 4, mlp: int = 128, pool: str = "mean", attention: str = "torch"):
        super().__init__()
        if pool not in ("mean", "cls") or attention not in ("torch", "hand"):
            raise ValueError(f"pool {pool!r} / attention {attention!r}: pool is mean or cls, attention torch or hand")
        self.pool = pool
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + (pool == "cls")
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)             # [B, T, dim]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)  # not len(x): the batch stays free in export
        x = self.norm(self.blocks(x + self.pos))
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


def teacher(in_channels: int = 3, num_classes: int = 10, image: int = 32, pool: str = "mean",
            attention: str = "torch") -> nn.Module:
    """Three blocks of width 64, four heads, 4x4 patches."""
    return ViT(in_channels, num_classes, image, pool=pool, attention=attention)


def student(in_channels: int = 3, num_classes: int = 10, image: int = 32, pool: str = "mean",
            attention: str = "hand") -> nn.Module:
    """A smaller ViT: two blocks of width 32, two heads."""
    return ViT(in_channels, num_classes, image, dim=32, depth=2, heads=2, mlp=64, pool=pool, attention=attention)

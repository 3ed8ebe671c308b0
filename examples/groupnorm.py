"""A user's own CNNs without BatchNorm, as dfkd meets them: a residual GroupNorm net (what DP-SGD
training produces: Opacus swaps BatchNorm for GroupNorm) and a ConvNeXt-style net with LayerNorm over
channels (a channels-last ``nn.LayerNorm``). dfkd imports this file only because the command line
names it (``--teacher examples/groupnorm.py:teacher``)."""
from torch import nn


class ChannelNorm(nn.Module):
    """LayerNorm over a map's channels at every position, as ConvNeXt writes it: permute, normalise, permute back."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind: str, c: int) -> nn.Module:
    return nn.GroupNorm(min(8, c // 2), c) if kind == "group" else ChannelNorm(c)


class Residual(nn.Module):
    def __init__(self, c: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _norm(norm, c), nn.GELU(),
                                  nn.Conv2d(c, c, 3, padding=1), _norm(norm, c))
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(x + self.body(x))


class NormNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "layer"):
            raise ValueError(f"norm {norm!r} is group or layer")
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), _norm(norm, w), nn.GELU())
        self.block1 = Residual(w, norm)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(norm, 2 * w), nn.GELU())
        self.block2 = Residual(2 * w, norm)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))

    def forward(self, x):
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


def teacher(in_channels: int = 3, num_classes: int = 10, width: int = 16, norm: str = "group") -> nn.Module:
    """GroupNorm (``norm="group"``, 8 groups) or LayerNorm over channels (``norm="layer"``)."""
    return NormNet(in_channels, num_classes, width, norm)

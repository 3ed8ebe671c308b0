"""A user's own models, as dfkd meets them: a BatchNorm / GELU / residual CNN with global
average pooling as the teacher, and a small GELU CNN as the student. dfkd imports this file
only because the command line names it (``--model examples/own_model.py:teacher``)."""
from torch import nn


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(x + self.body(x))


class OwnNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU())
        self.block1 = Residual(w)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                  nn.GELU())
        self.block2 = Residual(2 * w)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))

    def forward(self, x):
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


def teacher(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    return OwnNet(in_channels, num_classes, width)


def student(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """A plain small CNN: two GELU conv layers, max-pooling, global average pooling."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                         nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

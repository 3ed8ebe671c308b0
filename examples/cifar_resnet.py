"""The data-free field's standard CIFAR-10 pair, ResNet-34 -> ResNet-18, in plain PyTorch: the CIFAR form
of He et al.'s residual nets (a 3x3 stem and no max-pool, four stages of basic blocks at widths 64, 128,
256 and 512, global average pooling, one linear layer). The parameter names are the ones the published
data-free codes' CIFAR ResNets use (``conv1``, ``bn1``, ``layer1``..``layer4`` of blocks with ``conv1``,
``bn1``, ``conv2``, ``bn2`` and a ``shortcut``, then ``linear``), so a state dict trained there loads here
with ``--weights``. ``width`` scales every stage (the tests run a width of 4). dfkd imports this file only
because the command line names it (``--teacher examples/cifar_resnet.py:resnet34``)."""
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # a projection where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, cin = [], width
        for k, n in enumerate(blocks):
            cout = width * 2 ** k
            stages.append(nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 and k else 1)
                                          for i in range(n))))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.pool(x).flatten(1))


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """The teacher: 3, 4, 6 and 3 basic blocks (21,282,122 parameters at width 64 and 10 classes)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """The student: 2 basic blocks a stage (11,173,962 parameters at width 64 and 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)

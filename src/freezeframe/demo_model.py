"""The demo's network: resnet34's shape, narrow enough for 8x8 digits on two CPU cores.

Same block structure and layer count as torchvision's resnet34 — BasicBlock stages [3, 4, 6, 3],
33 convolutions on the main path plus fc (34 weight layers), 3 projection shortcuts (1x1 conv +
BatchNorm, `layerN.0.downsample`) where a stage halves the resolution — and the same module names
(conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, fc). What differs: the widths are 1/8 of
resnet34's (8/16/32/64 instead of 64/128/256/512, so about 1/64 of the parameters), and the stem is
one 3x3 convolution of stride 1 without a max-pool, since the images are 8x8 pixels (resnet34's 7x7
stride-2 stem and max-pool are made for 224x224)."""

from __future__ import annotations

from torch import nn

STAGES = (3, 4, 6, 3)  # BasicBlocks per stage, as resnet34
WIDTHS = (8, 16, 32, 64)  # resnet34: 64, 128, 256, 512


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (through `downsample` when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (None if stride == 1 and c_in == c_out else
                           nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class DigitResNet34(nn.Module):
    """conv1 → bn1 → layer1 … layer4 → avgpool → fc; layer groups as fastai splits a resnet:
    [conv1, bn1, layer1, layer2], [layer3, layer4], [fc]."""

    def __init__(self, n_classes: int = 5, widths=WIDTHS, stages=STAGES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = widths[0]
        for i, (n, width) in enumerate(zip(stages, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(c_in, width, stride)] + [BasicBlock(width, width) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules():  # torchvision's initialisation of a resnet, with zero_init_residual=True:
            if isinstance(m, nn.Conv2d):  # each block starts as the identity, which lets a deep, narrow
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # net learn from few images
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def body_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        params = lambda *ms: [p for m in ms for p in m.parameters()]  # noqa: E731
        return [params(self.conv1, self.bn1, self.layer1, self.layer2), params(self.layer3, self.layer4),
                params(self.fc)]

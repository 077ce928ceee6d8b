"""CNN architectures declared as data: a small :class:`ArchConfig` plus one builder.

Variants differ only in their config, so adding a model is a few lines in
:data:`ARCHITECTURES`, and a checkpoint can rebuild its network from the JSON it stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class ArchConfig:
    """A VGG-style CNN: ``len(channels)`` blocks of ``convs_per_block`` conv(-BN)-ReLU + 2x2 max-pool.

    ``head="gap"`` ends with global average pooling (few parameters, robust to small data);
    ``head="flatten"`` flattens the last feature map instead. ``fc_dim > 0`` adds a hidden
    fully-connected layer before the classifier.
    """

    name: str
    channels: tuple[int, ...]
    kernel_size: int = 3
    convs_per_block: int = 2
    dropout: float = 0.3
    fc_dim: int = 0
    batch_norm: bool = True
    head: Literal["gap", "flatten"] = "gap"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels:
            raise ValueError("an architecture needs at least one conv block")
        if self.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd so 'same' padding keeps the map size")
        if self.head not in ("gap", "flatten"):
            raise ValueError(f"unknown head {self.head!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchConfig":
        return cls(**{**d, "channels": tuple(d["channels"])})


MAIN_MODEL = "cnn4"

ARCHITECTURES: dict[str, ArchConfig] = {
    arch.name: arch
    for arch in (
        ArchConfig(
            name="cnn4",
            channels=(16, 32, 64, 128),
            kernel_size=3,
            description="main model: 4 blocks of two 3x3 convs (16-32-64-128), GAP head",
        ),
        ArchConfig(
            name="cnn3",
            channels=(16, 32, 64),
            kernel_size=3,
            description="depth variant: the main model without its last block",
        ),
        ArchConfig(
            name="cnn4_k5",
            channels=(16, 32, 64, 128),
            kernel_size=5,
            description="kernel variant: the main model with 5x5 convolutions",
        ),
        # A fourth variant is one more entry, e.g.
        # ArchConfig(name="cnn4_wide", channels=(32, 64, 128, 256), description="twice the width"),
    )
}
"""Registered architectures; the first entry (:data:`MAIN_MODEL`) is the main model."""


def get_architecture(name: str) -> ArchConfig:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def _conv_block(c_in: int, c_out: int, arch: ArchConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(arch.convs_per_block):
        conv_in = c_in if i == 0 else c_out
        # A conv followed by BatchNorm needs no bias: BN's shift plays that role.
        layers.append(
            nn.Conv2d(conv_in, c_out, arch.kernel_size, padding=arch.kernel_size // 2, bias=not arch.batch_norm)
        )
        if arch.batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """``features`` (conv blocks) -> ``head`` (pool/flatten, dropout, [fc], linear)."""

    def __init__(
        self,
        arch: ArchConfig,
        n_classes: int,
        in_channels: int = 1,
        input_size: tuple[int, int] = (48, 48),
    ) -> None:
        super().__init__()
        h, w = input_size
        if min(h, w) < 2 ** len(arch.channels):
            raise ValueError(f"input {input_size} too small for {len(arch.channels)} pooling stages")
        blocks, c = [], in_channels
        for c_out in arch.channels:
            blocks.append(_conv_block(c, c_out, arch))
            c = c_out
        self.features = nn.Sequential(*blocks)

        head: list[nn.Module] = []
        if arch.head == "gap":
            head += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            n_feat = c
        else:
            n_feat = c * (h >> len(arch.channels)) * (w >> len(arch.channels))
            head.append(nn.Flatten())
        head.append(nn.Dropout(arch.dropout))
        if arch.fc_dim > 0:
            head += [nn.Linear(n_feat, arch.fc_dim), nn.ReLU(inplace=True), nn.Dropout(arch.dropout)]
            n_feat = arch.fc_dim
        head.append(nn.Linear(n_feat, n_classes))
        self.head = nn.Sequential(*head)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    arch: ArchConfig | str,
    n_classes: int,
    in_channels: int = 1,
    input_size: tuple[int, int] = (48, 48),
) -> ConvNet:
    """Build the network an :class:`ArchConfig` (or a registry name) describes."""
    if isinstance(arch, str):
        arch = get_architecture(arch)
    return ConvNet(arch, n_classes, in_channels=in_channels, input_size=tuple(input_size))  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

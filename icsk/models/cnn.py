"""VGG-style conv nets (Santurkar et al. train VGG on CIFAR-10); configs like torchvision's VGG."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .blocks import TapNet, conv_block

VGG_VARIANTS: dict[str, tuple] = {
    "vgg_small": (64, "M", 128, "M", 256, 256, "M"),
    "vgg_tiny": (16, "M", 32, "M", 64, "M"),
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
}


class VGG(TapNet):
    """3x3 conv blocks from a channel list ("M" = 2x2 max pool, attached as ``pool`` of the block before it),
    then ``flatten`` -> Linear ``head``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 channels: Sequence[int | str] = VGG_VARIANTS["vgg_small"], activation: str = "relu",
                 norm: str = "none", image_size: int = 32, init_scale: float = 1.0, **norm_kw):
        super().__init__()
        if isinstance(channels, str):
            channels = VGG_VARIANTS[channels] if channels in VGG_VARIANTS else channels
        convs = _parse_channels(channels)
        pools = sum(pool for _, pool in convs)
        side = image_size
        for _ in range(pools):
            side //= 2  # a 2x2 max pool drops an odd last row/column: 28 -> 14 -> 7 -> 3
        if side < 1:
            raise ValueError(
                f"image_size {image_size} is too small for {pools} 2x2 max pools (one per 'M'): the maps "
                f"would vanish; use fewer 'M' (model.variant=vgg_tiny, or +model.options.channels=[...]) "
                f"or larger images")
        self.norm_kind = str(norm)
        c_in = in_channels
        for i, (c_out, pool) in enumerate(convs, start=1):
            self.add_module(f"block{i}", conv_block(c_in, c_out, activation, norm, pool=pool, **norm_kw))
            c_in = c_out
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in * side * side, num_classes)
        self._scale_init(init_scale)


def _parse_channels(channels: Sequence[int | str]) -> list[tuple[int, bool]]:
    """[(out_channels, pooled_after)] from a torchvision-style list; rejects a leading or doubled "M"."""
    out: list[tuple[int, bool]] = []
    for c in channels:
        if str(c).upper() == "M":
            if not out or out[-1][1]:
                raise ValueError(f"channels {list(channels)}: every 'M' must follow a conv width")
            out[-1] = (out[-1][0], True)
        else:
            out.append((int(c), False))
    if not out:
        raise ValueError("channels must hold at least one conv width")
    return out

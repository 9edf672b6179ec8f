"""Image classifiers: SimpleMLP, SimpleCNN, any timm or torchvision model. Every builder adapts to the dataset:
in_chans, image_size, num_classes.

timm and torchvision.models are imported only when such a model is asked for: `import timm`
alone costs ~5 s on a 2-core CPU, more than the whole default run trains.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict

import torch
from torch import nn

from mprun.errors import ConfigError, first_line, require


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class GradScale(nn.Module):
    """Identity forward; multiplies the gradient by `factor` on the way back."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(x, self.factor)


class SimpleMLP(nn.Sequential):
    """Flatten -> depth x (Linear, ReLU) -> Linear [-> GradScale]."""

    def __init__(
        self,
        in_chans: int,
        image_size: tuple[int, int],
        num_classes: int,
        hidden: int = 256,
        depth: int = 2,
        grad_scale: float = 1.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_chans * image_size[0] * image_size[1]
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        if grad_scale != 1.0:
            layers.append(GradScale(grad_scale))
        super().__init__(*layers)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SimpleCNN(nn.Sequential):
    """Three conv-BN-ReLU blocks, one 2x pool, global average pool, linear head. Works from 8x8 up."""

    def __init__(self, in_chans: int, image_size: tuple[int, int], num_classes: int, width: int = 32):
        super().__init__(
            *_conv_bn(in_chans, width),
            *_conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, num_classes),
        )


def _unknown(kind: str, name: str, choices: list[str], hint: str) -> ConfigError:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown {kind} model '{name}'{suggestion} ({hint})")


# Arguments mprun passes to a model's constructor itself, and where each comes from.
_SET_BY_MPRUN = {
    "num_classes": "the dataset's class count",
    "in_chans": "the dataset's channels",
    "pretrained": "model.pretrained",
    "weights": "none: mprun builds torchvision models untrained",
}


def _extra(kwargs: Dict[str, Any] | None, reserved: tuple[str, ...]) -> dict[str, Any]:
    """model.kwargs, without the arguments mprun sets from the dataset (passing one twice would fail with "got multiple
    values for keyword argument")."""
    extra = dict(kwargs or {})
    for key in reserved:
        require(
            key not in extra, f"model.kwargs.{key} is set by mprun ({_SET_BY_MPRUN[key]}): remove it from model.kwargs"
        )
    return extra


def timm_model(
    in_chans: int,
    image_size: tuple[int, int],
    num_classes: int,
    name: str,
    pretrained: bool = False,
    kwargs: Dict[str, Any] | None = None,
) -> nn.Module:
    """Any timm model, built for the data's image size where the model takes one (ViTs, Swin, LeViT, MaxViT,
    CoaT, ...: position embeddings, windows and strides then fit the data). Convolutional nets take any size
    and have no img_size argument: timm rejects it with a TypeError before building anything."""
    import timm  # only timm models load it

    if not timm.is_model(name):
        raise _unknown(
            "timm",
            name,
            timm.list_models(),
            f"list them with: python -c \"import timm; print(timm.list_models('{name[:3]}*'))\"",
        )
    common = dict(
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        **_extra(kwargs, ("num_classes", "in_chans", "pretrained")),
    )
    try:
        if "img_size" not in common:  # +model.kwargs.img_size wins
            try:
                return timm.create_model(name, img_size=tuple(image_size), **common)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return timm.create_model(name, **common)
    except OSError as e:  # the hub's "not in the local cache" and every network error are OSErrors
        if not pretrained:
            raise
        raise ConfigError(
            f"model.name={name}: its pretrained weights cannot be downloaded or found "
            f"({type(e).__name__}: {first_line(e)}); without network, point at a local file with "
            "+model.kwargs.pretrained_cfg_overlay.file=/path/to/weights.safetensors (or .pth), or put them in the "
            "Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1"
        ) from e


def torchvision_model(
    in_chans: int, image_size: tuple[int, int], num_classes: int, name: str, kwargs: Dict[str, Any] | None = None
) -> nn.Module:
    """Any torchvision classification model, untrained, with its first conv adapted to in_chans."""
    import torchvision  # only torchvision models load it

    choices = torchvision.models.list_models(module=torchvision.models)
    if name not in choices:
        raise _unknown("torchvision", name, choices, "see torchvision.models.list_models()")
    extra = _extra(kwargs, ("num_classes", "in_chans", "weights"))
    if name.startswith("vit_"):
        require(image_size[0] == image_size[1], f"torchvision {name} needs square images, dataset gives {image_size}")
        extra.setdefault("image_size", image_size[0])
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    if in_chans != 3:
        _replace_first_conv(model, in_chans)
    return model


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        in_chans,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        child.groups,
                        child.bias is not None,
                        child.padding_mode,
                    ),
                )
                return
    raise ConfigError(f"cannot adapt {type(model).__name__} to {in_chans} input channels: it has no Conv2d")

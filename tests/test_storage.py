"""storage: the same calls for s3:// (against a real moto S3 server) and local paths."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tltrain import storage
from tltrain.core.checkpoint import sha256_file


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 40, "sub/deeper/c.txt": b"c" * 3}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_split_and_is_s3() -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3"):
        storage.split_s3("/local/path")


def test_s3_tree_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src")
    uri = f"{s3_bucket}/runs/demo"
    assert storage.upload_tree(str(tmp_path / "src"), uri) == 3
    assert storage.list_files(uri) == sorted(files)
    assert storage.exists(f"{uri}/sub/b.bin")
    assert storage.exists(f"{uri}/sub")  # a prefix counts as a folder
    assert not storage.exists(f"{uri}/nope")
    assert not storage.exists(f"{uri}/su")  # a prefix of a name is not a folder

    dst = tmp_path / "dst"
    assert storage.download_tree(uri, str(dst)) == 3
    assert {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == files
    assert storage.download_tree(uri, str(dst)) == 0  # already complete: nothing transferred
    (dst / "a.txt").write_bytes(b"truncat")  # a size mismatch is fetched again
    assert storage.download_tree(uri, str(dst)) == 1
    assert (dst / "a.txt").read_bytes() == b"alpha"


def test_s3_single_file_and_sha256(s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "w.pth"
    src.write_bytes(b"weights" * 1000)
    storage.upload_file(str(src), f"{s3_bucket}/models/w.pth")
    storage.download_file(f"{s3_bucket}/models/w.pth", str(tmp_path / "back" / "w.pth"))
    assert sha256_file(str(tmp_path / "back" / "w.pth")) == sha256_file(str(src))
    assert not list((tmp_path / "back").glob(".*.part"))  # no temp files left behind


def test_buckets(s3_server: str) -> None:
    uri = "s3://tltrain-test-ensure"
    assert not storage.exists(uri)
    storage.ensure_bucket(uri)
    storage.ensure_bucket(f"{uri}/some/prefix")  # idempotent, prefix ignored
    assert storage.exists(uri)
    assert not storage.exists("s3://tltrain-no-such-bucket/key")


def test_pyarrow_filesystem_reads_what_boto3_wrote(s3_bucket: str, s3_server: str, tmp_path: Path) -> None:
    _make_tree(tmp_path / "src")
    storage.upload_tree(str(tmp_path / "src"), f"{s3_bucket}/ckpt")
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/ckpt")
    assert isinstance(fs, pafs.S3FileSystem)
    bucket = storage.split_s3(s3_bucket)[0]
    assert path == f"{bucket}/ckpt"  # no scheme: what Ray's storage_path wants with a filesystem
    with fs.open_input_stream(f"{path}/a.txt") as f:
        assert f.read() == b"alpha"
    # and the other way: what pyarrow (Ray's checkpoint upload) writes, boto3 lists
    with fs.open_output_stream(f"{path}/from_arrow/x.txt") as f:
        f.write(b"arrow")
    assert "from_arrow/x.txt" in storage.list_files(f"{s3_bucket}/ckpt")


def test_local_paths_work_the_same(tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src")
    dest = str(tmp_path / "store" / "runs")
    assert storage.upload_tree(str(tmp_path / "src"), dest) == 3
    assert storage.list_files(dest) == sorted(files)
    assert storage.exists(f"{dest}/sub/deeper/c.txt") and not storage.exists(f"{dest}/nope")
    assert storage.download_tree(dest, str(tmp_path / "copy")) == 3
    assert storage.download_tree(dest, str(tmp_path / "copy")) == 0
    storage.upload_file(str(tmp_path / "src" / "a.txt"), str(tmp_path / "one" / "a.txt"))
    assert (tmp_path / "one" / "a.txt").read_bytes() == b"alpha"
    fs, path = storage.pyarrow_filesystem("~/somewhere")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(Path("~/somewhere").expanduser())

"""Storage URIs: where a study's durable files go when its cluster has no shared disk.

A storage root is `s3://bucket/prefix`, `gs://bucket/prefix`, any URI `pyarrow.fs` opens, or a
path (which, on a cluster, every node must share). A study keeps one folder under it,
`<root>/<study>/` (`study_root`): Ray Train and Tune results, `study.yaml`, `cells.json`,
`laws/laws.json`, `report/report.html`. Endpoint and credentials come from the environment as
pyarrow and boto3 read them (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`GOOGLE_APPLICATION_CREDENTIALS`, ...); nothing here takes a secret as an argument.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SCHEMES: tuple[str, ...] = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # what pyarrow.fs opens


def scheme(uri: str) -> Optional[str]:
    """`s3` for s3://bucket/x, None for a plain path."""
    match = SCHEME_RE.match(uri)
    return match.group(1).lower() if match else None


def is_local(uri: str) -> bool:
    """A path on this machine's file system (plain or file://): on a cluster, only if every node shares it."""
    return scheme(uri) in (None, "file")


def local_path(uri: str) -> Optional[Path]:
    """The absolute path of a local storage URI, None for a remote one."""
    if not is_local(uri):
        return None
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()


def uri_problem(uri: object) -> Optional[str]:
    """Why `uri` cannot be a storage root (for the `storage:` field's error), or None."""
    if not isinstance(uri, str) or not uri.strip():
        return f"expected a URI (s3://bucket/prefix, gs://bucket/prefix) or a path, got {uri!r}"
    kind = scheme(uri)
    if kind is not None and kind not in SCHEMES:
        return (f"unknown scheme {kind}:// in {uri!r} "
                f"(expected one of {', '.join(s + '://' for s in SCHEMES)} or a path)")
    if kind in ("s3", "gs", "gcs") and not uri[len(kind) + 3:].strip("/"):
        return f"{uri!r} names no bucket (expected {kind}://bucket/prefix)"
    return None


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended by '/' (an absolute path for a local root)."""
    path = local_path(uri)
    if path is not None:
        return str(path.joinpath(*parts))
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def study_root(storage: str, name: str) -> str:
    """The one folder of study (or run) `name` under the storage root `storage`."""
    return join(storage, name)


def study_folder(storage: Optional[str], name: str, workdir: Path | str) -> str:
    """Where study (or run) `name` keeps its durable files: `<storage>/<name>`, or its workdir without storage."""
    return study_root(storage, name) if storage else str(Path(workdir).resolve())


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a storage URI or a local path."""
    path = local_path(uri)
    if path is not None:
        return pafs.LocalFileSystem(), str(path)
    return pafs.FileSystem.from_uri(uri)


def location_of(fs: pafs.FileSystem, path: str) -> str:
    """A path inside `fs` (what Ray's `Checkpoint.path` gives: `bucket/x` on S3) as a storage URI
    (`s3://bucket/x`); the path itself on the local file system or one without a known scheme."""
    kind = fs.type_name
    return f"{kind}://{path.lstrip('/')}" if kind in SCHEMES and kind != "file" else path


def write_local_atomic(path: Path, data: bytes) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, never a part: a temporary
    file beside it, fsynced, renamed over it, and the folder fsynced so the rename survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_bytes(uri: str, data: bytes) -> None:
    """Write the whole of `data` to `uri`: atomically for a local path; an object store's key appears
    only when its upload completes, and the content is complete before the upload starts."""
    local = local_path(uri)
    if local is not None:
        write_local_atomic(local, data)
        return
    fs, path = open_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_bytes(uri: str) -> Optional[bytes]:
    """The file's bytes, None when it does not exist."""
    fs, path = open_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str) -> Optional[str]:
    data = read_bytes(uri)
    return data.decode("utf-8") if data is not None else None


def upload(local: Path, uri: str) -> str:
    """Copy the local file `local` to `uri`; returns `uri`."""
    write_bytes(uri, Path(local).read_bytes())
    return uri


def download(uri: str, local: Path) -> bool:
    """Copy `uri` to the local file `local`; False (and nothing written) when it does not exist."""
    data = read_bytes(uri)
    if data is None:
        return False
    write_local_atomic(Path(local), data)
    return True


def list_files(uri: str) -> list[str]:
    """Every file under the folder `uri`, as paths relative to it (sorted; [] if it does not exist)."""
    fs, path = open_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix))


def publish(local: Path, workdir: Path, root: str) -> Path | str:
    """Copy `local` (a file under `workdir`) to the same place under the storage folder `root`, unless
    `root` is the workdir itself; returns where the file is kept (the local path, or its URI)."""
    workdir = Path(workdir).resolve()
    if local_path(root) == workdir:
        return Path(local)
    return upload(local, join(root, *Path(local).resolve().relative_to(workdir).parts))

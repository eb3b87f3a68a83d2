"""Where the official ISIC 2019 files are, and safe reading of the image folder or zip.

The zip is read entry by entry (never extracted); an entry whose name is absolute or climbs out with `..` is
refused, and so is a link in the image folder that points outside it, so a hostile data set cannot point the
pipeline at other files. Every read is bounded: a file or entry larger than `max_bytes` is refused from its
declared size before any byte is read, and the read itself stops at the cap. A damaged or encrypted zip entry
is a problem of that image (SourceError, which ingest quarantines), not of the whole data set.
"""

from __future__ import annotations

import errno
import logging
import lzma
import os
import stat
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGES_DIR = "ISIC_2019_Training_Input"
IMAGES_ZIP = f"{IMAGES_DIR}.zip"
# The official zip holds two documentation files besides the JPEGs.
DOC_FILES = ("ATTRIBUTION.txt", "LICENSE.txt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# Far above the largest real ISIC image (a few MB); config data.max_file_bytes.
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
# Why one image file cannot be read (quarantine reasons).
READ_REASONS = ("file_too_large", "corrupt_zip_entry", "encrypted_zip_entry", "link_outside_root")

_RULE = "!" * 100
SYNTHETIC_BANNER = f"""
{_RULE}
!!  SYNTHETIC DATA: data.isic_root is unset, so every number that follows comes from a generated stand-in !!
!!  for ISIC 2019 (results/data/synthetic/). Set data.isic_root to run the real study.                     !!
{_RULE}"""


def synthetic_banner(marker: str) -> str:
    """The banner of a synthetic set that data.isic_root names: `marker` is the file that says so."""
    return (
        f"\n{_RULE}\n!!  SYNTHETIC DATA: data.isic_root holds a set written by `dermcompress synth`, so every number "
        f"that follows\n!!  comes from a generated stand-in, not real images ({marker} says so).\n{_RULE}"
    )


class DataFileError(ValueError):
    """A whole input file (a CSV, the zip) that cannot be read: the message names it and says what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


class SourceError(Exception):
    """One image file or zip entry that cannot be read safely; `reason` (READ_REASONS) is its quarantine reason."""

    def __init__(self, member: str, reason: str, detail: str) -> None:
        assert reason in READ_REASONS, reason
        super().__init__(f"{member!r}: {reason}: {detail}")
        self.member, self.reason, self.detail = member, reason, detail


def official_paths(root: str | Path, prefer: str | None = None) -> dict[str, str]:
    """Paths of the ground truth, the metadata and the images (folder, else zip) under `root`.

    `prefer="folder"` names the folder without checking it exists (for the synthetic set, not made yet).
    """
    root = Path(root)
    folder, archive = root / IMAGES_DIR, root / IMAGES_ZIP
    if prefer == "folder" or folder.is_dir():
        images = folder
    elif archive.is_file():
        images = archive
    else:
        raise FileNotFoundError(
            f"data.isic_root={str(root)!r} holds neither {IMAGES_DIR}/ nor {IMAGES_ZIP}; point it at the folder "
            f"with the official ISIC 2019 training files ({IMAGES_ZIP}, {GROUND_TRUTH}, {METADATA})."
        )
    return {"ground_truth": str(root / GROUND_TRUTH), "metadata": str(root / METADATA), "images": str(images)}


def image_id_of(member: str) -> str | None:
    """`ISIC_0000000_downsampled.jpg` -> `ISIC_0000000_downsampled`; None for files that are not images."""
    path = PurePosixPath(member)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return path.stem


def unsafe_reason(member: str) -> str | None:
    """Why a zip entry name must be refused (absolute, drive letter, or `..`), else None."""
    name = member.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "unsafe_zip_entry: absolute path"
    if ".." in PurePosixPath(name).parts:
        return "unsafe_zip_entry: '..' in path"
    return None


@dataclass
class ImageSource:
    """The image folder or zip: list its image files, read one (bounded), and say what was refused or ignored."""

    path: Path
    max_bytes: int = DEFAULT_MAX_FILE_BYTES
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (name, reason, detail)
    ignored: list[str] = field(default_factory=list)  # documentation and other non-image files
    _zip: zipfile.ZipFile | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                raise DataFileError(
                    self.path, f"not a readable zip archive ({err}); it may be truncated: download it again"
                ) from None
        elif not self.path.is_dir():
            raise FileNotFoundError(f"image source {self.path} is neither a folder nor a zip file")
        self._root = self.path.resolve()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def members(self) -> Iterator[tuple[str, str]]:
        """Yield (member, image_id) for every image file, sorted by member name; fills refused/ignored."""
        self.refused.clear()
        self.ignored.clear()
        names = self._zip_names() if self._zip is not None else self._folder_names()
        for name in sorted(names):
            if refusal := self._refusal(name):
                self.refused.append((name, *refusal))
                continue
            image_id = image_id_of(name)
            if image_id is None:
                self.ignored.append(name)
                continue
            yield name, image_id

    def _zip_names(self) -> list[str]:
        return [i.filename for i in self._zip.infolist() if not i.is_dir()]

    def _folder_names(self) -> list[str]:
        """Regular files under the folder, links included; linked folders are not entered (logged)."""
        names = []
        for top, dirs, files in os.walk(self.path):
            for d in dirs:
                if os.path.islink(os.path.join(top, d)):
                    log.warning(
                        "%s is a link to a folder (%s): not entered, its files are not read",
                        os.path.join(top, d),
                        os.path.realpath(os.path.join(top, d)),
                    )
            for f in files:
                full = os.path.join(top, f)
                # A link out of the folder is listed so that it is refused by name; other odd entries (FIFOs,
                # sockets, devices, dangling links) are never read.
                if os.path.isfile(full) or (os.path.islink(full) and self._outside(full)):
                    names.append(Path(full).relative_to(self.path).as_posix())
                else:
                    log.warning(
                        "%s is not a regular file (FIFO, socket, device or dangling link): not read", full
                    )
        return names

    def _outside(self, path: str | Path) -> Path | None:
        """Where `path` really leads when that is outside the folder (through a link or `..`), else None."""
        target = Path(os.path.realpath(path))
        return None if target == self._root or target.is_relative_to(self._root) else target

    def _refusal(self, name: str) -> tuple[str, str] | None:
        """(reason, detail) when a listed name must not be read: an unsafe zip name, a link out of the folder."""
        if self._zip is not None:
            reason = unsafe_reason(name)
            return (reason, f"zip entry {name!r} refused") if reason else None
        if os.path.islink(self.path / name) and (target := self._outside(self.path / name)):
            return "link_outside_root", f"{name!r} is a link to {target}, outside {self._root}: refused"
        return None

    def read(self, member: str) -> bytes:
        """The raw bytes of one member, at most max_bytes; SourceError when it cannot be read safely.

        KeyError / FileNotFoundError when the member does not exist (any more).
        """
        if self._zip is not None:
            return self._read_zip(member)
        return self._read_file(member)

    def _too_large(self, member: str, size: int | str) -> SourceError:
        return SourceError(
            member, "file_too_large", f"{size} bytes > data.max_file_bytes = {self.max_bytes}: not read"
        )

    def _read_zip(self, member: str) -> bytes:
        if reason := unsafe_reason(member):
            raise ValueError(f"{member!r}: {reason}")
        info = self._zip.getinfo(member)
        if info.flag_bits & 0x1:
            raise SourceError(member, "encrypted_zip_entry", "the entry is encrypted (password-protected)")
        if info.file_size > self.max_bytes:
            raise self._too_large(member, info.file_size)
        try:
            with self._zip.open(info) as entry:  # a declared size that lies still stops at the cap
                data = entry.read(min(info.file_size, self.max_bytes) + 1)
        except (
            zipfile.BadZipFile,
            zlib.error,
            lzma.LZMAError,
            EOFError,
            OSError,
            NotImplementedError,
        ) as err:
            raise SourceError(member, "corrupt_zip_entry", f"{type(err).__name__}: {err}") from None
        if len(data) > self.max_bytes:
            raise self._too_large(member, f"more than {self.max_bytes}")
        return data

    def _read_file(self, member: str) -> bytes:
        path = self.path / member
        if target := self._outside(path):  # a link or a `..` out of the folder (even one made after ingest)
            raise SourceError(member, "link_outside_root", f"points to {target}")
        # O_NONBLOCK: opening a FIFO planted under an image's name must not hang; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            if st.st_size > self.max_bytes:
                raise self._too_large(member, st.st_size)
            # One byte more than its size, not the cap: read(cap) would allocate the whole cap for every file.
            data = f.read(st.st_size + 1)
            if len(data) > st.st_size:  # it grew after the size check: the rest, up to the cap
                data += f.read(self.max_bytes + 1 - len(data))
        if len(data) > self.max_bytes:
            raise self._too_large(member, f"more than {self.max_bytes}")
        return data


class ImageSources:
    """Several image folders or zips read as one (HAM10000's two parts): a member is named
    `<folder or zip name>/<its member>`, and each part keeps ImageSource's refusals and bounds."""

    def __init__(self, paths: list[str | Path], max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.parts: dict[str, ImageSource] = {}
        for path in paths:
            name = Path(path).name
            if name in self.parts:
                raise ValueError(f"two image sources named {name!r}: {paths}")
            self.parts[name] = ImageSource(Path(path), max_bytes=max_bytes)
        self.refused: list[tuple[str, str, str]] = []
        self.ignored: list[str] = []

    def __enter__(self) -> ImageSources:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for part in self.parts.values():
            part.close()

    def members(self) -> Iterator[tuple[str, str]]:
        """Yield (member, image_id) for every image file of every part, part by part; fills refused/ignored."""
        self.refused, self.ignored = [], []
        for name, part in self.parts.items():
            for member, image_id in part.members():
                yield f"{name}/{member}", image_id
            self.refused += [(f"{name}/{n}", reason, detail) for n, reason, detail in part.refused]
            self.ignored += [f"{name}/{n}" for n in part.ignored]

    def read(self, member: str) -> bytes:
        name, _, inner = member.partition("/")
        if name not in self.parts:
            raise KeyError(f"{member!r} is in none of the image sources {sorted(self.parts)}")
        return self.parts[name].read(inner)


def image_paths(images: str | Path | Sequence[str | Path]) -> tuple[str, ...]:
    """A rule's `images` input (one folder or zip, or several) as a tuple of paths."""
    return (str(images),) if isinstance(images, str | Path) else tuple(str(p) for p in images)


def open_images(images: str | Path | Sequence[str | Path], max_bytes: int = DEFAULT_MAX_FILE_BYTES):
    """ImageSource for one folder or zip, ImageSources for several; both list, read and refuse alike."""
    paths = image_paths(images)
    if len(paths) == 1:
        return ImageSource(Path(paths[0]), max_bytes=max_bytes)
    return ImageSources(list(paths), max_bytes=max_bytes)

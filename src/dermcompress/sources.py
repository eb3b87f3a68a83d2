"""Where the official ISIC 2019 files are, and safe reading of the image folder or zip.

The zip is read entry by entry (never extracted); an entry whose name is absolute or climbs out with `..` is
refused, so a hostile archive cannot point the pipeline at files outside it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGES_DIR = "ISIC_2019_Training_Input"
IMAGES_ZIP = f"{IMAGES_DIR}.zip"
# The official zip holds two documentation files besides the JPEGs.
DOC_FILES = ("ATTRIBUTION.txt", "LICENSE.txt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

_RULE = "!" * 100
SYNTHETIC_BANNER = f"""
{_RULE}
!!  SYNTHETIC DATA: data.isic_root is unset, so every number that follows comes from a generated stand-in !!
!!  for ISIC 2019 (results/data/synthetic/). Set data.isic_root to run the real study.                     !!
{_RULE}"""


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
    """The image folder or zip: list its image files, read one, and say what was refused or ignored."""

    path: Path
    refused: list[tuple[str, str]] = field(default_factory=list)  # (entry name, reason)
    ignored: list[str] = field(default_factory=list)  # documentation and other non-image files
    _zip: zipfile.ZipFile | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.is_file():
            self._zip = zipfile.ZipFile(self.path)
        elif not self.path.is_dir():
            raise FileNotFoundError(f"image source {self.path} is neither a folder nor a zip file")

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
        if self._zip is not None:
            names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        else:
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        for name in sorted(names):
            reason = unsafe_reason(name) if self._zip is not None else None
            if reason:
                self.refused.append((name, reason))
                continue
            image_id = image_id_of(name)
            if image_id is None:
                self.ignored.append(name)
                continue
            yield name, image_id

    def read(self, member: str) -> bytes:
        """The raw bytes of one member (refuses unsafe zip names here too)."""
        if self._zip is not None:
            if reason := unsafe_reason(member):
                raise ValueError(f"{member!r}: {reason}")
            return self._zip.read(member)
        return (self.path / member).read_bytes()

"""`dermcompress fetch`: download a source's official files, checked, into the layout the workflow reads.

Only ever run by hand (the workflow never downloads), typically where the network is, before copying DEST to
the cluster. Each file streams into `DEST/.<name>.part` and resumes after an interruption with an HTTP Range
request. It gets its final name (an atomic `os.replace`) only once its size (the server's and the publisher's),
the publisher's checksum where one is published and, for a zip, the CRC of every member have been checked: a
file under its final name is a verified one, so a later run skips it after a size check, without rehashing.

What happens to a `.part`: an interrupted download keeps it, and the same command resumes from it. A download
whose bytes are wrong (wrong size, wrong checksum, a damaged zip, a server that refuses the resume) has its
`.part` deleted, since resuming from wrong bytes can never give right ones: the next run starts from byte 0.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlsplit
from urllib.request import Request, urlopen

from dermcompress.data.sources import GROUND_TRUTH, IMAGES_ZIP, METADATA

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 60  # urllib's timeout: the connect, and then each read (not the whole download)
ATTEMPTS = 5  # connections per file per run; each one after the first resumes where the last broke off
RETRY_PAUSE_S = 3.0
# Harvard Dataverse has been seen to answer urllib's default User-Agent with 403.
USER_AGENT = "dermcompress-fetch/0.1 (Python urllib)"


@dataclass(frozen=True)
class RemoteFile:
    """One published file: saved as `name`; `size` (bytes) and `checksum` are the publisher's, or None."""

    name: str
    url: str
    size: int | None = None
    checksum: tuple[str, str] | None = None  # (hashlib algorithm, hex digest)
    is_zip: bool = False
    published_as: str | None = None  # the publisher's name, where it differs from `name`


_ISIC = "https://isic-challenge-data.s3.amazonaws.com"
# Harvard Dataverse, HAM10000, doi:10.7910/DVN/DBW86T: the access API by file id.
_DATAVERSE = "https://dataverse.harvard.edu/api/access/datafile"

# ISIC publishes no exact size or checksum for its challenge files (the download page gives rounded sizes such
# as "23GB"), and the S3 bucket's ETags are not MD5s for multipart uploads: None for both, so the server's
# Content-Length / Content-Range and, for the zips, every member's CRC are what is checked.
# HAM10000: file ids, MD5s (as Dataverse lists them) and sizes as recorded by several independent projects that
# downloaded and checked them; not re-checked live from here. The metadata is an "ingested" tabular file:
# Dataverse serves a converted HAM10000_metadata.tab (830,428 bytes, every field quoted) by default and lists
# the MD5 of the uploaded CSV, which `?format=original` serves (690,218 bytes).
SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "isic2019": (
        RemoteFile(IMAGES_ZIP, f"{_ISIC}/2019/{IMAGES_ZIP}", is_zip=True),
        RemoteFile(GROUND_TRUTH, f"{_ISIC}/2019/{GROUND_TRUTH}"),
        RemoteFile(METADATA, f"{_ISIC}/2019/{METADATA}"),
    ),
    "isic2020": tuple(
        RemoteFile(name, f"{_ISIC}/2020/{name}", is_zip=name.endswith(".zip"))
        for name in (
            "ISIC_2020_Training_JPEG.zip",
            "ISIC_2020_Training_GroundTruth.csv",
            "ISIC_2020_Training_GroundTruth_v2.csv",
            "ISIC_2020_Training_Duplicates.csv",
        )
    ),
    "ham10000": (
        RemoteFile(
            "HAM10000_images_part_1.zip",
            f"{_DATAVERSE}/3172585",
            1_366_522_108,
            ("md5", "4639bfa73ab251610530a97c898e6e46"),
            is_zip=True,
        ),
        RemoteFile(
            "HAM10000_images_part_2.zip",
            f"{_DATAVERSE}/3172584",
            1_403_566_547,
            ("md5", "da43d6cc50f6613013be07e8986b384b"),
            is_zip=True,
        ),
        RemoteFile(
            "HAM10000_metadata.csv",
            f"{_DATAVERSE}/4338392?format=original",
            690_218,
            ("md5", "8f85fb1aa29d80a2797247e434deb79d"),
            published_as="HAM10000_metadata.tab",
        ),
    ),
}


class FetchError(RuntimeError):
    """A file that cannot be fetched: the message names it (or the host) and says what to do."""


class _Interrupted(Exception):
    """The connection ended before the last byte; the `.part` holds a prefix to resume from."""

    def __init__(self, detail: str, total: int | None) -> None:
        super().__init__(detail)
        self.total = total


def fetch(
    source: str, dest: str | Path, *, only: list[str] | None = None, mirror: str | None = None
) -> dict[str, str]:
    """Download `source`'s files (or just the `only` ones) into `dest`: name -> "downloaded" or "present".

    `mirror` (an http(s) base URL) replaces every published URL with MIRROR/NAME: a mirror is a folder of the
    files under the names they are saved as. Sizes and checksums are still the publisher's.
    """
    files = select(source, only)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FetchError(f"{dest} is a file, not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    outcome = {}
    for remote in files:
        target = dest / remote.name
        if target.exists():
            _check_present(remote, target)
            log.info("%s: already in %s, skipped (delete it to download it again)", remote.name, dest)
            outcome[remote.name] = "present"
            continue
        url = file_url(remote, mirror)
        log.info("%s: from %s", remote.name, url)
        _download(remote, url, dest)
        log.info("%s: downloaded and verified", remote.name)
        outcome[remote.name] = "downloaded"
    return outcome


def select(source: str, only: list[str] | None = None) -> tuple[RemoteFile, ...]:
    """The files of `source`, or the `only` ones among them (names as saved), in the table's order."""
    if source not in SOURCES:
        raise FetchError(f"unknown source {source!r}; one of {', '.join(SOURCES)}")
    files = SOURCES[source]
    if only:
        names = {remote.name for remote in files}
        unknown = [name for name in only if name not in names]
        if unknown:
            raise FetchError(
                f"{source} has no file {', '.join(unknown)}; its files: {', '.join(sorted(names))}"
            )
        files = tuple(remote for remote in files if remote.name in only)
    return files


def file_url(remote: RemoteFile, mirror: str | None) -> str:
    """The published URL, or MIRROR/NAME."""
    if mirror is None:
        return remote.url
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FetchError(f"--mirror {mirror!r} is not an http(s) URL")
    return f"{mirror.rstrip('/')}/{quote(remote.name)}"


def _check_present(remote: RemoteFile, target: Path) -> None:
    """Only a verified download gets the final name, so a present file is trusted if its size is right."""
    size = target.stat().st_size
    if remote.size is not None and size != remote.size:
        raise FetchError(
            f"{target} is already there but holds {size:,} bytes, not the publisher's {remote.size:,}: "
            "move it away and run fetch again"
        )


def _download(remote: RemoteFile, url: str, dest: Path) -> None:
    """Stream `url` into DEST/.<name>.part, resuming after each break, verify it, then rename it into place."""
    part = dest / f".{remote.name}.part"
    announced = None  # the total the first response announced, which every resumed one must repeat
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _transfer(remote, url, part, announced)
            break
        except _Interrupted as err:
            announced = err.total if announced is None else announced
            have = part.stat().st_size if part.exists() else 0
            if attempt == ATTEMPTS:
                raise FetchError(
                    f"{remote.name}: the download broke off {ATTEMPTS} times (last: {err}); {part} keeps the "
                    f"{have:,} bytes received: run the same command again to resume from there"
                ) from None
            log.warning("%s: connection lost (%s) at byte %d; resuming", remote.name, err, have)
            time.sleep(RETRY_PAUSE_S)
    _verify(remote, part)
    os.replace(part, dest / remote.name)


def _transfer(remote: RemoteFile, url: str, part: Path, announced: int | None) -> None:
    """One request: append to the `.part` from where it ends (206) or rewrite it (200), up to the total.

    The total is the server's (Content-Length of a 200, Content-Range of a 206), which must agree with the
    publisher's size and with the first answer's; fewer bytes than that is an interruption, more a refusal.
    """
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have == remote.size:
        return  # every byte is there already (a run stopped before verifying): no request
    if remote.size is not None and have > remote.size:
        raise _rejected(part, f"{remote.name}: {part} holds more bytes than the publisher's {remote.size:,}")
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as err:
        if err.code == 416 and have:
            total = _content_range(err.headers.get("Content-Range", ""))[1]
            if total == have:
                return  # the .part is complete already
            holds = "an unknown number of" if total is None else f"{total:,}"
            raise _rejected(
                part,
                f"{remote.name}: {url} refused to resume at byte {have:,} (HTTP 416; it holds {holds} bytes)",
            ) from None
        raise FetchError(f"{remote.name}: {url} answered HTTP {err.code} {err.reason}") from None
    except URLError as err:
        raise _unreachable(url, err.reason, part) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
        raise _Interrupted(f"no response: {str(err) or type(err).__name__}", announced) from None
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                sent = "an unreadable Content-Range" if start is None else f"from byte {start:,}"
                raise _rejected(part, f"{remote.name}: asked {url} for byte {have:,} on, it sent {sent}")
            mode = "ab"
        else:  # 200: the whole file
            if have:
                log.info("%s: the server ignored the Range request; starting again from byte 0", remote.name)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        for expected, whose in ((announced, "its first answer's"), (remote.size, "the publisher's")):
            if total is not None and expected is not None and total != expected:
                raise _rejected(
                    part, f"{remote.name}: {url} announces {total:,} bytes, {whose} size is {expected:,}"
                )
        total = total if total is not None else remote.size
        _check_space(remote.name, part.parent, (total or 0) - have)
        _stream(response, part, mode, remote.name, have, total)
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"{got:,} of {total:,} bytes", total)
    if total is not None and got > total:
        raise _rejected(part, f"{remote.name}: received {got:,} bytes, {total:,} were announced")


def _stream(response, part: Path, mode: str, name: str, have: int, total: int | None) -> None:
    """Copy the body into the `.part` behind a progress bar; a broken read is an interruption, not an error."""
    from tqdm import tqdm

    bar = tqdm(
        total=total, initial=have, desc=name, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1
    )
    with part.open(mode) as out, bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (http.client.HTTPException, OSError) as err:  # a reset, a read timeout, a cut chunk
                raise _Interrupted(str(err) or type(err).__name__, total) from None
            if not chunk:
                break
            out.write(chunk)
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())


def _verify(remote: RemoteFile, part: Path) -> None:
    """The publisher's size and checksum, every zip member's CRC: a failure deletes the `.part`."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        raise _rejected(part, f"{remote.name}: {size:,} bytes, the publisher's size is {remote.size:,}")
    if remote.checksum is not None:
        algorithm, want = remote.checksum
        got = file_digest(part, algorithm)
        if got != want:
            raise _rejected(part, f"{remote.name}: {algorithm} {got}, the publisher's is {want}: corrupted")
    if remote.is_zip:
        problem = zip_problem(part)
        if problem:
            raise _rejected(part, f"{remote.name}: {problem}")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def zip_problem(path: Path) -> str | None:
    """Why a zip is damaged (a member failing its CRC, an unreadable structure), or None: reads every member."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as err:
        return f"not a readable zip ({err})"
    return None if bad is None else f"zip member {bad!r} fails its CRC check: the download is corrupted"


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total) from `bytes 100-199/200` or `bytes */200`; None where absent or `*`."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _check_space(name: str, folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FetchError(f"{name}: {needed:,} more bytes needed, {folder} has {free:,} free")


def _rejected(part: Path, message: str) -> FetchError:
    """Wrong bytes cannot be resumed from: delete the `.part` so the next run starts from byte 0."""
    part.unlink(missing_ok=True)
    return FetchError(f"{message} (refused; the partial download was deleted, a rerun starts over)")


def _unreachable(url: str, reason: object, part: Path) -> FetchError:
    host = urlsplit(url).hostname
    kept = f" {part} keeps what came so far and the same command resumes from it." if part.exists() else ""
    return FetchError(
        f"cannot reach {host} ({reason}). A cluster's login or compute node often has no network: run "
        f"`dermcompress fetch` where there is one, then copy {part.parent} over.{kept}"
    )

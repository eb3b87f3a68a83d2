"""`dermcompress fetch` against a real HTTP server on the loopback: real sockets, real files, real outcomes.

The server serves a synthetic zip and CSVs under the official ISIC 2019 names, honours Range requests, and can
be told to cut the connection after N bytes (first request only), corrupt one byte, announce a wrong
Content-Length, send a shorter body than it announces, or ignore Range (answer 200).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dermcompress import cli
from dermcompress.data import fetch as fetch_mod
from dermcompress.data.fetch import FetchError, RemoteFile, fetch
from dermcompress.data.sources import GROUND_TRUTH, IMAGES_ZIP, METADATA


def make_zip() -> tuple[bytes, int]:
    """A stored (uncompressed) zip of a few random members; also the offset of a byte inside member 0's data."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i in range(4):
            archive.writestr(f"ISIC_2019_Training_Input/ISIC_{i:07d}.jpg", rng.bytes(60_000))
        archive.writestr("ISIC_2019_Training_Input/LICENSE.txt", b"CC-BY-NC\n")
    data = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        first = archive.infolist()[0]
    # Local header: 30 fixed bytes, then the name and the extra field, then the member's data.
    name_len = int.from_bytes(data[first.header_offset + 26 : first.header_offset + 28], "little")
    extra_len = int.from_bytes(data[first.header_offset + 28 : first.header_offset + 30], "little")
    return data, first.header_offset + 30 + name_len + extra_len + 12_345


ZIP_BYTES, ZIP_DATA_OFFSET = make_zip()
FILES = {
    IMAGES_ZIP: ZIP_BYTES,
    GROUND_TRUTH: b"image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
    + b"".join(b"ISIC_%07d,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n" % i for i in range(4)),
    METADATA: b"image,age_approx,anatom_site_general,lesion_id,sex\n"
    + b"".join(b"ISIC_%07d,45.0,anterior torso,IL_%07d,female\n" % (i, i) for i in range(4)),
}


@dataclass
class Behaviour:
    url: str = ""
    cut_after: dict[str, int] = field(
        default_factory=dict
    )  # name -> bytes sent before cutting (first request)
    corrupt: dict[str, int] = field(default_factory=dict)  # name -> offset of the byte served flipped
    announce: dict[str, int] = field(default_factory=dict)  # name -> the Content-Length announced instead
    truncate: dict[str, int] = field(default_factory=dict)  # name -> bytes that exist (the rest never comes)
    ignore_range: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    served: Counter = field(default_factory=Counter)  # name -> bodies sent


class Handler(http.server.BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        b, name = self.behaviour, self.path.lstrip("/")
        b.requests.append((name, self.headers.get("Range")))
        if name.startswith("redirect/"):  # as Dataverse sends its downloads on to S3
            self.send_response(303)
            self.send_header("Location", f"/{name.removeprefix('redirect/')}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name not in FILES:
            self.send_error(404)
            return
        data = bytearray(FILES[name])
        if name in b.corrupt:
            data[b.corrupt[name]] ^= 0xFF
        size = len(data)
        exists = b.truncate.get(name, size)
        start, status = 0, 200
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if asked and name not in b.ignore_range:
            start, status = int(asked.group(1)), 206
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(b.announce.get(name, size) - start))
        self.end_headers()
        body = bytes(data[start:exists])
        b.served[name] += 1
        if name in b.cut_after and b.served[name] == 1:
            body = body[: b.cut_after[name]]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    behaviour = Behaviour()
    handler = type("BoundHandler", (Handler,), {"behaviour": behaviour})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    behaviour.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield behaviour
    httpd.shutdown()
    httpd.server_close()


def table(*, sizes: bool = True, checksums: bool = True) -> tuple[RemoteFile, ...]:
    """The ISIC 2019 entries of fetch.SOURCES, with the synthetic files' sizes and MD5s where asked."""
    return tuple(
        RemoteFile(
            remote.name,
            remote.url,
            len(FILES[remote.name]) if sizes else None,
            ("md5", hashlib.md5(FILES[remote.name]).hexdigest()) if checksums else None,
            remote.is_zip,
        )
        for remote in fetch_mod.SOURCES["isic2019"]
    )


@pytest.fixture
def isic(monkeypatch):
    """Point the isic2019 source at the synthetic files; no pause between attempts."""
    monkeypatch.setitem(fetch_mod.SOURCES, "isic2019", table())
    monkeypatch.setattr(fetch_mod, "RETRY_PAUSE_S", 0.0)
    return monkeypatch


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith("."))


def assert_identical(dest: Path, names=tuple(FILES)) -> None:
    for name in names:
        assert (dest / name).read_bytes() == FILES[name], name


def test_table_is_the_published_one():
    assert tuple(fetch_mod.SOURCES) == cli.FETCH_SOURCES
    assert [f.name for f in fetch_mod.SOURCES["isic2019"]] == [IMAGES_ZIP, GROUND_TRUTH, METADATA]
    for source, files in fetch_mod.SOURCES.items():
        assert len({f.name for f in files}) == len(files), source
        for remote in files:
            assert remote.url.startswith("https://"), remote
            assert remote.is_zip == remote.name.endswith(".zip"), remote
            if remote.checksum is not None:
                algorithm, digest = remote.checksum
                assert len(digest) == hashlib.new(algorithm).digest_size * 2 and int(digest, 16) >= 0
    for remote in (*fetch_mod.SOURCES["isic2019"], *fetch_mod.SOURCES["isic2020"]):
        year = "2019" if "2019" in remote.name else "2020"
        assert remote.url == f"https://isic-challenge-data.s3.amazonaws.com/{year}/{remote.name}"
        assert remote.size is None and remote.checksum is None  # ISIC publishes neither


def test_mirror_replaces_the_published_url():
    remote = fetch_mod.SOURCES["ham10000"][2]
    assert fetch_mod.file_url(remote, None).endswith("/4338392?format=original")
    assert fetch_mod.file_url(remote, "https://data.example.org/ham/") == (
        "https://data.example.org/ham/HAM10000_metadata.csv"
    )
    with pytest.raises(FetchError, match="not an http"):
        fetch_mod.file_url(remote, "/scratch/mirror")


def test_clean_fetch_is_byte_identical_and_leaves_no_part(server, isic, tmp_path):
    outcome = fetch("isic2019", tmp_path / "isic", mirror=server.url)
    assert outcome == dict.fromkeys(FILES, "downloaded")
    assert_identical(tmp_path / "isic")
    assert leftovers(tmp_path / "isic") == []
    assert sorted(server.requests) == sorted((name, None) for name in FILES)


def test_published_urls_are_used_without_a_mirror(server, isic, tmp_path):
    """Without --mirror each file comes from its table URL (here the loopback server's)."""
    isic.setitem(
        fetch_mod.SOURCES,
        "isic2019",
        tuple(RemoteFile(f.name, f"{server.url}/{f.name}", f.size, f.checksum, f.is_zip) for f in table()),
    )
    fetch("isic2019", tmp_path, only=[GROUND_TRUTH])
    assert server.requests == [(GROUND_TRUTH, None)]
    assert_identical(tmp_path, [GROUND_TRUTH])
    assert not (tmp_path / IMAGES_ZIP).exists()


def test_an_interrupted_download_resumes_with_a_range_request(server, isic, tmp_path):
    server.cut_after[IMAGES_ZIP] = 70_001
    fetch("isic2019", tmp_path, mirror=server.url, only=[IMAGES_ZIP])
    assert server.requests == [(IMAGES_ZIP, None), (IMAGES_ZIP, "bytes=70001-")]
    assert_identical(tmp_path, [IMAGES_ZIP])
    assert leftovers(tmp_path) == []


def test_a_resume_survives_a_redirect(server, isic, tmp_path):
    """Dataverse answers with a redirect to S3: the Range header must follow it."""
    server.cut_after[IMAGES_ZIP] = 33_333
    fetch("isic2019", tmp_path, mirror=f"{server.url}/redirect", only=[IMAGES_ZIP])
    assert server.requests == [
        (f"redirect/{IMAGES_ZIP}", None),
        (IMAGES_ZIP, None),
        (f"redirect/{IMAGES_ZIP}", "bytes=33333-"),
        (IMAGES_ZIP, "bytes=33333-"),
    ]
    assert_identical(tmp_path, [IMAGES_ZIP])


def test_a_run_that_gives_up_keeps_the_part_and_the_next_run_resumes(server, isic, tmp_path):
    isic.setattr(fetch_mod, "ATTEMPTS", 1)
    server.cut_after[IMAGES_ZIP] = 50_000
    with pytest.raises(FetchError, match="run the same command again to resume"):
        fetch("isic2019", tmp_path, mirror=server.url, only=[IMAGES_ZIP])
    assert (tmp_path / f".{IMAGES_ZIP}.part").stat().st_size == 50_000
    assert not (tmp_path / IMAGES_ZIP).exists()
    fetch("isic2019", tmp_path, mirror=server.url, only=[IMAGES_ZIP])
    assert server.requests[-1] == (IMAGES_ZIP, "bytes=50000-")
    assert_identical(tmp_path, [IMAGES_ZIP])
    assert leftovers(tmp_path) == []


def test_a_corrupted_zip_byte_is_caught_by_the_crc_check(server, isic, tmp_path):
    """Like ISIC: no published checksum, so only the zip members' CRCs can tell."""
    isic.setitem(fetch_mod.SOURCES, "isic2019", table(checksums=False))
    server.corrupt[IMAGES_ZIP] = ZIP_DATA_OFFSET
    with pytest.raises(FetchError, match=r"ISIC_0000000\.jpg' fails its CRC check"):
        fetch("isic2019", tmp_path, mirror=server.url)
    assert not (tmp_path / IMAGES_ZIP).exists()
    assert leftovers(tmp_path) == []  # wrong bytes are not kept to resume from


def test_a_corrupted_byte_fails_the_publishers_checksum(server, isic, tmp_path):
    server.corrupt[GROUND_TRUTH] = 50
    with pytest.raises(FetchError, match=r"md5 .* the publisher's is"):
        fetch("isic2019", tmp_path, mirror=server.url, only=[GROUND_TRUTH])
    assert not (tmp_path / GROUND_TRUTH).exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("delta", [-1000, 1000])
def test_an_announced_size_unlike_the_publishers_is_refused(server, isic, tmp_path, delta):
    server.announce[IMAGES_ZIP] = len(ZIP_BYTES) + delta
    if delta < 0:
        server.truncate[IMAGES_ZIP] = len(ZIP_BYTES) + delta  # a mirror's incomplete copy
    with pytest.raises(FetchError, match=r"announces .* the publisher's size is"):
        fetch("isic2019", tmp_path, mirror=server.url, only=[IMAGES_ZIP])
    assert not (tmp_path / IMAGES_ZIP).exists()
    assert leftovers(tmp_path) == []


def test_a_body_shorter_than_announced_never_gets_the_final_name(server, isic, tmp_path):
    """No publisher size: the server's Content-Length is the reference, and it never arrives in full."""
    isic.setitem(fetch_mod.SOURCES, "isic2019", table(sizes=False, checksums=False))
    server.truncate[METADATA] = len(FILES[METADATA]) - 40
    with pytest.raises(FetchError, match="broke off 5 times"):
        fetch("isic2019", tmp_path, mirror=server.url, only=[METADATA])
    assert not (tmp_path / METADATA).exists()
    assert len(server.requests) == fetch_mod.ATTEMPTS
    assert server.requests[1] == (METADATA, f"bytes={len(FILES[METADATA]) - 40}-")


def test_a_server_that_ignores_range_restarts_from_zero(server, isic, tmp_path):
    server.ignore_range.add(IMAGES_ZIP)
    (tmp_path / f".{IMAGES_ZIP}.part").write_bytes(b"x" * 5000)  # not a prefix of the file: must be dropped
    server.cut_after[IMAGES_ZIP] = 90_000
    fetch("isic2019", tmp_path, mirror=server.url, only=[IMAGES_ZIP])
    assert server.requests == [(IMAGES_ZIP, "bytes=5000-"), (IMAGES_ZIP, "bytes=90000-")]
    assert_identical(tmp_path, [IMAGES_ZIP])
    assert leftovers(tmp_path) == []


def test_a_complete_part_is_verified_without_downloading_again(server, isic, tmp_path):
    """A run killed between the last byte and the rename: the server answers 416 with the total it holds."""
    isic.setitem(fetch_mod.SOURCES, "isic2019", table(sizes=False))
    (tmp_path / f".{IMAGES_ZIP}.part").write_bytes(ZIP_BYTES)
    fetch("isic2019", tmp_path, mirror=server.url, only=[IMAGES_ZIP])
    assert server.requests == [(IMAGES_ZIP, f"bytes={len(ZIP_BYTES)}-")]
    assert_identical(tmp_path, [IMAGES_ZIP])


def test_a_part_longer_than_the_remote_file_is_refused(server, isic, tmp_path):
    isic.setitem(fetch_mod.SOURCES, "isic2019", table(sizes=False))
    (tmp_path / f".{METADATA}.part").write_bytes(FILES[METADATA] + b"extra")
    with pytest.raises(FetchError, match="HTTP 416"):
        fetch("isic2019", tmp_path, mirror=server.url, only=[METADATA])
    assert leftovers(tmp_path) == []
    fetch("isic2019", tmp_path, mirror=server.url, only=[METADATA])  # the rerun starts over
    assert_identical(tmp_path, [METADATA])


def test_files_already_present_are_skipped_without_a_request(server, isic, tmp_path, caplog):
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    with caplog.at_level("INFO"):
        assert fetch("isic2019", tmp_path, mirror=server.url) == dict.fromkeys(FILES, "present")
    assert server.requests == []
    assert "skipped" in caplog.text


def test_a_present_file_of_the_wrong_size_is_refused_and_left_alone(server, isic, tmp_path):
    (tmp_path / GROUND_TRUTH).write_bytes(b"image,MEL\n")
    with pytest.raises(FetchError, match="already there but holds 10 bytes"):
        fetch("isic2019", tmp_path, mirror=server.url)
    assert (tmp_path / GROUND_TRUTH).read_bytes() == b"image,MEL\n"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_host_gives_one_clear_message(isic, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(FetchError) as err:
        fetch("isic2019", tmp_path, mirror=url)
    message = str(err.value)
    assert message.startswith("cannot reach 127.0.0.1 (")
    assert "login or compute node often has no network" in message and str(tmp_path) in message
    assert "Traceback" not in message


def test_cli_end_to_end(server, isic, tmp_path, capsys):
    dest = tmp_path / "isic2019"
    assert cli.main(["fetch", "isic2019", str(dest), "--mirror", server.url, "--only", GROUND_TRUTH]) == 0
    assert cli.main(["fetch", "isic2019", str(dest), "--mirror", server.url]) == 0
    out = capsys.readouterr().out
    assert "3 files verified" in out and "(2 downloaded, 1 already there)" in out
    assert f"data.isic_root: {dest.resolve()}" in out
    assert_identical(dest)
    assert sorted(server.requests) == sorted((name, None) for name in FILES)


def test_cli_errors_are_one_line(isic, tmp_path):
    with pytest.raises(SystemExit, match=r"^dermcompress fetch: cannot reach 127\.0\.0\.1"):
        cli.main(["fetch", "isic2019", str(tmp_path), "--mirror", f"http://127.0.0.1:{closed_port()}"])
    with pytest.raises(SystemExit, match=r"^dermcompress fetch: isic2019 has no file nope\.csv"):
        cli.main(["fetch", "isic2019", str(tmp_path), "--only", "nope.csv"])

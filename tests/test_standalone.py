"""Standalone, synchronous moderation (CONTRACT §2, issue 11): a real daemon
moderating images served by a real HTTP file server."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from daemon import Daemon
from http_files import FileServer


@pytest.fixture(scope="module")
def files():
    with FileServer() as server:
        yield server


@pytest.fixture(scope="module")
def daemon(test_bundle, tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("standalone"), test_bundle) as d:
        yield d


@pytest.fixture(scope="module")
def key(daemon):
    return daemon.create_key("standalone")


def image(color: tuple[int, int, int], fmt: str, size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_red_image_is_violence_in_every_format(daemon, key, files, fmt):
    url = files.add(f"red.{fmt.lower()}", image((220, 0, 0), fmt))
    r = daemon.call("POST", "/v1/moderate/image", {"inputUrl": url, "metadata": {"n": 1}}, key=key)
    assert r.status == 200, r.body
    job = r.data
    assert job["status"] == "completed" and job["inputType"] == "image" and job["inputUrl"] == url
    assert job["safe"] is False and job["framesAnalyzed"] == 1
    assert [v["category"] for v in job["violations"]][0] == "violence"
    assert job["flaggedFrames"][0]["frameIndex"] == 0 and job["metadata"] == {"n": 1}


def test_safe_image(daemon, key, files):
    url = files.add("grey.png", image((128, 128, 128), "PNG"))
    job = daemon.call("POST", "/v1/moderate/image", {"inputUrl": url}, key=key).data
    assert job["safe"] is True and job["violations"] == [] and job["flaggedFrames"] == []


def test_truncated_image_and_text_are_400(daemon, key, files):
    for name, data in [("cut.png", image((220, 0, 0), "PNG", (640, 480))[:200]), ("notes.txt", b"hello world\n" * 10)]:
        r = daemon.call("POST", "/v1/moderate/image", {"inputUrl": files.add(name, data)}, key=key)
        assert r.status == 400 and r.error["code"] == "STREAMGUARD_INPUT_INVALID", (name, r.body)


def test_unreachable_is_502(daemon, key, files):
    r = daemon.call("POST", "/v1/moderate/image", {"inputUrl": files.url("/status/404")}, key=key)
    assert r.status == 502 and r.error["code"] == "STREAMGUARD_INPUT_UNREACHABLE", r.body

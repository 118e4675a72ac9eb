"""Standalone, synchronous moderation (CONTRACT §2, issue 11): a real daemon
moderating images served by a real HTTP file server."""

from __future__ import annotations

import io
import socket
import time

import pytest
from PIL import Image

from daemon import Daemon
from http_files import FileServer
from receivers import Receiver


@pytest.fixture(scope="module")
def files():
    with FileServer() as server:
        yield server


# Loopback is private: 127.0.0.1 is the allowed network, 127.0.0.2 stands for any refused address.
RULES = {"STREAMGUARD_SOURCES__ALLOW_PRIVATE": "false", "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true",
         "STREAMGUARD_SOURCES__ALLOWED_NETWORKS": '["127.0.0.1/32"]'}


@pytest.fixture(scope="module")
def daemon(test_bundle, tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("standalone"), test_bundle, env=RULES) as d:
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
    assert job["status"] == "COMPLETED" and job["inputType"] == "image" and job["inputUrl"] == url
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


def gif(colors: list[tuple[int, int, int]]) -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def test_animated_gif_flags_the_red_frame(daemon, key, files):
    # distinct greys: Pillow merges identical consecutive frames
    url = files.add("anim.gif", gif([(128, 128, 128), (120, 120, 120), (136, 136, 136), (220, 0, 0)]))
    job = daemon.call("POST", "/v1/moderate/image", {"inputUrl": url}, key=key).data
    assert job["framesAnalyzed"] == 4 and job["safe"] is False
    assert [f["frameIndex"] for f in job["flaggedFrames"]] == [3]


def test_decompression_bomb_is_400_quickly(daemon, key, files):
    buf = io.BytesIO()
    Image.new("1", (20000, 20000), 0).save(buf, format="PNG")  # 400 MP in a few kB
    url = files.add("bomb.png", buf.getvalue())
    t0 = time.monotonic()
    r = daemon.call("POST", "/v1/moderate/image", {"inputUrl": url}, key=key)
    assert r.status == 400 and r.error["details"]["reason"] == "too_many_pixels", r.body
    assert time.monotonic() - t0 < 2


def test_batch_items_fail_one_by_one(daemon, key, files):
    urls = [files.add("b-red.jpg", image((220, 0, 0), "JPEG")), files.url("/status/404"),
            files.add("b-grey.png", image((128, 128, 128), "PNG"))]
    r = daemon.call("POST", "/v1/moderate/images", {"inputUrls": urls}, key=key)
    assert r.status == 200, r.body
    items = r.data["batchItems"]
    assert [i["index"] for i in items] == [0, 1, 2]
    assert items[0]["safe"] is False and items[2]["safe"] is True
    assert items[1]["errorMessage"] and items[0]["errorMessage"] is None
    assert r.data["safe"] is False and r.data["framesAnalyzed"] == 2


@pytest.mark.parametrize("count", [0, 21])
def test_batch_size_is_1_to_20(daemon, key, files, count):
    r = daemon.call("POST", "/v1/moderate/images", {"inputUrls": [files.url("/files/x")] * count}, key=key)
    assert r.status == 400 and "inputUrls" in r.error["message"], r.body


def multipart(field: str, parts: list[bytes]) -> tuple[bytes, str]:
    boundary = "sgboundary7d3"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"f{i}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + p + b"\r\n"
                    for i, p in enumerate(parts))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_uploads(daemon, key):
    body, ctype = multipart("image", [image((220, 0, 0), "PNG")])
    r = daemon.call("POST", "/v1/moderate/image/upload", raw=body, content_type=ctype, key=key)
    assert r.status == 200 and r.data["safe"] is False and r.data["inputUrl"] is None, r.body
    body, ctype = multipart("images", [image((220, 0, 0), "PNG"), image((128, 128, 128), "JPEG")])
    r = daemon.call("POST", "/v1/moderate/images/upload", raw=body, content_type=ctype, key=key)
    assert r.status == 200 and [i["safe"] for i in r.data["batchItems"]] == [False, True], r.body


def test_upload_over_20_mb_is_413(daemon, key):
    """A raw client: the 413 comes back before the 21 MB body is read."""
    body, ctype = multipart("image", [b"\xff\xd8\xff" + b"\0" * (21 << 20)])
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall((f"POST /v1/moderate/image/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:65536])
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_video_frames_spread(daemon, key, files, red_video):
    url = files.add("red.mp4", red_video)
    r = daemon.call("POST", "/v1/moderate/video", {"inputUrl": url, "maxFrames": 4}, key=key)
    assert r.status == 200, r.body
    assert r.data["inputType"] == "video" and r.data["framesAnalyzed"] == 4


def test_green_image_is_sports(daemon, key, files):
    url = files.add("green.png", image((0, 200, 0), "PNG"))
    r = daemon.call("POST", "/v1/categorize/image", {"inputUrl": url, "topK": 3}, key=key)
    assert r.status == 200, r.body
    job = r.data
    assert job["primaryCategory"] == "Sports" and len(job["categories"]) <= 3
    assert abs(sum(job["scores"].values()) - 1) < 0.01


def test_stored_jobs_belong_to_their_project(daemon, key, files):
    url = files.add("stored.png", image((128, 128, 128), "PNG"))
    job = daemon.call("POST", "/v1/moderate/image", {"inputUrl": url}, key=key).data
    assert job["tokens"] > 0
    got = daemon.call("GET", f"/v1/moderate/jobs/{job['id']}", key=key)
    assert got.status == 200 and got.data == job
    listed = daemon.call("GET", "/v1/moderate/jobs?status=COMPLETED&pageSize=100", key=key).data
    assert job["id"] in [j["id"] for j in listed["items"]] and listed["pageSize"] == 100
    cat = daemon.call("POST", "/v1/categorize/image", {"inputUrl": url}, key=key).data
    assert daemon.call("GET", f"/v1/categorize/jobs/{cat['id']}", key=key).data["id"] == cat["id"]
    assert daemon.call("GET", f"/v1/moderate/jobs/{cat['id']}", key=key).status == 404
    other = daemon.create_key("someone-else")
    assert daemon.call("GET", f"/v1/moderate/jobs/{job['id']}", key=other).status == 404
    assert daemon.call("GET", f"/v1/categorize/jobs/{cat['id']}", key=other).status == 404
    assert daemon.call("GET", "/v1/moderate/jobs", key=other).data["total"] == 0


def test_events_are_signed_and_delivered(daemon, files):
    key = daemon.create_key("hooks")
    with Receiver() as receiver:
        put = daemon.call("PUT", "/v1/project/webhook", {"url": f"http://127.0.0.1:{receiver.port}/hook"}, key=key)
        assert put.status == 200, put.body
        project = put.data
        ok_job = daemon.call("POST", "/v1/moderate/image", {"inputUrl": files.add("ev.png", image((220, 0, 0), "PNG")),
                                                             "metadata": {"ref": "a"}}, key=key).data
        bad = daemon.call("POST", "/v1/categorize/image", {"inputUrl": files.add("ev.txt", b"text " * 40)}, key=key)
        assert bad.status == 400
        wanted = {"moderation.started", "moderation.completed", "categorization.started", "categorization.failed"}
        daemon.wait_for(lambda: wanted <= {r.event for r in receiver.unique_by_id()}, 15, "standalone events")
        bodies = {body["event"]: body for _, body in receiver.verified(project["webhook"]["secret"])}
    done = bodies["moderation.completed"]
    assert done["data"]["jobId"] == ok_job["id"] and done["data"]["safe"] is False and done["metadata"] == {"ref": "a"}
    assert bodies["categorization.failed"]["data"]["status"] == "FAILED"
    assert bodies["categorization.failed"]["data"]["errorMessage"]


def test_a_key_that_cannot_pay_gets_402(daemon, files):
    url = files.add("pay.png", image((128, 128, 128), "PNG"))
    poor = daemon.create_key("poor", balance=1)  # less than one image's tokens
    r = daemon.call("POST", "/v1/moderate/image", {"inputUrl": url}, key=poor)
    assert r.status == 402, r.body
    failed = daemon.call("GET", "/v1/moderate/jobs?status=FAILED", key=poor).data["items"]
    assert len(failed) == 1 and "balance" in failed[0]["errorMessage"]
    empty = daemon.create_key("empty", balance=0)
    assert daemon.call("POST", "/v1/moderate/image", {"inputUrl": url}, key=empty).status == 402


def test_a_redirect_to_a_refused_address_is_not_followed(daemon, key, files):
    with FileServer("127.0.0.2") as refused:
        target = refused.add("r.png", image((220, 0, 0), "PNG"))
        r = daemon.call("POST", "/v1/moderate/image", {"inputUrl": files.url(f"/to?url={target}")}, key=key)
        assert r.status == 422, r.body
        assert refused.hits == 0


# --- decoding, without the daemon ----------------------------------------------------------

def test_spread_takes_the_middle_of_each_share():
    from streamguard.media.stills import spread
    assert spread(4, 8) == [0, 1, 2, 3]
    assert spread(100, 4) == [12, 37, 62, 87]


def test_exif_orientation_and_alpha():
    from streamguard.media.stills import image_crops
    # left half red, right half blue; EXIF orientation 6 (rotate 90° clockwise to display)
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    crop = image_crops(buf.getvalue(), 32, max_frames=1, max_pixels=10**6)[0]
    assert crop[4, 16, 0] > 200 and crop[28, 16, 2] > 200  # red on top, blue below once rotated
    clear = io.BytesIO()
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(clear, format="PNG")
    grey = image_crops(clear.getvalue(), 32, max_frames=1, max_pixels=10**6)[0]
    assert abs(int(grey[16, 16, 0]) - 128) <= 2 and abs(int(grey[16, 16, 1]) - 128) <= 2


def test_video_frames_at_spread_times(red_video):
    from streamguard.inputs.sniff import probe_video
    from streamguard.media.stills import video_crops
    duration = probe_video(red_video).duration
    times = [t for t, _ in video_crops(red_video, 32, max_frames=4)]
    # each frame's own time: at or just after its target (one frame interval at most)
    assert times == pytest.approx([duration * (i + 0.5) / 4 for i in range(4)], abs=0.05)

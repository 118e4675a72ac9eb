"""Logo detection (issue 12, CONTRACT §3, §6): the test bundle's planted blue
behaviour found by the real region proposals, scoring, NMS and box fusion, in
`scan --logos`, file jobs and live tasks over the same media, and the
per-project gallery (CRUD, isolation, bad images) on a real daemon."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import live_servers as ls
from daemon import Daemon
from http_files import FileServer
from videos import make_video, pattern_frame

W, H, FPS, SECONDS = 1280, 720, 5, 15
# (x, y, side, seconds [from, to)) of each square, in frame pixels
BLUE_A = (900, 400, 200, (5, 10))   # bottom right, not centred
BLUE_B = (160, 80, 200, (10, 15))   # top left, another time
GREEN = (40, 260, 400, (5, 10))      # a big green square (the second gallery logo) next to BLUE_A
RED = (1, 3)                         # seconds of full saturated red
TOL = 0.05


def _frame(i: int) -> np.ndarray:
    t = i / FPS
    if RED[0] <= t < RED[1]:
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 0] = 255
        return img
    img = pattern_frame(i, W, H, False)
    for (x, y, side, (lo, hi)), colour in ((BLUE_A, (0, 0, 255)), (BLUE_B, (0, 0, 255)), (GREEN, (0, 255, 0))):
        if lo <= t < hi:
            img[y:y + side, x:x + side] = colour
    return img


def make_logo_video(path: Path) -> Path:
    """15 s of 1280x720 at 5 fps with a tone, a keyframe every second (clean
    5 s cuts), no B-frames (live-friendly: the live test publishes it)."""
    return make_video(path, seconds=SECONDS, fps=FPS, width=W, height=H, gop=FPS, bframes=0, frames=_frame)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (240, 160), alpha: bool = False) -> bytes:
    img = Image.new("RGBA" if alpha else "RGB", size, colour + ((255,) if alpha else ()))
    if alpha:  # a transparent border around the mark, like a real logo file
        img.paste((0, 0, 0, 0), (0, 0, size[0], size[1] // 8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("logos")
    (d / "blue.png").write_bytes(png((10, 20, 230), alpha=True))
    (d / "green.png").write_bytes(png((0, 230, 0), (200, 200)))
    return {"video": make_logo_video(d / "logos.mp4"), "blue": d / "blue.png", "green": d / "green.png", "dir": d}


def truth(square: tuple) -> dict[str, float]:
    x, y, side, _ = square
    return {"x": x / W, "y": y / H, "width": side / W, "height": side / H}


def assert_box(box: dict, square: tuple, tol: float = TOL) -> None:
    want = truth(square)
    assert all(abs(box[k] - want[k]) <= tol for k in want), (box, want)


def assert_on_green(box: dict) -> None:
    """Green is the test bundle's Sports behaviour, all or nothing rather than
    graded like blue: its box is only as fine as the regions wholly inside
    it, so only its place is checked."""
    gx, gy, side, _ = GREEN
    cx, cy = (box["x"] + box["width"] / 2) * W, (box["y"] + box["height"] / 2) * H
    assert gx <= cx <= gx + side and gy <= cy <= gy + side, box


def logos_of(record: dict) -> list[dict]:
    return record["data"]["data"]["logo_detection"]["logos"]


def by_name(record: dict) -> dict[str, dict]:
    return {hit["name"]: hit for hit in logos_of(record)}


def same_detections(a: list[dict], b: list[dict], tol: float = 0.01) -> None:
    """Two runs over the same media: the same logos per segment, the same boxes (logo ids may differ)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        ha, hb = by_name(ra), by_name(rb)
        assert ha.keys() == hb.keys(), (ra, rb)
        for name in ha:
            assert all(abs(ha[name]["bbox"][k] - hb[name]["bbox"][k]) <= tol for k in ha[name]["bbox"]), (ha, hb)
            assert ha[name]["time"] == hb[name]["time"] and ha[name]["frame_index"] == hb[name]["frame_index"]


@pytest.fixture(scope="module")
def scanned(media, test_bundle, tmp_path_factory):
    """scan --logos over the test video: Blue alone, then Blue and Green."""
    from conftest import run_cli
    out = {}
    for label, logos in (("blue", [f"Blue={media['blue']}"]),
                         ("both", [f"Blue={media['blue']}", f"Green={media['green']}"])):
        args = ["scan", media["video"], "--logos", "--moderate", "--model", test_bundle,
                "--data-dir", tmp_path_factory.mktemp("scan"), "--out", tmp_path_factory.mktemp("out")]
        for logo in logos:
            args += ["--logo", logo]
        res = run_cli(*args, timeout=240)
        assert res.returncode == 0, res.stderr
        out[label] = res.records
    return out


def test_blue_square_found_where_and_when_it_is(scanned):
    records = scanned["blue"]
    assert [r["data"]["data"]["start_time"] for r in records] == ["0.000", "5.000", "10.000"]
    red, first, second = records
    # a red stretch (and the moving pattern) matches no logo
    assert logos_of(red) == [] and red["data"]["data"]["logo_detection"]["has_logo"] is False
    assert red["data"]["data"]["content_moderation"]["has_unsafe_content"] is True  # it really was red
    (a,) = logos_of(first)
    assert a["name"] == "Blue" and a["logo_id"].startswith("logo_") and a["confidence"] >= 0.5
    assert_box(a["bbox"], BLUE_A)
    assert 5.0 <= float(a["time"]) < 10.0 and 0 <= a["frame_index"] < 5
    (b,) = logos_of(second)
    assert b["logo_id"] == a["logo_id"]
    assert_box(b["bbox"], BLUE_B)
    assert float(b["time"]) >= 10.0
    for r in records:
        assert r["data"]["data"]["logo_detection"]["frames_processed"] == 5


def test_region_passes_are_billed_and_bounded(scanned):
    for r in scanned["blue"]:
        tokens = r["data"]["token"]
        passes = tokens["video_tokens"] // 50
        frames = r["data"]["data"]["logo_detection"]["frames_processed"]
        # the coarse pass's 17 regions at least (a frame's own pass may be a reused one),
        # at most 32 passes per sampled frame in all
        assert frames * 17 <= passes <= frames * 32, tokens


def test_two_gallery_logos_only_the_present_one(scanned):
    red, first, second = scanned["both"]
    assert logos_of(red) == []
    assert set(by_name(first)) == {"Blue", "Green"}  # both squares are in 5-10 s
    assert_box(by_name(first)["Blue"]["bbox"], BLUE_A)
    assert_on_green(by_name(first)["Green"]["bbox"])
    assert set(by_name(second)) == {"Blue"}  # only Blue in 10-15 s
    assert_box(by_name(second)["Blue"]["bbox"], BLUE_B)
    confidences = [hit["confidence"] for hit in logos_of(first)]
    assert confidences == sorted(confidences, reverse=True)


def test_scan_logo_arguments_are_checked(media, test_bundle, tmp_path, cli):
    bad = cli("scan", media["video"], "--logos", "--logo", "NoImage", "--model", test_bundle, "--data-dir", tmp_path)
    assert bad.returncode == 2 and "NAME=IMAGE" in bad.stderr
    (tmp_path / "notes.txt").write_text("not an image\n")
    res = cli("scan", media["video"], "--logos", "--logo", f"X={tmp_path / 'notes.txt'}", "--model", test_bundle,
              "--data-dir", tmp_path)
    assert res.returncode == 1 and "--logo X=" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # --logos with an empty gallery: the records say so, and no region is run (or billed)
    res = cli("scan", media["video"], "--logos", "--model", test_bundle, "--data-dir", tmp_path, "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    for r in res.records:
        assert r["data"]["data"]["logo_detection"] == {"has_logo": False, "logos": [], "frames_processed": 5}
        assert r["data"]["token"]["video_tokens"] <= 5 * 50


# --- the gallery and the daemon ------------------------------------------------------------------------

def multipart(fields: dict[str, str], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "sgtest" + os.urandom(8).hex()
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{n}"\r\n'
              f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n" for n, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def add_logo(d: Daemon, key: str, name: str, *images: bytes):
    body, ctype = multipart({"name": name}, [(f"img{i}.png", data) for i, data in enumerate(images)])
    return d.call("POST", "/v1/logos", raw=body, content_type=ctype, key=key)


@pytest.fixture(scope="module")
def files():
    with FileServer() as server:
        yield server


@pytest.fixture(scope="module")
def daemon(test_bundle, tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("logod"), test_bundle,
                env={"STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "10"}) as d:
        yield d


def test_gallery_crud_isolation_and_bad_images(daemon, files, media):
    key, other = daemon.create_key("logos-a"), daemon.create_key("logos-b")
    r = add_logo(daemon, key, "Acme", media["blue"].read_bytes(), png((0, 0, 250), (64, 64)))
    assert r.status == 201, r.body
    logo = r.data
    assert logo["name"] == "Acme" and logo["id"].startswith("logo_") and len(logo["images"]) == 2
    # the same name adds to that logo (by URL, JSON)
    r = daemon.call("POST", "/v1/logos", {"name": "Acme", "inputUrl": files.add("b.png", png((0, 0, 240)))}, key=key)
    assert r.status == 201 and r.data["id"] == logo["id"] and len(r.data["images"]) == 3, r.body
    assert daemon.call("GET", f"/v1/logos/{logo['id']}", key=key).data["images"] == r.data["images"]
    listed = daemon.call("GET", "/v1/logos", key=key).data
    assert listed["total"] == 1 and listed["items"][0]["id"] == logo["id"]
    # another project sees none of it
    assert daemon.call("GET", f"/v1/logos/{logo['id']}", key=other).status == 404
    assert daemon.call("DELETE", f"/v1/logos/{logo['id']}", key=other).status == 404
    assert daemon.call("GET", "/v1/logos", key=other).data["total"] == 0
    # bad input: 400 in the one envelope, nothing stored
    for bad in (add_logo(daemon, key, "Bad", b"hello, not an image\n" * 5),
                add_logo(daemon, key, "Bad", png((0, 0, 255))[:100]),
                daemon.call("POST", "/v1/logos", {"name": "Bad", "inputUrl": files.add("t.txt", b"text " * 40)},
                            key=key),
                daemon.call("POST", "/v1/logos", {"name": "", "inputUrl": "http://127.0.0.1/x.png"}, key=key),
                daemon.call("POST", "/v1/logos", {"inputUrl": "http://127.0.0.1/x.png"}, key=key)):
        assert bad.status == 400 and bad.error["code"] == "STREAMGUARD_INPUT_INVALID", bad.body
    r = daemon.call("POST", "/v1/logos", {"name": "Gone", "inputUrl": files.url("/status/404")}, key=key)
    assert r.status == 502 and r.error["code"] == "STREAMGUARD_INPUT_UNREACHABLE", r.body
    assert daemon.call("GET", "/v1/logos", key=key).data["total"] == 1
    stored = list((daemon.data_dir / "logos").rglob("*.png"))
    assert len(stored) == 3  # the reference images are kept (embeddings recomputed for another model)
    assert daemon.call("DELETE", f"/v1/logos/{logo['id']}", key=key).status == 204
    assert daemon.call("GET", f"/v1/logos/{logo['id']}", key=key).status == 404
    assert not list((daemon.data_dir / "logos").rglob("*.png"))


def wait_job(d: Daemon, key: str, job_id: str, timeout: float = 120) -> dict:
    return d.wait_for(lambda: (lambda j: j if j["status"] in ("COMPLETED", "FAILED") else None)(
        d.call("GET", f"/v1/jobs/{job_id}", key=key).data), timeout, f"job {job_id}")


def test_file_job_and_live_task_agree_with_scan(daemon, files, media, scanned, rtmp):
    key = daemon.create_key("logos-run", balance=10_000_000)
    for name in ("blue", "green"):
        assert add_logo(daemon, key, name.capitalize(), media[name].read_bytes()).status == 201
    # a live task on the same media (looped by the publisher), then file jobs on it
    with ls.Publisher(media["video"], rtmp.url("logos")):
        r = daemon.call("POST", "/v1/streams", {"url": rtmp.url("logos"), "enable_logo_detection": True}, key=key)
        assert r.status == 200, r.body
        task = r.data["task_id"]
        daemon.wait_for(lambda: len([r for r in daemon.records(task, key) if r["data"]["status"] == 0]) >= 4,
                        90, "four live records")
        daemon.call("POST", f"/v1/streams/{task}/stop", key=key)
    url = files.add("logos.mp4", media["video"].read_bytes())
    jobs = {}
    for max_logos in (5, 1):
        r = daemon.call("POST", "/v1/jobs", {"inputUrl": url, "outputFormats": ["source"], "detectLogos": True,
                                             "maxLogos": max_logos}, key=key)
        assert r.status == 201, r.body
        jobs[max_logos] = r.data["id"]
    done = {m: wait_job(daemon, key, j) for m, j in jobs.items()}
    # the job: the same detections as scan, and a summary over the whole job
    job = done[5]
    assert job["status"] == "COMPLETED", job
    records = daemon.call("GET", f"/v1/jobs/{jobs[5]}/records?after=-1", key=key).data["items"]
    same_detections(records, scanned["both"])
    summary = job["logoDetection"]
    assert summary["hasLogo"] is True and summary["framesAnalyzed"] == 15
    hits = {h["name"]: h for h in summary["logos"]}
    assert set(hits) == {"Blue", "Green"} and hits["Blue"]["segments"] == 2 and hits["Green"]["segments"] == 1
    assert hits["Blue"]["segmentIndex"] == 1 and 5 <= hits["Blue"]["frameIndex"] < 10
    # maxLogos 1 keeps the best of each segment
    one = daemon.call("GET", f"/v1/jobs/{jobs[1]}/records?after=-1", key=key).data["items"]
    for full, capped in zip(records, one):
        assert logos_of(capped) == logos_of(full)[:1]
    assert len(done[1]["logoDetection"]["logos"]) == 1
    # live: every detection is one of the squares; a blue one with the box scan found for it
    live = [r for r in daemon.records(task, key) if r["data"]["status"] == 0]
    seen = [hit for r in live for hit in logos_of(r)]
    assert {hit["name"] for hit in seen} == {"Blue", "Green"}, live
    scan_blue = [h["bbox"] for r in scanned["both"] for h in logos_of(r) if h["name"] == "Blue"]
    for hit in seen:
        if hit["name"] == "Green":
            assert_on_green(hit["bbox"])
        else:
            assert any(all(abs(hit["bbox"][k] - box[k]) <= 0.02 for k in box) for box in scan_blue), (hit, scan_blue)
    # metrics: regions counted, regions per frame shown
    text = daemon.call("GET", "/metrics").body.decode()
    regions = [line for line in text.splitlines() if line.startswith("streamguard_logo_regions_")]
    assert any(line.startswith("streamguard_logo_regions_total") and float(line.split()[-1]) > 0 for line in regions)
    per_frame = next(float(line.split()[-1]) for line in regions if line.startswith("streamguard_logo_regions_per_frame"))
    assert 0 < per_frame <= 31


def test_region_geometry():
    """The coarse pass covers the whole frame, its middle square is exactly the
    frame's own CLIP crop (whose embedding it reuses), and the budget holds."""
    from streamguard.analysis.logos import coarse_regions, refine_regions
    from streamguard.config import LogoSettings
    from streamguard.media.scaler import crop_plan

    for width, height in ((1280, 720), (720, 1280), (640, 480), (500, 500)):
        regions, centre = coarse_regions(width, height, LogoSettings().coarse_stride)
        x, y, w, h = crop_plan(width, height, 224).source
        c = regions[centre]
        # (to a source pixel: CLIP's resize truncates the longer side, which can move its crop by one)
        assert abs(c.x - x) <= 1 and abs(c.y - y) <= 1 and abs(c.side - w) <= 1 and abs(w - h) <= 1
        covered = np.zeros((height, width), bool)
        for r in regions:
            assert 0 <= r.x and 0 <= r.y and r.x + r.side <= width + 1e-6 and r.y + r.side <= height + 1e-6
            covered[round(r.y):round(r.y + r.side), round(r.x):round(r.x + r.side)] = True
        assert covered.all()
        refine = refine_regions(regions[-1], width, height, LogoSettings().refine_steps)
        assert len(regions) - 1 + len(refine) <= 31  # + the frame itself: <= 32 passes
    assert len(coarse_regions(1280, 720, 0.75)[0]) == 18  # 3 full-height squares + 5 x 3 half-side ones

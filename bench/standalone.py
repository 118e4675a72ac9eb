"""Standalone moderation throughput: images/s through POST /v1/moderate/images
(20 images per call, 8 concurrent clients, 640x480 JPEGs served over HTTP on
loopback) against the same images decoded, cropped and pushed straight
through the batcher in this process, in the same run. Prints the ratio
(target >= 0.8).

    python bench/standalone.py                    # the test bundle
    python bench/standalone.py --bundle shape-real   # the shape-real ViT-B/32 (bench/shape_real.py)
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon import Daemon  # noqa: E402
from http_files import FileServer  # noqa: E402
from streamguard.analysis.analyzer import Analyzer  # noqa: E402
from streamguard.config import load_settings  # noqa: E402
from streamguard.media.stills import image_crops  # noqa: E402

PER_CALL = 20
CLIENTS = 8


def jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # smooth-ish content, upscaled
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def through_api(daemon: Daemon, key: str, urls: list[str], seconds: float) -> float:
    deadline = time.monotonic() + seconds
    done = [0]

    def client(n: int) -> None:
        i = n
        while time.monotonic() < deadline:
            batch = [urls[(i + k) % len(urls)] for k in range(PER_CALL)]
            r = daemon.call("POST", "/v1/moderate/images", {"inputUrls": batch}, key=key, timeout=120)
            assert r.status == 200, r.body
            done[0] += sum(1 for item in r.data["batchItems"] if item["errorMessage"] is None)
            i += PER_CALL

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        wait([pool.submit(client, n) for n in range(CLIENTS)])
    return done[0] / (time.monotonic() - t0)


def through_batcher(bundle: Path, data: list[bytes], seconds: float, data_dir: Path) -> float:
    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(data_dir)}})
    analyzer = Analyzer.create(settings, bundle)
    analyzer.prepare()
    deadline = time.monotonic() + seconds
    done = [0]

    def client(n: int) -> None:  # the same work minus HTTP, fetch and store: decode, crop, batch
        i = n
        while time.monotonic() < deadline:
            futures = []
            for k in range(PER_CALL):
                crops = image_crops(data[(i + k) % len(data)], analyzer.image_size, max_frames=8,
                                    max_pixels=settings.limits.max_image_pixels)
                futures += [analyzer.submit(c) for c in crops]
            wait(futures)
            done[0] += PER_CALL
            i += PER_CALL

    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            wait([pool.submit(client, n) for n in range(CLIENTS)])
        return done[0] / (time.monotonic() - t0)
    finally:
        analyzer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="test", help="test | shape-real | a bundle directory")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-standalone-") as tmp:
        tmp_path = Path(tmp)
        if args.bundle == "test":
            from streamguard.inference.testmodel import make_test_bundle
            bundle = tmp_path / "bundle"
            make_test_bundle(bundle)
        elif args.bundle == "shape-real":
            from shape_real import shape_real_bundle
            bundle = shape_real_bundle("fp32")
        else:
            bundle = Path(args.bundle)
        data = jpegs(args.images)
        with FileServer() as files:
            urls = [files.add(f"{i}.jpg", d) for i, d in enumerate(data)]
            (tmp_path / "daemon").mkdir()
            with Daemon(tmp_path / "daemon", bundle) as daemon:
                key = daemon.create_key("bench")
                api = through_api(daemon, key, urls, args.seconds)
        direct = through_batcher(bundle, data, args.seconds, tmp_path / "direct")
    print(f"bundle={args.bundle} images/s: api={api:.1f} batcher={direct:.1f} ratio={api / direct:.2f} "
          f"(target >= 0.8; {PER_CALL} images/call, {CLIENTS} clients, 640x480 JPEG)")


if __name__ == "__main__":
    main()

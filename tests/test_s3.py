"""S3-compatible media storage (CONTRACT §5, §8; issue 13), end to end against
a real S3 server: SeaweedFS `weed` on loopback (tests/s3_server.py), started
by the module's fixture, with real credentials (a wrong secret is refused)
and anonymous read (its HTTP endpoint serves the objects to ffprobe and to
hls.js in headless Chromium).

Covers: a job with s3Config -> every object of the tree in the bucket with
its Content-Type and Cache-Control, the master playlist playing from the
bucket in ffprobe and hls.js; a project default (PUT /v1/project/storage,
shown with secretKey "***", sealed in the database) with cdnUrl in every URL
(job, records, webhook); wrong secret / missing bucket / endpoint down ->
FAILED UPLOAD_FAILED naming which, with a signed video.conversion.failed;
the store killed for 10 s mid-upload -> retries, completes, nothing missing;
a live task on a node with storage.media = "s3" playing from the bucket while
running and after stop (every listed segment in the bucket); retention
deleting in the bucket; rotating the secrets key. Last, the secret strings
are looked for in every response body, daemon log and webhook of the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon import Daemon, Reply, free_port  # noqa: E402
from http_files import FileServer  # noqa: E402
from live_servers import publishing  # noqa: E402
from receivers import Receiver  # noqa: E402
from s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3  # noqa: E402
from test_hlsjs import _summary, chromium, hlsjs, play_in_hlsjs  # noqa: E402,F401  (fixtures and the player)
from test_jobs import files, get_job, hook, job_records, multipart, wait_status  # noqa: E402,F401  (fixtures too)
from videos import make_video  # noqa: E402

pytestmark = pytest.mark.timeout(180)

WRONG_SECRET = "sgWRONG-secret-9e8d7c6b5a"  # must not leak either
CDN = "https://cdn.example.test/vod"
RETRY_SECONDS = 20  # one object's retry budget: longer than the 10 s outage plus weed's restart (~3 s)
SEG = 2

# Every reply body and header the module's daemons sent, for the final leak check.
SEEN: list[str] = []


class RecordingDaemon(Daemon):
    def call(self, method: str, path: str, body: Any = None, *, key: str | None = None, **kw: Any) -> Reply:
        reply = super().call(method, path, body, key=key, **kw)
        SEEN.append(json.dumps(reply.body, default=str) if not isinstance(reply.body, bytes)
                    else reply.body.decode("latin-1"))
        SEEN.append(json.dumps(reply.headers))
        return reply


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedS3(tmp_path_factory.mktemp("weed")).up()
    yield server
    server.down()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path):
    env = {"STREAMGUARD_JOBS__CONCURRENCY": "3", "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true",
           "STREAMGUARD_STORAGE__S3__RETRY_SECONDS": str(RETRY_SECONDS), "STREAMGUARD_SERVER__ACCESS_LOG": "true"}
    with RecordingDaemon(tmp_path_factory.mktemp("s3-jobs"), test_bundle, env) as d:
        yield d


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 s of 640x360 with audio: 4 segments of 2 s, a 360p rung of the same size."""
    return make_video(tmp_path_factory.mktemp("s3-videos") / "clip.mp4", seconds=8, width=640, height=360)


@pytest.fixture(scope="module")
def clip_url(files: FileServer, clip_path: Path) -> str:
    return files.add("clip.mp4", clip_path)


def s3_config(s3: SeaweedS3, **over: Any) -> dict:
    return {"bucket": BUCKET, "endpoint": s3.endpoint, "region": "us-east-1", "accessKey": ACCESS_KEY,
            "secretKey": SECRET_KEY, **over}


def new_project(d: Daemon, name: str, hook: Receiver) -> tuple[str, str]:
    key = d.create_key(name)
    reply = d.call("PUT", "/v1/project/webhook", {"url": hook.url(f"/{name}")}, key=key)
    assert reply.status == 200, reply.body
    return key, reply.data["webhook"]["secret"]


def signed(hook: Receiver, secret: str, path: str, event: str, count: int = 1) -> list[dict]:
    """The verified bodies of `event` sent to `path`, once there are `count`."""
    def got() -> list[dict] | None:
        mine = [r for r in hook.snapshot() if r.path == path and r.event == event]
        return [b for _, b in hook.verified(secret, mine)] if len(mine) >= count else None
    return hook.wait_for(got, 30, f"{count} signed {event} at {path}")


def submit(d: Daemon, key: str, body: dict) -> dict:
    reply = d.call("POST", "/v1/jobs", body, key=key)
    assert reply.status == 201, reply.body
    return reply.data


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def ffprobe(url: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-show_format", "-show_streams", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def listed_tree(base_url: str) -> set[str]:
    """Every file the master playlist at base_url leads to (relative paths), fetched over HTTP."""
    status, _, master = fetch(f"{base_url}/master.m3u8")
    assert status == 200, (base_url, status)
    tree = {"master.m3u8"}
    for line in master.decode().splitlines():
        if line.endswith(".m3u8"):
            tree.add(line)
            folder = line.rsplit("/", 1)[0]
            status, _, playlist = fetch(f"{base_url}/{line}")
            assert status == 200, line
            tree |= {f"{folder}/{seg}" for seg in playlist.decode().splitlines() if seg.endswith(".ts")}
    return tree


def assert_plays_in_hlsjs(url: str, hlsjs: Path, chromium: str, workdir: Path, fragments: int,
                          duration: float) -> None:
    r = play_in_hlsjs(workdir, hlsjs, chromium, workdir, src=url)
    info = _summary(r)
    assert not r["page_errors"], info
    assert not [e for e in r["errors"] if e.get("fatal")], info
    assert r["video_error"] is None and r["manifest_parsed"], info
    assert set(r["buffer_codecs"] or {}) >= {"audio", "video"}, info
    buffered = {f["sn"] for f in r["frags_buffered"] if f["type"] == "main"}
    assert len(buffered) >= fragments, info
    assert r["duration"] is not None and abs(r["duration"] - duration) <= 0.5, info


# --------------------------------------------------------------------------- file jobs


def test_job_tree_in_the_bucket_plays_from_it(daemon: Daemon, s3: SeaweedS3, hook: Receiver, clip_url: str,
                                              hlsjs: Path, chromium: str, tmp_path: Path):
    key, secret = new_project(daemon, "s3-tree", hook)
    job = submit(daemon, key, {"inputUrl": clip_url, "outputFormats": ["source", "360p"], "segmentSeconds": SEG,
                               "moderate": True, "s3Config": s3_config(s3, prefix="videos/first/")})
    assert "secretKey" not in json.dumps(job) and SECRET_KEY not in json.dumps(job)
    done = wait_status(daemon, key, job["id"], ("COMPLETED", "FAILED"), timeout=120)
    assert done["status"] == "COMPLETED", done
    base = s3.url("videos/first")
    assert done["outputUrl"] == f"{base}/master.m3u8"
    assert done["thumbnailUrl"] == f"{base}/thumbnail.jpg"
    assert done["renditionUrls"] == {r: f"{base}/{r}/playlist.m3u8" for r in ("source", "360p")}

    # every object of the tree, nothing else, each with its type and caching
    tree = listed_tree(base)
    assert {p for p in tree if p.endswith(".ts")} == {f"{r}/segment_{i:03d}.ts" for r in ("source", "360p")
                                                       for i in range(4)}
    keys = s3.keys("videos/first/")
    assert keys == {f"videos/first/{p}" for p in tree | {"thumbnail.jpg"}}, keys
    client = s3.client()
    expect = {".m3u8": ("application/vnd.apple.mpegurl", "public, max-age=86400"),
              ".ts": ("video/mp2t", "public, max-age=31536000, immutable"),
              ".jpg": ("image/jpeg", "public, max-age=31536000, immutable")}
    for k in keys:
        head = client.head_object(Bucket=BUCKET, Key=k)
        assert (head["ContentType"], head.get("CacheControl")) == expect[Path(k).suffix], (k, head)
    # nothing of it stays on the node
    assert not (daemon.data_dir / "media" / job["id"]).exists()
    assert not (daemon.data_dir / "jobs" / job["id"]).exists()

    records = job_records(daemon, key, job["id"])
    assert [r["data"]["data"]["video_url"] for r in records] == [f"{base}/source/segment_{i:03d}.ts" for i in range(4)]

    probe = ffprobe(done["outputUrl"])
    assert abs(float(probe["format"]["duration"]) - 8.0) <= 0.5, probe["format"]
    assert {s["codec_type"] for s in probe["streams"]} >= {"video", "audio"}
    assert_plays_in_hlsjs(done["outputUrl"], hlsjs, chromium, tmp_path, fragments=4, duration=8.0)

    completed = signed(hook, secret, "/s3-tree", "video.conversion.completed")
    assert completed[0]["data"]["outputUrl"] == done["outputUrl"]


def test_project_default_with_cdn_url(daemon: Daemon, s3: SeaweedS3, hook: Receiver, clip_url: str,
                                      clip_path: Path):
    key, secret = new_project(daemon, "s3-default", hook)
    reply = daemon.call("PUT", "/v1/project/storage", s3_config(s3, prefix="defaults/", cdnUrl=CDN), key=key)
    assert reply.status == 200, reply.body
    storage = daemon.call("GET", "/v1/project", key=key).data["storage"]
    assert storage == {"bucket": BUCKET, "region": "us-east-1", "endpoint": s3.endpoint, "prefix": "defaults/",
                       "accessKey": ACCESS_KEY, "secretKey": "***", "cdnUrl": CDN}

    job = submit(daemon, key, {"inputUrl": clip_url, "outputFormats": ["source"], "segmentSeconds": SEG})
    done = wait_status(daemon, key, job["id"], ("COMPLETED", "FAILED"), timeout=90)
    assert done["status"] == "COMPLETED", done
    base = f"{CDN}/defaults/{job['id']}"
    assert done["outputUrl"] == f"{base}/master.m3u8" and done["thumbnailUrl"] == f"{base}/thumbnail.jpg"
    assert done["renditionUrls"] == {"source": f"{base}/source/playlist.m3u8"}
    urls = [r["data"]["data"]["video_url"] for r in job_records(daemon, key, job["id"])]
    assert urls and all(u.startswith(f"{base}/source/segment_") for u in urls), urls
    # the tree is in the bucket under the default's prefix, in the job's own folder
    assert f"defaults/{job['id']}/master.m3u8" in s3.keys(f"defaults/{job['id']}/")
    assert listed_tree(s3.url(f"defaults/{job['id']}"))  # and plays from there, every listed object present
    events = signed(hook, secret, "/s3-default", "video.conversion.completed")
    assert events[0]["data"]["outputUrl"] == f"{base}/master.m3u8"
    segments = [r.json for r in hook.snapshot() if r.path == "/s3-default" and r.event == "stream.segment"]
    assert segments and all(s["data"]["data"]["video_url"].startswith(base) for s in segments)

    # a request's own s3Config wins over the default
    own = submit(daemon, key, {"inputUrl": clip_url, "outputFormats": ["source"], "segmentSeconds": SEG,
                               "s3Config": s3_config(s3, prefix="own/")})
    assert wait_status(daemon, key, own["id"], ("COMPLETED", "FAILED"), timeout=90)["outputUrl"] == \
        s3.url("own/master.m3u8")

    # POST /v1/jobs/upload takes s3Config as a JSON form value
    body, ctype = multipart({"outputFormats": '["source"]', "segmentSeconds": str(SEG),
                             "s3Config": json.dumps(s3_config(s3, prefix="uploaded/"))},
                            "clip.mp4", clip_path.read_bytes())
    reply = daemon.call("POST", "/v1/jobs/upload", raw=body, content_type=ctype, key=key)
    assert reply.status == 201, reply.body
    assert wait_status(daemon, key, reply.data["id"], ("COMPLETED", "FAILED"), timeout=90)["outputUrl"] == \
        s3.url("uploaded/master.m3u8")

    # at rest: the database holds the secret sealed, never in clear
    db = b"".join(p.read_bytes() for p in daemon.data_dir.glob("streamguard.db*"))
    assert SECRET_KEY.encode() not in db and b"fernet:" in db
    # removing the default: jobs are served from /media again
    assert daemon.call("DELETE", "/v1/project/storage", key=key).data["storage"] is None


def test_upload_failures_say_which(daemon: Daemon, s3: SeaweedS3, hook: Receiver, clip_url: str):
    key, secret = new_project(daemon, "s3-failures", hook)
    down = f"http://127.0.0.1:{free_port()}"
    cases = {"credentials": s3_config(s3, secretKey=WRONG_SECRET),
             "bucket": s3_config(s3, bucket="no-such-bucket"),
             "endpoint": s3_config(s3, endpoint=down)}
    jobs = {why: submit(daemon, key, {"inputUrl": clip_url, "outputFormats": ["source"], "segmentSeconds": SEG,
                                      "s3Config": cfg})["id"] for why, cfg in cases.items()}
    ended = {why: wait_status(daemon, key, job_id, ("COMPLETED", "FAILED"), timeout=RETRY_SECONDS + 60)
             for why, job_id in jobs.items()}
    for why, job in ended.items():
        assert job["status"] == "FAILED" and job["errorCode"] == "UPLOAD_FAILED", job
        assert job["outputUrl"] is None
    assert "refused the credentials" in ended["credentials"]["errorMessage"], ended["credentials"]
    assert "accessKey and secretKey" in ended["credentials"]["errorMessage"]
    assert ended["bucket"]["errorMessage"] == f"bucket 'no-such-bucket' does not exist at {s3.endpoint}"
    assert ended["endpoint"]["errorMessage"].startswith(f"the S3 endpoint {down} is unreachable"), ended["endpoint"]
    failed = signed(hook, secret, "/s3-failures", "video.conversion.failed", count=3)
    assert {b["data"]["jobId"]: b["data"]["errorCode"] for b in failed} == {j: "UPLOAD_FAILED" for j in jobs.values()}


def test_store_away_for_10_s_mid_upload(daemon: Daemon, s3: SeaweedS3, hook: Receiver, files: FileServer,
                                        tmp_path: Path):
    """weed killed once the job's first objects are in the bucket (segments go
    up as they close), back 10 s later on the same ports and data: the
    uploads retry, the job completes, every listed object is there."""
    key, _ = new_project(daemon, "s3-outage", hook)
    url = files.add("outage.mp4", make_video(tmp_path / "outage.mp4", seconds=12, width=640, height=360))
    job = submit(daemon, key, {"inputUrl": url, "outputFormats": ["source", "360p"], "segmentSeconds": SEG,
                               "s3Config": s3_config(s3, prefix="outage/")})
    daemon.wait_for(lambda: any(k.endswith(".ts") for k in s3.keys("outage/")), 60, "the first segment uploaded",
                    interval=0.1)
    s3.down()
    try:
        time.sleep(10)
        assert get_job(daemon, key, job["id"])["status"] == "PROCESSING"
    finally:
        s3.up()
    done = wait_status(daemon, key, job["id"], ("COMPLETED", "FAILED"), timeout=RETRY_SECONDS + 90)
    assert done["status"] == "COMPLETED", done
    tree = listed_tree(s3.url("outage"))
    assert len([p for p in tree if p.endswith(".ts")]) == 12, tree
    assert "S3 upload of outage/" in daemon.log_path.read_text() and "retrying" in daemon.log_path.read_text()


# --------------------------------------------------------------------------- live tasks on an S3 node


@pytest.mark.live
def test_live_task_on_an_s3_node(s3: SeaweedS3, rtmp, test_bundle: Path, tmp_path: Path, hlsjs: Path,
                                 chromium: str):
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text(SECRET_KEY + "\n")
    env = {"STREAMGUARD_STORAGE__MEDIA": "s3", "STREAMGUARD_STORAGE__S3__ENDPOINT": s3.endpoint,
           "STREAMGUARD_STORAGE__S3__BUCKET": BUCKET, "STREAMGUARD_STORAGE__S3__PREFIX": "live/",
           "STREAMGUARD_STORAGE__S3__ACCESS_KEY": ACCESS_KEY,
           "STREAMGUARD_STORAGE__S3__SECRET_KEY_FILE": str(secret_file), "STREAMGUARD_SERVER__ACCESS_LOG": "true"}
    video = make_video(tmp_path / "live.mp4", seconds=6, fps=25, gop=25)
    with RecordingDaemon(tmp_path / "node", test_bundle, env) as d, publishing(video, rtmp, "s3-live") as (_, src):
        key = d.create_key("s3-live")
        reply = d.call("POST", "/v1/streams", {"url": src, "segment_seconds": SEG, "enable_content_moderation": True},
                       key=key)
        assert reply.status == 200, reply.body
        task = reply.body["data"]["task_id"]
        base = s3.url(f"live/{task}")
        d.wait_for(lambda: len(d.records(task, key)) >= 3, 60, "three records")
        state = d.call("GET", f"/v1/streams/{task}", key=key).data
        assert state["playlist_url"] == f"{base}/master.m3u8"
        # while running: each look at the bucket's playlists finds every object they list already
        # there (objects are only added while it runs: a later listing holds all an earlier playlist named)
        for _ in range(6):
            tree = listed_tree(base)
            assert [p for p in tree if p.endswith(".ts")], tree
            missing = {f"live/{task}/{p}" for p in tree} - s3.keys(f"live/{task}/")
            assert not missing, missing
            time.sleep(0.5)
        status, headers, _ = fetch(f"{base}/source/playlist.m3u8")
        assert status == 200 and headers.get("Cache-Control") == "public, max-age=1", headers
        status, headers, _ = fetch(f"{base}/source/segment_000.ts")
        assert headers.get("Content-Type") == "video/mp2t", headers
        assert float(ffprobe(f"{base}/master.m3u8")["format"].get("duration") or 0) >= 0  # opens and reads
        urls = [r["data"]["data"]["video_url"] for r in d.records(task, key)]
        assert all(u.startswith(f"{base}/source/segment_") for u in urls), urls

        assert d.call("POST", f"/v1/streams/{task}/stop", key=key).status == 200
        ended = d.wait_for(lambda: b"#EXT-X-ENDLIST" in fetch(f"{base}/source/playlist.m3u8")[2], 30,
                           "the ended playlist in the bucket")
        assert ended
        tree = listed_tree(base)
        segments = [p for p in tree if p.endswith(".ts")]
        stored = [r for r in d.records(task, key) if r["data"]["status"] == 0]
        assert len(segments) == len(stored), (segments, len(stored))
        assert s3.keys(f"live/{task}/") >= {f"live/{task}/{p}" for p in tree}
        duration = float(ffprobe(f"{base}/master.m3u8")["format"]["duration"])
    assert_plays_in_hlsjs(f"{base}/master.m3u8", hlsjs, chromium, tmp_path, fragments=len(segments),
                          duration=duration)
    SEEN.append((tmp_path / "node" / "daemon.log").read_text(errors="replace"))


def test_retention_deletes_in_the_bucket(s3: SeaweedS3, tmp_path: Path):
    """media/retention.py on an S3 node: what it deletes on disk goes from the bucket too."""
    import os

    from streamguard.media.retention import DiskSpace, MediaRetention
    from streamguard.media.s3 import S3Storage
    from streamguard.media.storage import S3Target, upload_tree

    storage = S3Storage(S3Target(bucket=BUCKET, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                                 endpoint=s3.endpoint, prefix="retention/"), retry_seconds=5)
    root = tmp_path / "media"
    old = time.time() - 7200
    for task, listed_from in (("running", 2), ("stopped", 0)):
        folder = root / task / "source"
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"segment_{i:03d}.ts").write_bytes(b"\x47" * 188)
        (folder / "playlist.m3u8").write_text("#EXTM3U\n" + "".join(f"#EXTINF:2.000,\nsegment_{i:03d}.ts\n"
                                                                      for i in range(listed_from, 4)))
        for p in [*(root / task).rglob("*"), root / task]:
            os.utime(p, (old, old))
        upload_tree(storage, root / task, task)
    retention = MediaRetention(root, 3600, DiskSpace(tmp_path, 0), mirror=storage)
    result = retention.sweep(["running"])
    assert result.files_deleted == 2 and result.dirs_deleted == 1
    assert s3.keys("retention/running/") == {f"retention/running/source/{n}" for n in
                                             ("segment_002.ts", "segment_003.ts", "playlist.m3u8")}
    assert s3.keys("retention/stopped/") == set()


def test_rotate_secret_key(tmp_path: Path):
    """Stored secrets are re-encrypted with a new key; the old key can then go."""
    import os

    from streamguard.config import load_settings
    from streamguard.schemas import S3Config
    from streamguard.secretbox import SecretBox, new_key
    from streamguard.services import outputs
    from streamguard.store import Store

    old, new = new_key(), new_key()
    store = Store(tmp_path / "streamguard.db")
    project = store.project_by_name("rot", create=True)
    config = S3Config(bucket=BUCKET, accessKey=ACCESS_KEY, secretKey=SECRET_KEY)
    store.set_project_storage(project.id, outputs.seal(SecretBox([old]), config))
    store.close()
    env = {**os.environ, "STREAMGUARD_SECURITY__SECRET_KEY": new,
           "STREAMGUARD_SECURITY__PREVIOUS_SECRET_KEYS": json.dumps([old])}
    out = subprocess.run([sys.executable, "-m", "streamguard", "keys", "rotate-secret-key", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "re-encrypted 1 stored secret" in out.stdout, out
    store = Store(tmp_path / "streamguard.db")
    stored = store.project(project.id).storage
    store.close()
    assert outputs.unseal(SecretBox([new]), stored).secretKey == SECRET_KEY
    with pytest.raises(Exception, match="cannot be decrypted"):
        outputs.unseal(SecretBox([old]), stored)
    assert SecretBox.from_settings(load_settings(environ={"STREAMGUARD_SECURITY__SECRET_KEY": new}))


def test_secrets_appear_nowhere(daemon: Daemon, hook: Receiver):
    """Last: no response body or header, daemon log line or webhook of this module holds a secret."""
    texts = SEEN + [daemon.log_path.read_text(errors="replace")] + \
        [r.body.decode("latin-1") + json.dumps(r.headers) for r in hook.snapshot()]
    assert len(texts) > 20 and hook.snapshot()
    for secret in (SECRET_KEY, WRONG_SECRET):
        leaks = [t[max(0, t.find(secret) - 200):t.find(secret) + 50] for t in texts if secret in t]
        assert not leaks, leaks

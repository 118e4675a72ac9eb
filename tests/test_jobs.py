"""File jobs end to end (CONTRACT §2 "File jobs", §3, §4): a real `streamguard
serve` daemon (tests/daemon.py) fetching inputs from a real HTTP server on
loopback (tests/http_files.py), with the generated test model, its callbacks
and webhooks received by real receivers and verified with a Standard Webhooks
library (tests/receivers.py).

Covers: submit by URL and by upload, the job object, per-segment records with
the red seconds flagged and the job summary, signed video.conversion.* events,
validation errors naming the field, cancel (PENDING 204, PROCESSING 409),
another project's job (404), list pagination and status filter, unreachable
and 404 inputs (FAILED DOWNLOAD_FAILED), a balance that runs out
(INSUFFICIENT_BALANCE), a non-video upload (400), an upload of 2 GiB + 1 byte
(413, streamed: the daemon's memory does not grow and no file is left), and
SIGKILL mid-job then a restart on the same data dir (the job completes once).

One daemon serves most tests (jobs.concurrency 1, so one job runs at a time);
each test uses its own project. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon import Daemon, free_port  # noqa: E402
from http_files import FileServer  # noqa: E402
from receivers import Receiver  # noqa: E402
from videos import make_video  # noqa: E402

from streamguard.store import Store  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ENV = {"STREAMGUARD_JOBS__CONCURRENCY": "1", "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true"}
SEG = 5  # segmentSeconds of the jobs here
TOKENS_PER_IMAGE = 50  # the test model's ViT-B/32 geometry
RED = (10, 15)  # red_video (conftest): 30 s, saturated red during seconds 10-15
JOB_FIELDS = {"id", "projectId", "status", "progress", "inputUrl", "outputFormats", "outputUrl", "thumbnailUrl",
              "renditionUrls", "durationSec", "segmentsCount", "moderation", "categorization", "logoDetection",
              "tokens", "metadata", "errorCode", "errorMessage", "createdAt", "startedAt", "completedAt"}
ENDED = ("COMPLETED", "FAILED", "CANCELLED")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files():
    with FileServer() as server:
        yield server


@pytest.fixture(scope="module")
def hook():
    with Receiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path):
    with Daemon(tmp_path_factory.mktemp("jobs-daemon"), test_bundle, ENV) as d:
        yield d


@pytest.fixture(scope="module")
def red_url(files: FileServer, red_video: Path) -> str:
    return files.add("red.mp4", red_video)


# --------------------------------------------------------------------------- helpers


def project(d: Daemon, name: str, balance: int | None = None) -> tuple[str, str]:
    """(key, webhook secret) of a new project."""
    key = d.create_key(name, balance)
    return key, d.call("GET", "/v1/project", key=key).data["webhook"]["secret"]


def submit(d: Daemon, key: str, body: dict, status: int = 201) -> dict:
    reply = d.call("POST", "/v1/jobs", body, key=key)
    assert reply.status == status, reply.body
    return reply.body["data"] if status == 201 else reply.error


def get_job(d: Daemon, key: str, job_id: str) -> dict:
    reply = d.call("GET", f"/v1/jobs/{job_id}", key=key)
    assert reply.status == 200, reply.body
    return reply.data


def wait_status(d: Daemon, key: str, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    return d.wait_for(lambda: (lambda j: j if j["status"] in statuses else None)(get_job(d, key, job_id)),
                      timeout, f"job {job_id} to reach {statuses}", interval=0.1)


def job_records(d: Daemon, key: str, job_id: str) -> list[dict]:
    reply = d.call("GET", f"/v1/jobs/{job_id}/records?limit=1000", key=key)
    assert reply.status == 200, reply.body
    return reply.data["items"]


def events_at(rx: Receiver, path: str) -> list:
    return [r for r in rx.snapshot() if r.path == path]


def multipart(fields: dict[str, str], file_name: str, content: bytes) -> tuple[bytes, str]:
    boundary = "sgtest" + os.urandom(8).hex()
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="{file_name}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(d: Daemon, key: str, fields: dict[str, str], file_name: str, content: bytes):
    body, ctype = multipart(fields, file_name, content)
    return d.call("POST", "/v1/jobs/upload", raw=body, content_type=ctype, key=key)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def new_folders(d: Daemon, before: set[str]) -> list[str]:
    """Job work folders (inputs, uploads, staging) that appeared since `before`
    (other tests' jobs may be running meanwhile)."""
    root = d.data_dir / "jobs"
    return sorted({p.name for p in root.iterdir()} - before) if root.exists() else []


def folders(d: Daemon) -> set[str]:
    return set(new_folders(d, set()))


# --------------------------------------------------------------------------- the happy path


def test_job_by_url_records_summary_media_and_signed_events(daemon: Daemon, hook: Receiver, red_url: str):
    key, secret = project(daemon, "jobs-happy")
    webhook = {"url": hook.url("/happy-project"), "events": ["video.conversion.started", "video.conversion.completed"]}
    assert daemon.call("PUT", "/v1/project/webhook", webhook, key=key).status == 200
    job = submit(daemon, key, {"inputUrl": red_url, "outputFormats": ["source"], "segmentSeconds": SEG,
                               "moderate": True, "metadata": {"userId": "u_42"},
                               "callbackUrl": hook.url("/happy")})
    assert set(job) == JOB_FIELDS
    assert job["status"] == "PENDING" and job["progress"] == 0 and job["inputUrl"] == red_url
    assert job["outputFormats"] == ["source"] and job["metadata"] == {"userId": "u_42"}
    assert job["outputUrl"] is None and job["startedAt"] is None and job["completedAt"] is None
    seen = []  # progress as polled: it only moves forward
    done = daemon.wait_for(lambda: (lambda j: seen.append(j["progress"]) or (j if j["status"] in ENDED else None))(
        get_job(daemon, key, job["id"])), 60, "the job to end", interval=0.05)
    assert done["status"] == "COMPLETED", done
    assert seen == sorted(seen) and done["progress"] == 1

    records = job_records(daemon, key, job["id"])
    assert [r["data"]["data"]["segment_index"] for r in records] == list(range(6))
    assert all(r["task_id"] == job["id"] and r["data"]["status"] == 0 for r in records)
    flagged = [r["data"]["data"]["segment_index"] for r in records
               if r["data"]["data"]["content_moderation"]["has_unsafe_content"]]
    assert flagged == [RED[0] // SEG]

    assert done["segmentsCount"] == 6 and done["durationSec"] == pytest.approx(30, abs=0.1)
    frames = sum(r["data"]["data"]["content_moderation"]["frames_processed"] for r in records)
    video_tokens = sum(r["data"]["token"]["video_tokens"] for r in records)
    assert done["tokens"] == {"input": video_tokens, "output": 0, "total": video_tokens,
                              "video_tokens": video_tokens, "text_tokens": 0}
    assert 0 < video_tokens <= frames * TOKENS_PER_IMAGE
    summary = done["moderation"]
    assert summary["safe"] is False and summary["framesAnalyzed"] == frames == 30
    assert [v["category"] for v in summary["violations"]] == ["violence"]
    assert summary["violations"][0]["severity"] == "high" and summary["scores"]["violence"] >= 0.9
    assert [f["frameIndex"] for f in summary["flaggedFrames"]] == list(range(RED[0], RED[1]))  # 1 frame a second
    assert {f["segmentIndex"] for f in summary["flaggedFrames"]} == {RED[0] // SEG}
    assert [f["time"] for f in summary["flaggedFrames"]] == pytest.approx(list(range(RED[0], RED[1])), abs=0.05)
    assert done["categorization"] is None and done["logoDetection"] is None
    assert done["errorCode"] is None and done["startedAt"] and done["completedAt"]

    # the media is in place once COMPLETED, and only then: every URL answers
    base = f"{daemon.base}/media/{job['id']}"
    assert done["outputUrl"] == f"{base}/master.m3u8" and done["thumbnailUrl"] == f"{base}/thumbnail.jpg"
    assert done["outputFormats"] == ["source"] and done["renditionUrls"] == {"source": f"{base}/source/playlist.m3u8"}
    for url in (done["outputUrl"], done["thumbnailUrl"], done["renditionUrls"]["source"],
                records[-1]["data"]["data"]["video_url"]):
        assert daemon.call("GET", urllib.parse.urlsplit(url).path).status == 200, url
    playlist = daemon.call("GET", urllib.parse.urlsplit(done["renditionUrls"]["source"]).path).body.decode()
    assert "#EXT-X-ENDLIST" in playlist and playlist.count("#EXTINF") == 6
    assert not files_under(daemon.data_dir / "jobs" / job["id"])  # input and staging gone

    # callback: started, the six records in order, completed; all signed
    names = ["video.conversion.started"] + ["stream.segment"] * 6 + ["video.conversion.completed"]
    hook.wait_for(lambda: len(events_at(hook, "/happy")) >= len(names), 20, "the job's events")
    got = hook.verified(secret, events_at(hook, "/happy"))
    assert [h["x-streamguard-event"] for h, _ in got] == names
    started, completed = got[0][1], got[-1][1]
    for body in (started, completed):
        assert body["projectId"] == done["projectId"] and body["metadata"] == {"userId": "u_42"}
        assert body["data"]["jobId"] == body["data"]["id"] == job["id"]
        assert set(body["data"]) == JOB_FIELDS | {"jobId"}
    assert started["data"]["status"] == "PROCESSING" and started["data"]["startedAt"]
    assert completed["data"] == {**done, "jobId": job["id"]}
    assert [b["data"]["data"]["segment_index"] for _, b in got[1:-1]] == list(range(6))
    # the project webhook gets the events it subscribed to, the same ones
    hook.wait_for(lambda: len(events_at(hook, "/happy-project")) >= 2, 20, "the webhook's events")
    project_events = hook.verified(secret, events_at(hook, "/happy-project"))
    assert [(h["webhook-id"], b) for h, b in project_events] == [(got[0][0]["webhook-id"], started),
                                                                 (got[-1][0]["webhook-id"], completed)]


def test_upload_runs_like_a_url_job(daemon: Daemon, red_video: Path):
    key, _ = project(daemon, "jobs-upload")
    reply = upload(daemon, key, {"outputFormats": '["360p", "720p"]', "ffmpegPreset": "ultrafast", "hlsTime": "10",
                                 "moderate": "true", "metadata": '{"via": "upload"}'}, "clip.bin",
                   red_video.read_bytes())
    assert reply.status == 201, reply.body
    job = reply.data
    assert job["status"] == "PENDING" and job["inputUrl"] is None and job["metadata"] == {"via": "upload"}
    assert job["outputFormats"] == ["360p", "720p"]  # asked for
    done = wait_status(daemon, key, job["id"], ENDED)
    assert done["status"] == "COMPLETED", done
    assert done["segmentsCount"] == 3 and done["moderation"]["safe"] is False  # hlsTime 10: 3 segments
    # a 320x240 input fills neither box: 720p is not produced, 360p is, at the source's size (never upscaled)
    assert done["outputFormats"] == ["360p"] and list(done["renditionUrls"]) == ["360p"]
    records = job_records(daemon, key, job["id"])
    assert all("/360p/segment_" in r["data"]["data"]["video_url"] for r in records)
    for url in [done["outputUrl"], done["renditionUrls"]["360p"]] + [r["data"]["data"]["video_url"] for r in records]:
        assert daemon.call("GET", urllib.parse.urlsplit(url).path).status == 200, url
    assert not files_under(daemon.data_dir / "jobs" / job["id"])  # the upload is gone once the job ended


def test_categorize_job_summarises_the_whole_job(daemon: Daemon, files: FileServer, tmp_path: Path):
    green = make_video(tmp_path / "green.mp4", seconds=4, green=((0.0, 4.0),), audio=False)
    key, _ = project(daemon, "jobs-categorize")
    job = submit(daemon, key, {"inputUrl": files.add("green.mp4", green), "outputFormats": ["source"],
                               "segmentSeconds": 2, "categorize": True})
    done = wait_status(daemon, key, job["id"], ENDED)
    assert done["status"] == "COMPLETED", done
    cat = done["categorization"]
    assert cat["primaryCategory"] == "Sports" and cat["confidence"] >= 0.5, cat
    assert cat["framesAnalyzed"] == 4 and abs(sum(cat["scores"].values()) - 1) < 0.01, cat
    assert cat["categories"][0] == {"name": "Sports", "confidence": cat["confidence"], "primary": True}
    assert done["moderation"] is None  # not asked for
    records = job_records(daemon, key, job["id"])
    assert all(r["data"]["data"]["categorization"]["primary_category"] == "Sports" for r in records), records


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("body, status, field", [
    ({"outputFormats": ["240p"]}, 400, "outputFormats"),
    ({"outputFormats": []}, 400, "outputFormats"),
    ({"outputFormats": ["source", "source"]}, 400, "outputFormats"),
    ({"segmentSeconds": 0}, 400, "segmentSeconds"),
    ({"segmentSeconds": 11}, 400, "segmentSeconds"),
    ({"hlsTime": 0}, 400, "hlsTime"),
    ({"segmentSeconds": 2, "hlsTime": 3}, 400, "hlsTime"),
    ({"ffmpegPreset": "placebo"}, 400, "ffmpegPreset"),
    ({"fps": 31}, 400, "fps"),
    ({"threshold": 2}, 400, "threshold"),
    ({"callbackUrl": "ftp://example.com/x"}, 400, "callbackUrl"),
    ({"inputUrl": "ftp://example.com/a.mp4"}, 400, "inputUrl"),
    ({"detectLogos": True}, 422, "detectLogos"),
    ({"s3Config": {"bucket": "b", "accessKey": "a", "secretKey": "s"}}, 400, "s3Config"),
    ({"s3Config": {"bucket": "media", "secretKey": "s"}}, 400, "s3Config"),
    ({"s3Config": {"bucket": "media", "accessKey": "a", "secretKey": "s", "cdnUrl": "ftp://x"}}, 400,
     "s3Config"),
])
def test_validation_errors_name_the_field(daemon: Daemon, body: dict, status: int, field: str):
    key, _ = project(daemon, "jobs-validation")
    error = submit(daemon, key, {"inputUrl": "http://127.0.0.1:9/a.mp4", **body}, status)
    assert error["details"]["field"] == field, error
    assert field in error["message"] or status == 422, error


def test_malformed_json_missing_input_and_form_errors(daemon: Daemon):
    key, _ = project(daemon, "jobs-malformed")
    before = folders(daemon)
    reply = daemon.call("POST", "/v1/jobs", raw=b'{"inputUrl": ', key=key)
    assert reply.status == 400 and reply.error["message"].startswith("malformed JSON"), reply.body
    assert submit(daemon, key, {"outputFormats": ["source"]}, 400)["message"] == "inputUrl is required"
    for fields, field in (({"outputFormats": '["240p"]'}, "outputFormats"),
                          ({"outputFormats": '["source"'}, "outputFormats"),
                          ({"segmentSeconds": "0"}, "segmentSeconds"),
                          ({"ffmpegPreset": "placebo"}, "ffmpegPreset")):
        reply = upload(daemon, key, fields, "x.mp4", b"\x00" * 1000)
        assert reply.status == 400 and reply.error["details"]["field"] == field, (fields, reply.body)
    assert new_folders(daemon, before) == []


def test_no_balance_is_402(daemon: Daemon, red_url: str):
    key, _ = project(daemon, "jobs-broke", balance=0)
    assert submit(daemon, key, {"inputUrl": red_url}, 402)["code"] == "STREAMGUARD_INSUFFICIENT_BALANCE"


def test_non_video_upload_is_400_and_leaves_nothing(daemon: Daemon):
    key, _ = project(daemon, "jobs-notvideo")
    before = folders(daemon)
    reply = upload(daemon, key, {"outputFormats": '["source"]'}, "movie.mp4", b"this is not a video\n" * 500)
    assert reply.status == 400 and reply.error["code"] == "STREAMGUARD_INPUT_INVALID", reply.body
    assert new_folders(daemon, before) == []
    assert daemon.call("GET", "/v1/jobs", key=key).data["total"] == 0


def _streamed_upload(base: str, key: str, file_bytes: int, *, chunked: bool) -> tuple[int, dict, int]:
    """POST a multipart body whose `video` part is `file_bytes` zero bytes,
    generated while it is sent (chunked: no Content-Length, so the daemon
    must count); (status, reply JSON, file bytes sent). A reader thread takes
    the reply as soon as it comes (the daemon answers before the body ends)."""
    boundary = "sgbig" + os.urandom(6).hex()
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
            f'Content-Type: video/mp4\r\n\r\n').encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    host, port = urllib.parse.urlsplit(base).hostname, urllib.parse.urlsplit(base).port
    framing = ("Transfer-Encoding: chunked" if chunked
               else f"Content-Length: {len(head) + file_bytes + len(tail)}")
    sock = socket.create_connection((host, port), timeout=60)

    def send(data: bytes) -> None:
        sock.sendall(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)

    sock.sendall((f"POST /v1/jobs/upload HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n").encode())
    reply = bytearray()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                reply.extend(chunk)
                headers, _, body = bytes(reply).partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in headers.split(b"\r\n")
                          if h.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    return
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    chunk, sent = bytes(1 << 20), 0
    try:
        send(head)
        while sent < file_bytes and reader.is_alive():
            n = min(len(chunk), file_bytes - sent)
            send(chunk[:n])
            sent += n
        if sent == file_bytes:
            send(tail)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except OSError:  # the daemon answered and closed while we were still sending: expected
        pass
    reader.join(30)
    sock.close()
    headers, _, body = bytes(reply).partition(b"\r\n\r\n")
    assert headers, "no reply"
    return int(headers.split()[1]), json.loads(body), sent


def test_upload_over_2gib_is_413_without_memory_growth_or_leftovers(daemon: Daemon):
    key, _ = project(daemon, "jobs-toolarge")
    assert daemon.proc is not None
    existing = folders(daemon)
    before = rss_kib(daemon.proc.pid)
    peak = [before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_kib(daemon.proc.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status, body, sent = _streamed_upload(daemon.base, key, (2 << 30) + 1, chunked=True)
    finally:
        stop.set()
        watcher.join(5)
    assert status == 413 and body["error"]["code"] == "STREAMGUARD_PAYLOAD_TOO_LARGE", body
    assert sent > 2 << 30  # refused once past the limit, not before: the daemon counted what it received
    # a declared Content-Length over the limit is refused before the body is read
    status, body, sent = _streamed_upload(daemon.base, key, (2 << 30) + 1, chunked=False)
    assert status == 413 and body["error"]["code"] == "STREAMGUARD_PAYLOAD_TOO_LARGE", body
    assert sent < 2 << 30
    assert peak[0] - before < 64 * 1024, f"RSS grew from {before} KiB to {peak[0]} KiB"
    daemon.wait_for(lambda: not new_folders(daemon, existing), 10, "the partial upload to be removed")
    assert daemon.call("GET", "/v1/jobs", key=key).data["total"] == 0


# --------------------------------------------------------------------------- failures


def test_unreachable_and_404_inputs_fail_with_download_failed(daemon: Daemon, hook: Receiver, files: FileServer):
    key, secret = project(daemon, "jobs-download")
    closed_port = free_port()  # nothing listens there
    jobs = [submit(daemon, key, {"inputUrl": url, "outputFormats": ["source"], "callbackUrl": hook.url(f"/dl{i}"),
                                 "metadata": {"case": i}})
            for i, url in enumerate((files.url("/status/404"), f"http://127.0.0.1:{closed_port}/a.mp4"))]
    for i, job in enumerate(jobs):
        done = wait_status(daemon, key, job["id"], ENDED, timeout=60)
        assert done["status"] == "FAILED" and done["errorCode"] == "DOWNLOAD_FAILED", done
        assert done["errorMessage"] and "Traceback" not in done["errorMessage"]
        assert done["outputUrl"] is None and done["completedAt"]
        hook.wait_for(lambda: len(events_at(hook, f"/dl{i}")) >= 2, 20, "started and failed events")
        got = hook.verified(secret, events_at(hook, f"/dl{i}"))
        assert [h["x-streamguard-event"] for h, _ in got] == ["video.conversion.started", "video.conversion.failed"]
        failed = got[1][1]
        assert failed["metadata"] == {"case": i} and failed["data"]["jobId"] == job["id"]
        assert failed["data"]["errorCode"] == "DOWNLOAD_FAILED" and failed["data"]["status"] == "FAILED"
        assert failed["data"]["errorMessage"] == done["errorMessage"]
    assert daemon.call("GET", f"/v1/jobs/{jobs[0]['id']}/records", key=key).data == {"items": [],
                                                                                     "next_after": None}


def test_balance_running_out_fails_the_job(daemon: Daemon, red_url: str):
    # 2 s segments on the video's 2 s GOPs: 2 frames at fps 1, each encoded (the test video never repeats one)
    per_segment = 2 * TOKENS_PER_IMAGE
    key, _ = project(daemon, "jobs-balance", balance=per_segment + per_segment // 2)
    job = submit(daemon, key, {"inputUrl": red_url, "outputFormats": ["source"], "segmentSeconds": 2,
                               "moderate": True})
    done = wait_status(daemon, key, job["id"], ENDED)
    assert done["status"] == "FAILED" and done["errorCode"] == "INSUFFICIENT_BALANCE", done
    assert [r["data"]["data"]["segment_index"] for r in job_records(daemon, key, job["id"])] == [0]
    assert done["tokens"]["total"] == per_segment and done["outputUrl"] is None
    assert daemon.call("GET", f"/media/{job['id']}/master.m3u8").status == 404  # a failed job publishes nothing


# --------------------------------------------------------------------------- queue, cancel, isolation, lists


def test_cancel_pending_is_204_processing_is_409(daemon: Daemon, files: FileServer, red_video: Path):
    key, _ = project(daemon, "jobs-cancel")
    size = red_video.stat().st_size
    # served slowly: the first job stays PROCESSING (downloading) for ~2 s; concurrency is 1
    slow = submit(daemon, key, {"inputUrl": files.url(f"/slow/red.mp4?bps={size // 2}"),
                                "outputFormats": ["source"]})
    queued = submit(daemon, key, {"inputUrl": files.url("/files/red.mp4"), "outputFormats": ["source"]})
    wait_status(daemon, key, slow["id"], ("PROCESSING",), timeout=30)
    assert get_job(daemon, key, queued["id"])["status"] == "PENDING"
    reply = daemon.call("DELETE", f"/v1/jobs/{queued['id']}", key=key)
    assert reply.status == 204 and reply.body == b"", reply.body
    assert get_job(daemon, key, queued["id"])["status"] == "CANCELLED"
    reply = daemon.call("DELETE", f"/v1/jobs/{slow['id']}", key=key)
    assert reply.status == 409 and reply.error["code"] == "STREAMGUARD_CONFLICT", reply.body
    assert reply.error["details"]["status"] == "PROCESSING"
    assert daemon.call("DELETE", f"/v1/jobs/{queued['id']}", key=key).status == 409  # CANCELLED stays so
    done = wait_status(daemon, key, slow["id"], ENDED)
    assert done["status"] == "COMPLETED", done
    assert done["moderation"] is None and done["tokens"]["total"] == 0  # moderate defaults to false
    assert get_job(daemon, key, queued["id"])["status"] == "CANCELLED"  # never ran
    assert job_records(daemon, key, queued["id"]) == []


def test_another_projects_job_is_404(daemon: Daemon, files: FileServer):
    owner, _ = project(daemon, "jobs-owner")
    other, _ = project(daemon, "jobs-other")
    job = submit(daemon, owner, {"inputUrl": files.url("/status/404"), "outputFormats": ["source"]})
    for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("DELETE", f"/v1/jobs/{job['id']}"),
                         ("GET", f"/v1/jobs/{job['id']}/records")):
        reply = daemon.call(method, path, key=other)
        assert reply.status == 404 and reply.error["code"] == "STREAMGUARD_NOT_FOUND", (method, path, reply.body)
    assert daemon.call("GET", "/v1/jobs", key=other).data["total"] == 0
    assert daemon.call("GET", "/v1/jobs/job_0000000000000000", key=owner).status == 404


def test_list_pagination_and_status_filter(daemon: Daemon, files: FileServer):
    key, _ = project(daemon, "jobs-list")
    ids = [submit(daemon, key, {"inputUrl": files.url(f"/status/{404 + i}"), "outputFormats": ["source"]})["id"]
           for i in range(3)]
    for job_id in ids:
        wait_status(daemon, key, job_id, ENDED)
    page1 = daemon.call("GET", "/v1/jobs?pageSize=2", key=key).data
    page2 = daemon.call("GET", "/v1/jobs?pageSize=2&page=2", key=key).data
    assert (page1["total"], page1["page"], page1["pageSize"], len(page1["items"])) == (3, 1, 2, 2)
    assert (page2["total"], page2["page"], len(page2["items"])) == (3, 2, 1)
    assert [j["id"] for j in page1["items"] + page2["items"]] == ids[::-1]  # newest first
    assert daemon.call("GET", "/v1/jobs?status=FAILED", key=key).data["total"] == 3
    assert daemon.call("GET", "/v1/jobs?status=COMPLETED", key=key).data == {"items": [], "total": 0, "page": 1,
                                                                             "pageSize": 20}
    for query, field in (("status=DONE", "status"), ("pageSize=101", "pageSize"), ("page=0", "page")):
        reply = daemon.call("GET", f"/v1/jobs?{query}", key=key)
        assert reply.status == 400 and reply.error["details"]["field"] == field, reply.body


# --------------------------------------------------------------------------- durability


def _stored_job(d: Daemon, job_id: str):
    store = Store(d.data_dir / "streamguard.db")
    try:
        return store.job(job_id)
    finally:
        store.close()


def test_drain_and_sigkill_mid_job_then_restart_completes_once(tmp_path: Path, test_bundle: Path,
                                                               files: FileServer):
    """SIGTERM mid-job: the daemon exits 0 and the job stays PROCESSING; the
    next daemon runs it again, and is SIGKILLed mid-job; the third runs it
    again to the end. Each run starts from the start and stores, charges and
    delivers only the segments not stored yet: records 0..n-1 once, one
    started and one completed event."""
    video = make_video(tmp_path / "long.mp4", seconds=40, width=640, height=360, gop=25, red=((20, 22),))
    url = files.add("long.mp4", video)
    with Receiver() as rx:
        d = Daemon(tmp_path / "data", test_bundle, ENV)
        try:
            d.start()
            key, secret = project(d, "jobs-crash")
            job = submit(d, key, {"inputUrl": url, "outputFormats": ["source"], "segmentSeconds": 1,
                                  "fps": 10, "moderate": True, "callbackUrl": rx.url("/crash")})
            d.wait_for(lambda: len(job_records(d, key, job["id"])) >= 2, 60, "a few records", interval=0.02)
            assert d.terminate(timeout=30) == 0
            drained = _stored_job(d, job["id"])
            assert drained is not None and drained.status == "PROCESSING" and 2 <= drained.task.next_seq < 40
            d.start()
            d.wait_for(lambda: len(job_records(d, key, job["id"])) >= drained.task.next_seq + 2, 60,
                       "more records", interval=0.02)
            d.kill()
        finally:
            d.kill()
        row = _stored_job(d, job["id"])  # what the killed daemon left: mid-job
        assert row is not None and row.status == "PROCESSING" and drained.task.next_seq < row.task.next_seq < 40, row
        d.start()
        try:
            done = wait_status(d, key, job["id"], ENDED, timeout=90)
            assert done["status"] == "COMPLETED", done
            records = job_records(d, key, job["id"])
            assert [r["data"]["data"]["segment_index"] for r in records] == list(range(40))
            assert done["segmentsCount"] == 40
            names = lambda: [r.event for r in rx.unique_by_id()]  # noqa: E731 - at-least-once: dedupe by id
            rx.wait_for(lambda: "video.conversion.completed" in names(), 20, "the completed event")
            time.sleep(0.5)  # anything sent twice would have arrived by now
            unique = rx.unique_by_id()
            assert names().count("video.conversion.completed") == 1
            assert names().count("video.conversion.started") == 1
            segs = [r.json["data"]["data"]["segment_index"] for r in unique if r.event == "stream.segment"]
            assert sorted(segs) == list(range(40))
            rx.verified(secret)
            assert done["tokens"]["total"] == sum(r["data"]["token"]["total"] for r in records)
        finally:
            d.kill()


# --------------------------------------------------------------------------- the summary, unit


def _record(index: int, frames: int, flagged: list[tuple[int, float, float]], processing_ms: int = 10) -> bytes:
    """A stored record with `frames` sampled frames; flagged: (frame_index, time, violence confidence)."""
    scores = {"violence": max([c for _, _, c in flagged], default=0.01), "weapons": 0.02 * index}
    violation = lambda c: {"category": "violence", "confidence": c, "severity": "high"}  # noqa: E731
    return json.dumps({"task_id": "job_x", "data": {"status": 0, "message": "segment processed", "data": {
        "segment_index": index, "start_time": f"{index * 2}.000", "end_time": f"{index * 2 + 2}.000",
        "video_url": "u", "processing_time_ms": str(processing_ms), "content_moderation": {
            "has_unsafe_content": bool(flagged), "frames_processed": frames, "scores": scores,
            "violations": [violation(max(c for _, _, c in flagged))] if flagged else [],
            "flagged_frames": [{"frame_index": i, "time": f"{t:.3f}", "violations": [violation(c)]}
                               for i, t, c in flagged]}},
        "token": {"input": 0, "output": 0, "total": 0, "video_tokens": 0, "text_tokens": 0}}}).encode()


def test_summary_numbers_frames_over_the_job_and_keeps_maxima():
    from streamguard.schemas import status_record, encoder
    from streamguard.services.jobs import summarize
    records = [_record(0, 2, []), _record(1, 3, [(1, 2.5, 0.6)]), encoder.encode(status_record("job_x", -1, "bad")),
               _record(2, 2, [(0, 4.0, 0.9), (1, 5.0, 0.7)])]
    s = summarize(records)
    assert s.safe is False and s.framesAnalyzed == 7 and s.processingTimeMs == 30
    assert [(v.category, v.confidence) for v in s.violations] == [("violence", 0.9)]
    assert s.scores == {"violence": 0.9, "weapons": 0.04}
    assert [(f.frameIndex, f.time, f.segmentIndex) for f in s.flaggedFrames] == [(3, 2.5, 1), (5, 4.0, 2),
                                                                                  (6, 5.0, 2)]
    clean = summarize([_record(0, 2, [])])
    assert clean.safe is True and clean.violations == [] and clean.flaggedFrames == []

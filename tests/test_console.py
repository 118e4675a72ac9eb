"""The web console (CONTRACT §9, issue 15) in a real browser: Debian's Chromium,
headless, driven by Playwright (its own browser download is never used), against
a real daemon, a real nginx-rtmp server with an ffmpeg publisher (red during 4
of every 12 seconds) and a real HTTP file server for a job's input.

What an operator does, through the page only: sign in with a key; start a stream
task with an alert threshold and metadata that carries markup; see it running
with red seconds; the alert appears without a reload; the flagged segment is red
on the timeline; a click seeks the player into that segment and it plays; stop
the task; retry a delivery; submit a job by URL whose ladder plays and switches
rungs. The metadata is shown as text (no script runs), nothing breaks the
Content-Security-Policy, the key never appears in a URL or the daemon's log, and
the page fits a phone's width. Screenshots are kept in tests/artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

import live_servers as ls
from daemon import Daemon
from http_files import FileServer
from live_servers import closed_port

pytestmark = [pytest.mark.live, pytest.mark.timeout(240)]

ARTIFACTS = Path(__file__).parent / "artifacts"
ENV = {"STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true", "STREAMGUARD_LIVE__OPEN_TIMEOUT": "5",
       "STREAMGUARD_LIVE__READ_TIMEOUT": "3", "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "10",
       "STREAMGUARD_JOBS__CONCURRENCY": "1"}
XSS = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>"
SEG = 4


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium not found: run `bash .ci/system-deps.sh`", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle):
    with Daemon(tmp_path_factory.mktemp("console-daemon"), test_bundle, ENV) as d:
        yield d


class Page:
    """A browser tab on the console that records what could betray a problem:
    page errors, console errors, CSP violations, every URL it requested."""

    def __init__(self, browser, daemon: Daemon, **context) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}")
                     if m.type == "error" or "Content Security Policy" in m.text else None)
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.goto(daemon.base + "/console")

    def sign_in(self, key: str) -> None:
        self.page.fill("#key", key)
        self.page.click("#signin button[type=submit]")
        self.page.wait_for_selector("#app:not([hidden])", timeout=10_000)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def wait(self, expression: str, timeout: float, what: str = "") -> object:
        """Poll a JS expression until it is truthy. (Playwright's wait_for_function
        evaluates its predicate inside the page, which the console's CSP forbids:
        page.evaluate goes through the DevTools protocol instead.)"""
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}; "
                                     f"status line: {self.page.inner_text('#status')!r}; errors: {self.errors}")
            time.sleep(0.1)

    def current_time(self) -> float:
        return self.page.evaluate("document.querySelector('#player').currentTime")

    def wait_playing(self, seconds: float = 1.0, timeout: float = 20) -> None:
        """The video's clock advances by `seconds` (it plays, not just seeks)."""
        t0 = self.current_time()
        self.wait(f"document.querySelector('#player').currentTime > {t0 + seconds}", timeout, "the video to play")

    def close(self, key: str) -> None:
        assert not [u for u in self.urls if key in u], "the key appeared in a URL"
        assert not self.errors, self.errors
        self.context.close()


def test_operator_watches_a_live_task_gets_its_alert_seeks_the_red_segment_and_retries_a_delivery(
        browser, daemon: Daemon, rtmp, tmp_path, request) -> None:
    key = daemon.create_key("console")
    video = ls.make_test_video(tmp_path / "loop.mp4", seconds=12, fps=25, width=320, height=240, gop=25,
                               red_ranges=((4.0, 8.0),))
    with ls.publishing(video, rtmp, request.node.name) as (_, url):
        tab = Page(browser, daemon)
        tab.sign_in(key)
        page = tab.page
        assert page.evaluate("sessionStorage.getItem('streamguard.apiKey')") == key
        assert key not in page.url

        # start a task from the console: alerts on, markup in its metadata, a callback nobody answers
        page.click("text=Start a stream")
        form = page.locator("#start-form")
        form.locator("[name=url]").fill(url)
        form.locator("[name=segment_seconds]").fill(str(SEG))
        form.locator("[name=alert_threshold]").fill("0.5")
        form.locator("[name=callback_url]").fill(f"http://127.0.0.1:{closed_port()}/hook")
        form.locator("[name=metadata]").fill(json.dumps({"title": XSS}))
        form.locator("button[type=submit]").click()
        tab.wait("document.querySelector('#detail-title').textContent.startsWith('tsk_')", 15)
        task = page.inner_text("#detail-title")

        # running, with red seconds: the alert arrives by itself, then the red segment's record
        alert = page.wait_for_selector(f"#alerts li[data-task='{task}'][data-category='violence']", timeout=45_000)
        assert "violence" in alert.inner_text() and "(high)" in alert.inner_text()
        assert page.evaluate("(img) => img.naturalWidth", alert.query_selector("img")) == 320  # the frame's JPEG
        red = page.wait_for_selector("#timeline button[data-severity='high']", timeout=45_000)
        assert page.inner_text("#detail-state").startswith("running")
        assert page.evaluate("getComputedStyle(document.querySelector(\"#timeline button[data-severity='high']\"))"
                             ".backgroundColor") == "rgb(235, 87, 87)"  # red
        # the player has the live playlist; click the red segment: the player goes there and plays
        tab.wait("document.querySelector('#player').readyState >= 2", 30)
        segment = int(red.get_attribute("data-segment"))
        record = next(r for r in daemon.records(task, key) if r["data"]["data"]
                      and r["data"]["data"]["segment_index"] == segment)["data"]["data"]
        red.click()
        tab.wait(f"document.querySelector('#clock').dataset.segment === '{segment}'", 15)
        t = tab.current_time()
        assert float(record["start_time"]) - 0.5 <= t < float(record["end_time"]), (t, record)
        tab.wait_playing()
        assert page.is_visible(f"#flagged li[data-segment='{segment}']")
        tab.shot("console-live.png")

        # the metadata is text: shown verbatim, no element made of it, no script ran
        assert XSS in page.text_content("#detail-meta")
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"], #detail-meta *').length") == 0
        assert page.evaluate("window.__xss") is None

        # stop it from the console
        page.click("#stop")
        tab.wait("document.querySelector('#detail-state').textContent.startsWith('stopped')", 20)

        # deliveries: the callback nobody answers is listed with its error; retry sends it again
        item = page.wait_for_selector("#deliveries li:has(.error) button", timeout=30_000)
        delivery = item.evaluate("(b) => b.closest('li').dataset.delivery")
        item.click()
        tab.wait(f"document.querySelector('#status').textContent === 'retrying {delivery}'", 10)
        tab.close(key)

        # a phone: the same task, nothing wider than the screen
        phone = Page(browser, daemon, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        phone.sign_in(key)
        phone.page.click(f"#streams button[data-id='{task}']")
        phone.page.wait_for_selector("#timeline button[data-severity='high']", timeout=15_000)
        phone.shot("console-phone.png")
        wide = phone.page.evaluate("[...document.querySelectorAll('body *')].filter((e) => "
                                   "e.getBoundingClientRect().right > 391).map((e) => e.tagName + '#' + e.id + '.' + "
                                   "e.className).slice(0, 10)")
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= 390, wide
        phone.close(key)
    log = daemon.log_path.read_text(errors="replace")
    assert key not in log and key[:12] not in log


def test_a_job_submitted_from_the_console_plays_its_ladder_and_switches_rungs(
        browser, daemon: Daemon, tmp_path) -> None:
    from videos import make_video

    key = daemon.create_key("console-jobs")
    clip = make_video(tmp_path / "ladder.mp4", seconds=8, fps=25, width=854, height=480, gop=25)
    with FileServer() as files:
        tab = Page(browser, daemon)
        tab.sign_in(key)
        page = tab.page
        page.click("text=Submit a job")
        form = page.locator("#job-form")
        form.locator("[name=inputUrl]").fill(files.add("ladder.mp4", clip))
        form.locator("[name=outputFormats]").fill("360p,480p")
        form.locator("[name=ffmpegPreset]").select_option("ultrafast")
        form.locator("[name=metadata]").fill('{"name": "<b>bold</b>"}')
        form.locator("button[type=submit]").click()
        tab.wait("document.querySelector('#detail-state').textContent.startsWith('COMPLETED')", 90)
        # both rungs in the quality menu; the timeline has the job's segments
        tab.wait("document.querySelectorAll('#quality option').length === 3", 20)
        labels = page.eval_on_selector_all("#quality option", "(os) => os.map((o) => o.textContent)")
        assert labels[1].startswith("360p") and labels[2].startswith("480p"), labels
        assert page.locator("#timeline button").count() >= 2
        tab.wait_playing(0.5)
        for level, name in ((1, "480p"), (0, "360p")):
            page.select_option("#quality", str(level))
            tab.wait(f"document.querySelector('#level').dataset.level === '{level}'", 20)
            assert page.inner_text("#level") == f"playing {name}"
            tab.wait_playing(0.5)
        assert "<b>bold</b>" in page.text_content("#detail-meta")
        assert page.evaluate("document.querySelectorAll('#detail-meta b').length") == 0
        tab.shot("console-job.png")
        tab.close(key)


def test_console_is_served_with_a_strict_policy_and_vendored_hlsjs(daemon: Daemon) -> None:
    page = daemon.call("GET", "/console")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.body.decode()
    assert "<script>" not in html and " on" not in html.replace("\n", " ").split("<body", 1)[1].split(">", 1)[0]
    assert re.findall(r'(?:src|href)="([^"]*)"', html) == [  # no CDN, no other origin
        "data:,", "/console/console.css", "/console/vendor/hls.min.js", "/console/console.js"]
    for name, kind in (("console.js", "javascript"), ("console.css", "css"), ("vendor/hls.min.js", "javascript")):
        got = daemon.call("GET", f"/console/{name}")
        assert got.status == 200 and kind in got.headers["Content-Type"], (name, got.status)
    assert daemon.call("GET", "/console/../streamguard.db").status == 404
    assert daemon.call("GET", "/console/index.html.bak").status == 404
    # the page's own script never builds HTML from data
    js = daemon.call("GET", "/console/console.js").body.decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js

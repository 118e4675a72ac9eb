#!/usr/bin/python3
"""Tiny real RTSP server for tests, built on GStreamer's gst-rtsp-server.

Runs under Debian's system interpreter (/usr/bin/python3 with python3-gi), NOT the
project venv.  Started and supervised by ``tests/live_servers.py::RtspServer``.

Serves ``rtsp://HOST:PORT/MOUNT`` (TCP and UDP transports both allowed):

* default ("pattern" mode): a live, endless H.264 stream (x264enc, fixed GOP, no
  scene-cut keyframes) of a moving SMPTE test pattern, switched to saturated red
  (pattern=red, RGB 255,0,0) for frames whose time falls in one of ``--red A:B``
  ranges (seconds; with ``--loop-seconds L`` the time is taken modulo L, like a
  looped file), plus an AAC sine tone unless ``--no-audio``.
  Time starts at 0 for every client unless ``--shared`` (one pipeline for all).
* ``--file PATH`` mode: serves an .mp4/.mov (qtdemux) or .ts (tsdemux) file with
  H.264 (+ optional AAC) at real-time pace, once (the stream ends at EOF).

Readiness: after the server socket is bound it writes the bound port to
``--ready-file`` (atomically, via rename) and prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

PATTERN_NORMAL = 0  # smpte
PATTERN_RED = 4  # red


def parse_range(text: str) -> tuple[float, float]:
    a, _, b = text.partition(":")
    start, end = float(a), float(b)
    if end <= start:
        raise argparse.ArgumentTypeError(f"empty red range {text!r}")
    return start, end


def build_pattern_launch(args: argparse.Namespace) -> str:
    video = (
        "videotestsrc name=vsrc is-live=true pattern=smpte horizontal-speed=4 "
        f"! video/x-raw,format=I420,width={args.width},height={args.height},"
        f"framerate={args.fps}/1 "
        "! x264enc tune=zerolatency speed-preset=ultrafast bitrate=800 threads=1 sliced-threads=false "
        f"key-int-max={args.gop} "
        f'option-string="scenecut=0:min-keyint={args.gop}:bframes=0" '
        "! video/x-h264,profile=constrained-baseline "
        "! h264parse config-interval=-1 "
        "! rtph264pay name=pay0 pt=96 config-interval=-1"
    )
    parts = [video]
    if args.audio:
        parts.append(
            "audiotestsrc is-live=true wave=sine freq=440 volume=0.2 "
            "samplesperbuffer=1024 "
            "! audio/x-raw,rate=48000,channels=2 ! audioconvert "
            "! avenc_aac bitrate=96000 ! aacparse "
            "! rtpmp4gpay name=pay1 pt=97"
        )
    return "( " + " ".join(parts) + " )"


def build_file_launch(args: argparse.Namespace) -> str:
    path = os.path.abspath(args.file)
    ext = os.path.splitext(path)[1].lower()
    demux = "tsdemux" if ext in (".ts", ".m2ts", ".mts") else "qtdemux"
    loc = path.replace("\\", "\\\\").replace('"', '\\"')
    parts = [
        f'filesrc location="{loc}" ! {demux} name=d '
        "d. ! queue ! h264parse config-interval=-1 "
        "! rtph264pay name=pay0 pt=96 config-interval=-1"
    ]
    if args.audio:
        parts.append("d. ! queue ! aacparse ! rtpmp4gpay name=pay1 pt=97")
    return "( " + " ".join(parts) + " )"


def red_at(t: float, ranges: list[tuple[float, float]], loop: float) -> bool:
    if loop > 0:
        t = t % loop
    return any(a <= t < b for a, b in ranges)


def on_media_configure(factory, media, args) -> None:
    if args.file:
        return
    vsrc = media.get_element().get_by_name("vsrc")
    if vsrc is None:
        return
    ranges, loop, fps = args.red, args.loop_seconds, args.fps
    vsrc.set_property("pattern", PATTERN_RED if red_at(0.0, ranges, loop) else PATTERN_NORMAL)
    if not ranges:
        return
    state = {"n": 0, "red": red_at(0.0, ranges, loop)}

    def probe(pad, info):
        # Called after buffer n was produced; choose the pattern of buffer n+1.
        state["n"] += 1
        want = red_at(state["n"] / fps, ranges, loop)
        if want != state["red"]:
            state["red"] = want
            vsrc.set_property("pattern", PATTERN_RED if want else PATTERN_NORMAL)
        return Gst.PadProbeReturn.OK

    vsrc.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, probe)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--mount", default="/test")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--gop", type=int, default=25)
    ap.add_argument("--red", type=parse_range, action="append", default=[],
                    help="seconds START:END during which frames are saturated red")
    ap.add_argument("--loop-seconds", type=float, default=0.0)
    ap.add_argument("--no-audio", dest="audio", action="store_false")
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--file", help="serve this file (H.264 [+AAC]) instead of a pattern")
    ap.add_argument("--ready-file")
    args = ap.parse_args()

    Gst.init(None)
    launch = build_file_launch(args) if args.file else build_pattern_launch(args)
    print(f"launch: {launch}", file=sys.stderr, flush=True)

    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(args.shared)
    factory.set_protocols(
        GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP
    )
    factory.connect("media-configure", on_media_configure, args)
    server.get_mount_points().add_factory(args.mount, factory)

    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"failed to bind {args.host}:{args.port}", file=sys.stderr, flush=True)
        return 2
    port = server.get_bound_port()

    # Periodically drop sessions whose clients vanished.
    GLib.timeout_add_seconds(2, lambda: (server.get_session_pool().cleanup(), True)[1])
    for sig in (signal.SIGINT, signal.SIGTERM):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, lambda *_: (loop.quit(), False)[1])

    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{port}\n")
        os.replace(tmp, args.ready_file)
    print(f"READY {port}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

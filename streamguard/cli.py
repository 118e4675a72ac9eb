"""Command line: `streamguard serve|scan|keys|models ...` (also `python -m streamguard`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import __version__, logsafe
from .config import Settings, load_settings
from .errors import NotFound as NotFoundError
from .errors import InputInvalid, StreamGuardError
from .schemas import RENDITIONS, X264_PRESETS, Fps, SegmentSeconds, Threshold, bounds

if TYPE_CHECKING:
    from .store import Store


def _ranged(kind: type[int] | type[float], lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a number of `kind` within [lo, hi]."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {kind(lo)} and {kind(hi)}")
        return value
    return parse


def _renditions(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RENDITIONS]
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"renditions repeated in {text!r}")
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown rendition(s) {', '.join(unknown) or '(none)'}; available: {', '.join(RENDITIONS)}")
    return names


def _common(p: argparse.ArgumentParser, *, model: bool = False) -> None:
    p.add_argument("--config", metavar="PATH", help="TOML config file (default: $STREAMGUARD_CONFIG)")
    p.add_argument("--data-dir", metavar="DIR", help="store and media root (config storage.data_dir)")
    if model:
        p.add_argument("--model", metavar="DIR", help="model bundle directory (config model.path)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug output to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamguard", description="Self-hosted live video moderation.",
        epilog="The data dir (store, media, models) defaults to ./var, relative to the directory you "
               "run the command in: run serve and keys from the same directory or give both --data-dir.")
    parser.add_argument("--version", action="version", version=f"streamguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser("scan", help="run the segment pipeline on files or stream URLs, print records")
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help="video file path or stream URL")
    scan.add_argument("--segment-seconds", type=_ranged(int, *bounds(SegmentSeconds)), default=None,
                      help="segment length (5)")
    scan.add_argument("--fps", type=_ranged(int, *bounds(Fps)), default=None,
                      help="frames sampled per second (1)")
    scan.add_argument("--threshold", type=_ranged(float, *bounds(Threshold)), default=None, help="violation threshold (0.30)")
    scan.add_argument("--out", metavar="DIR", type=Path, help="HLS output folder")
    scan.add_argument("--moderate", action="store_true", help="run content moderation")
    scan.add_argument("--categorize", action="store_true",
                      help="categorize each segment (20 content categories and tags)")
    scan.add_argument("--logos", action="store_true",
                      help="detect the logos given with --logo in the sampled frames (each region is an "
                           "image-encoder pass, billed as video tokens)")
    scan.add_argument("--logo", action="append", default=[], type=_logo_arg, metavar="NAME=IMAGE",
                      help="a logo to look for: its name and a reference image file (repeatable; "
                           "the same name again adds an image to that logo)")
    scan.add_argument("--renditions", type=_renditions, default=["source"],
                      help="comma-separated renditions to write: source (a remux) and/or the encoded "
                           "presets 360p,480p,720p,1080p (default source)")
    scan.add_argument("--x264-preset", choices=X264_PRESETS, default="fast",
                      help="libx264 preset of the encoded renditions (fast)")
    _common(scan, model=True)

    serve = sub.add_parser("serve", help="run the daemon: HTTP API, live tasks, metrics")
    serve.add_argument("--host", help="listen address (config server.host, default 127.0.0.1)")
    serve.add_argument("--port", type=_ranged(int, 0, 65535), help="listen port (config server.port, default 8080)")
    _common(serve, model=True)

    keys = sub.add_parser("keys", help="create and revoke API keys, set token balances")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="create a key for a project (created if new); prints the key last")
    kc.add_argument("--project", required=True, help="project name")
    kc.add_argument("--balance", type=_ranged(int, 0, 2**62), help="token balance (default: unmetered)")
    _common(kc)
    kr = ksub.add_parser("revoke", help="revoke a key (by key or key id)")
    kr.add_argument("key")
    _common(kr)
    kb = ksub.add_parser("balance", help="show or set a key's token balance")
    kb.add_argument("key")
    group = kb.add_mutually_exclusive_group()
    group.add_argument("--set", type=_ranged(int, 0, 2**62), metavar="TOKENS", help="set the balance")
    group.add_argument("--unmetered", action="store_true", help="remove the limit")
    _common(kb)
    kn = ksub.add_parser("new-secret-key", help="print a fresh key for security.secret_key (encrypts stored secrets)")
    _common(kn)
    kx = ksub.add_parser("rotate-secret-key",
                         help="re-encrypt every stored secret with security.secret_key (after moving the old "
                              "key to security.previous_secret_keys)")
    _common(kx)

    models = sub.add_parser("models", help="list, inspect, build, pull and quantize model bundles")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mk = msub.add_parser("make-test", help="write the deterministic test bundle to DIR")
    mk.add_argument("dir", type=Path)
    mk.add_argument("--busy-layers", type=_ranged(int, 0, 64), default=0,
                    help="make the image encoder deliberately slow (for load tests; ~0.3 GFLOP/frame each)")
    pull = msub.add_parser("pull", help="download a real CLIP bundle (e.g. clip-vit-b32)")
    pull.add_argument("name", help="built-in source name or path to a source JSON")
    pull.add_argument("--dest", type=Path, help="bundle directory (default <data-dir>/models/<name>)")
    pull.add_argument("--base-url", help="mirror to download from instead of the source's hub")
    pull.add_argument("--data-dir", metavar="DIR")
    msub.add_parser("list", help="list pullable sources and bundles under <data-dir>/models") \
        .add_argument("--data-dir", metavar="DIR")
    qz = msub.add_parser("quantize", help="write an int8 copy of a bundle for CPU, checked against fp32")
    qz.add_argument("src", type=Path, help="bundle to quantize")
    qz.add_argument("--dest", type=Path, required=True, help="new bundle directory (must not exist or be empty)")
    qz.add_argument("--min-cosine", type=_ranged(float, 0.0, 1.0), default=0.99,
                    help="refuse when the mean fp32/int8 embedding cosine is below this (0.99)")
    insp = msub.add_parser("inspect", help="show a bundle's manifest, files and providers")
    insp.add_argument("dir", type=Path)
    exp = msub.add_parser("export", help="turn local CLIP weights (a Hugging Face directory) into a verified "
                                         "bundle; needs pip install 'streamguard[export]'")
    exp.add_argument("src", nargs="?", type=Path, help="Hugging Face CLIP directory (save_pretrained output)")
    exp.add_argument("--random-init", metavar="ARCH", choices=("vit-b-32", "tiny"),
                     help="instead of SRC: this architecture with random weights, a shape-real bundle for "
                          "cost measurement only (vit-b-32; tiny is for tests)")
    exp.add_argument("--seed", type=_ranged(int, 0, 2**31), default=0, help="seed for --random-init (0)")
    exp.add_argument("--dest", type=Path, required=True, help="bundle directory to write (new or empty)")
    return parser


def _settings(args: argparse.Namespace, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Config file + env, then the command's flags (those given) on top.

    The data dir is made absolute here, once: the default `./var` depends on
    the directory a command runs in, so every message that names it (serve's
    start line, each `keys` command) shows which one was really used."""
    tree: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        tree["storage"] = {"data_dir": args.data_dir}
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            tree.setdefault(section, {}).update(given)
    settings = load_settings(getattr(args, "config", None), overrides=tree)
    settings.storage.data_dir = str(Path(settings.storage.data_dir).expanduser().resolve())
    return settings


def _logo_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=IMAGE, got {text!r}")
    return name.strip(), path


def cmd_scan(args: argparse.Namespace) -> int:
    from .pipeline.segments import PipelineOptions
    from .services.scan import run_scan

    settings = _settings(args, {"pipeline": {
        "segment_seconds": args.segment_seconds, "fps": args.fps, "threshold": args.threshold}})
    p = settings.pipeline
    opts = PipelineOptions(segment_seconds=p.segment_seconds, fps=p.fps, threshold=p.threshold,
                           moderate=args.moderate, categorize=args.categorize, top_k=p.categorization_top_k,
                           thresholds=p.thresholds, renditions=tuple(args.renditions),
                           x264_preset=args.x264_preset)
    if args.logo and not args.logos:
        print("streamguard: error: --logo needs --logos", file=sys.stderr)
        return 2
    return asyncio.run(run_scan(args.inputs, settings, opts, out_dir=args.out, model_dir=args.model,
                                logos=args.logo if args.logos else None))


def cmd_models(args: argparse.Namespace) -> int:
    action = args.models_command
    if action == "make-test":
        from .inference.testmodel import make_test_bundle
        manifest = make_test_bundle(args.dir, busy_layers=args.busy_layers)
        print(f"wrote test bundle {manifest.name!r} to {args.dir}")
        return 0
    if action == "pull":
        from .inference.pull import pull_bundle
        dest = args.dest or _settings(args).data_dir / "models" / Path(args.name).stem
        path = pull_bundle(args.name, dest, base_url=args.base_url)
        print(f"pulled {args.name} to {path}")
        return 0
    if action == "quantize":
        from .inference.quantize import quantize_bundle
        r = quantize_bundle(args.src, args.dest, min_cosine=args.min_cosine)
        print(f"wrote {args.dest}: {', '.join(r.quantized)} quantized ({r.method})")
        print(f"embedding cosine int8 vs fp32 on {r.images} generated images (seed {r.seed}): "
              f"mean {r.mean_cosine:.4f}, min {r.min_cosine:.4f} (bound {args.min_cosine})")
        print(f"image encoder on this machine: fp32 {r.fp32_images_per_s:.1f} images/s, "
              f"int8 {r.int8_images_per_s:.1f} images/s")
        return 0
    if action == "list":
        from .inference.pull import list_sources
        print("sources:", ", ".join(list_sources()))
        root = _settings(args).data_dir / "models"
        for d in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
            print(f"bundle: {d.parent}")
        return 0
    if action == "export":
        from .inference import export
        if (args.src is None) == (args.random_init is None):
            raise InputInvalid("give either SRC or --random-init ARCH")
        if args.random_init:
            manifest, check = export.export_random(args.random_init, args.dest, seed=args.seed)
        else:
            manifest, check = export.export_hf(args.src, args.dest)
        print(f"verified against the framework: {check.summary()}")
        kind = " (shape-real: random weights, not a model)" if manifest.shape_real else ""
        print(f"exported {manifest.name!r}{kind} to {args.dest}")
        return 0
    if action == "inspect":
        from .inference.pull import describe_bundle
        print(json.dumps(describe_bundle(args.dir), indent=2))
        return 0
    raise AssertionError(action)


def cmd_serve(args: argparse.Namespace) -> int:
    from .api.serve import run

    settings = _settings(args, {"server": {"host": args.host, "port": args.port}})
    return run(settings, args.model)


def _open_key_store(settings: Settings, action: str) -> "Store":
    """The store a `keys` command works on, named on stderr: a key created in
    another directory's ./var is a key the daemon never sees."""
    from .store import Store, is_shared, open_store

    if is_shared(settings):
        print("streamguard: keys store: the shared PostgreSQL database (storage.database_url)", file=sys.stderr)
        return open_store(settings)
    path = settings.data_dir / "streamguard.db"
    if not path.exists():
        if action != "create":
            raise NotFoundError(f"no store at {path}: pass the daemon's --data-dir "
                                "(or run this in the directory where `streamguard serve` runs)")
        print(f"streamguard: keys store {path} (new; `serve` must use this data dir: {settings.data_dir})",
              file=sys.stderr)
    else:
        print(f"streamguard: keys store {path}", file=sys.stderr)
    return Store(path)


def cmd_keys(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.keys_command == "new-secret-key":
        from .secretbox import new_key
        print(new_key())
        return 0
    store = _open_key_store(settings, args.keys_command)
    try:
        action = args.keys_command
        if action == "create":
            key, info = store.create_key(args.project, args.balance)
            balance = "unmetered" if info.balance is None else f"{info.balance} tokens"
            print(f"project {args.project} ({info.project_id}), key id {info.id}, balance {balance}")
            print(key)
            return 0
        if action == "revoke":
            if not store.revoke_key(args.key):
                raise NotFoundError(f"no such key: {args.key}")
            print(f"revoked {args.key}")
            return 0
        if action == "balance":
            info = store.key_info(args.key)
            if info is None:
                raise NotFoundError(f"no such key: {args.key}")
            if args.set is not None or args.unmetered:
                info = store.set_balance(args.key, None if args.unmetered else args.set)
            assert info is not None
            print("unmetered" if info.balance is None else info.balance)
            return 0
        if action == "rotate-secret-key":
            from .services.outputs import reseal
            from .secretbox import SecretBox
            updates = reseal(SecretBox.from_settings(settings), store.sealed_storage())
            store.reseal_storage(updates)
            print(f"re-encrypted {len(updates)} stored secret(s) with security.secret_key")
            return 0
        raise AssertionError(action)
    finally:
        store.close()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scan": cmd_scan, "serve": cmd_serve, "keys": cmd_keys, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsafe.configure(logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except StreamGuardError as exc:
        print(f"streamguard: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _interrupted(exc):  # Ctrl-C during start-up, wrapped by a library's import
            return 130
        raise


def entry() -> None:
    """The process entry (console script and `python -m streamguard`): a Ctrl-C
    that comes once the command has returned changes nothing, rather than
    killing the interpreter on its way out (exit -2 instead of the status)."""
    try:
        status = main()
    except KeyboardInterrupt:
        status = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        # An input abandoned mid-read (a silent source) leaves its thread inside
        # FFmpeg; finalizing the interpreter under it can crash (SIGSEGV), so
        # leave without finalizing once our output is out.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _interrupted(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


if __name__ == "__main__":
    entry()

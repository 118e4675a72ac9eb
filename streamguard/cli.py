"""Command line: `streamguard scan|models ...` (also `python -m streamguard`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from .config import Settings, load_settings
from .errors import StreamGuardError

RENDITIONS = ("source",)


def _ranged_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value
    return parse


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _renditions(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RENDITIONS]
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
    parser = argparse.ArgumentParser(prog="streamguard", description="Self-hosted live video moderation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser("scan", help="run the segment pipeline on files or stream URLs, print records")
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help="video file path or stream URL")
    scan.add_argument("--segment-seconds", type=_ranged_int(1, 60), default=None, help="segment length (5)")
    scan.add_argument("--fps", type=_ranged_int(1, 30), default=None, help="frames sampled per second (1)")
    scan.add_argument("--threshold", type=_unit_float, default=None, help="violation threshold (0.30)")
    scan.add_argument("--out", metavar="DIR", type=Path, help="HLS output folder")
    scan.add_argument("--moderate", action="store_true", help="run content moderation")
    scan.add_argument("--renditions", type=_renditions, default=["source"],
                      help="comma-separated renditions to write (source)")
    _common(scan, model=True)

    models = sub.add_parser("models", help="list, inspect, build and pull model bundles")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mk = msub.add_parser("make-test", help="write the deterministic test bundle to DIR")
    mk.add_argument("dir", type=Path)
    pull = msub.add_parser("pull", help="download a real CLIP bundle (e.g. clip-vit-b32)")
    pull.add_argument("name", help="built-in source name or path to a source JSON")
    pull.add_argument("--dest", type=Path, help="bundle directory (default <data-dir>/models/<name>)")
    pull.add_argument("--base-url", help="mirror to download from instead of the source's hub")
    pull.add_argument("--data-dir", metavar="DIR")
    msub.add_parser("list", help="list pullable sources and bundles under <data-dir>/models") \
        .add_argument("--data-dir", metavar="DIR")
    insp = msub.add_parser("inspect", help="show a bundle's manifest, files and providers")
    insp.add_argument("dir", type=Path)
    return parser


def _settings(args: argparse.Namespace, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Config file + env, then the command's flags (those given) on top."""
    tree: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        tree["storage"] = {"data_dir": args.data_dir}
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            tree.setdefault(section, {}).update(given)
    return load_settings(getattr(args, "config", None), overrides=tree)


def cmd_scan(args: argparse.Namespace) -> int:
    from .pipeline import PipelineOptions
    from .scan import run_scan

    settings = _settings(args, {"pipeline": {
        "segment_seconds": args.segment_seconds, "fps": args.fps, "threshold": args.threshold}})
    p = settings.pipeline
    opts = PipelineOptions(segment_seconds=p.segment_seconds, fps=p.fps, threshold=p.threshold,
                           moderate=args.moderate)
    return asyncio.run(run_scan(args.inputs, settings, opts, out_dir=args.out, model_dir=args.model))


def cmd_models(args: argparse.Namespace) -> int:
    action = args.models_command
    if action == "make-test":
        from .inference.testmodel import make_test_bundle
        manifest = make_test_bundle(args.dir)
        print(f"wrote test bundle {manifest.name!r} to {args.dir}")
        return 0
    if action == "pull":
        from .inference.pull import pull_bundle
        dest = args.dest or _settings(args).data_dir / "models" / Path(args.name).stem
        path = pull_bundle(args.name, dest, base_url=args.base_url)
        print(f"pulled {args.name} to {path}")
        return 0
    if action == "list":
        from .inference.pull import list_sources
        print("sources:", ", ".join(list_sources()))
        root = _settings(args).data_dir / "models"
        for d in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
            print(f"bundle: {d.parent}")
        return 0
    if action == "inspect":
        from .inference.pull import describe_bundle
        print(json.dumps(describe_bundle(args.dir), indent=2))
        return 0
    raise AssertionError(action)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"scan": cmd_scan, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except StreamGuardError as exc:
        print(f"streamguard: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Get data in MODEST format: make the synthetic set, download the real MODEST zip, or verify what you have.

    python data_download.py synthetic --out data/synthetic [--size 224] [--backgrounds 100] [--foregrounds 100]
                                      [--placements 20] [--seed 0] [--objects 0] [--zip] [--workers N] [--yes]
    python data_download.py modest [--out data] [--from PATH [--in-place]] [--extract] [--quick]
    python data_download.py verify PATH [--quick]
    python data_download.py build --backgrounds DIR --foregrounds DIR --out DIR [--size 224] [--placements 20]
                                  [--depth-model CKPT_OR_HUB_ENTRY] [--seed 0]

`modest` resumes an interrupted download when run again, and does nothing when a verified copy is there.
If Google Drive refuses ("too many users"), copy the file into your own Drive and use `--from`.
`build` makes a MODEST-format dataset from your own photos and cut-outs (see tools/build.py for the recipe).
Add --debug to any command to see the full traceback of an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lib.errors import UserError, run_cli
from tools.download import QUICK_SAMPLE, REGISTRY, URL_ENV, count_samples, extract_zip, get_modest, verify_path

SYNTHETIC_SIZES = dict(backgrounds=100, foregrounds=100, placements=20)  # 400,000 samples: a full-size MODEST twin
ASK_ABOVE = 20_000  # samples; the defaults make 400,000 (about 9 GB), too much to write without asking
BYTES_PER_SAMPLE_224 = 21_000  # measured: bg_fg, mask and depth JPEGs of one 224 px synthetic sample


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: one subcommand per way of getting data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthetic", parents=[common], help="make the procedural MODEST-format dataset (no download)")
    syn.add_argument(
        "--out", required=True, help="folder to write (with --zip: the zip file; .zip is added if missing)"
    )
    syn.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    syn.add_argument("--backgrounds", type=int, default=None, help="number of backgrounds (default 100)")
    syn.add_argument("--foregrounds", type=int, default=None, help="number of foregrounds (default 100)")
    syn.add_argument(
        "--placements",
        type=int,
        default=None,
        help="placements per bg/fg pair, doubled by flipping the fg (default 20 -> 40 samples a pair)",
    )
    syn.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    syn.add_argument(
        "--objects",
        type=float,
        default=0.0,
        help="fraction of foregrounds that are generic cut-outs (blobs, polygons, furniture-like), not people "
        "(default 0: people only)",
    )
    syn.add_argument("--zip", action="store_true", help="write one zip instead of a folder")
    syn.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    syn.add_argument(
        "--yes", action="store_true", help=f"write more than {ASK_ABOVE:,} samples without the sizes given explicitly"
    )

    entry = REGISTRY["modest"]
    mod = sub.add_parser(
        "modest", parents=[common], help=f"download and verify the MODEST zip (~6.6 GB, {entry['samples']:,} samples)"
    )
    mod.add_argument("--out", default="data", help="folder for the zip (default data/)")
    mod.add_argument(
        "--from",
        dest="from_path",
        metavar="PATH",
        help="take the zip from PATH (e.g. a mounted Google Drive) instead of downloading; copied into --out",
    )
    mod.add_argument("--in-place", action="store_true", help="with --from: verify and use the zip where it is, no copy")
    mod.add_argument("--extract", action="store_true", help="also extract it into --out (atomically; the zip stays)")
    mod.add_argument("--quick", action="store_true", help=f"check the CRC of {QUICK_SAMPLE} random members, not all")
    mod.add_argument(
        "--retries", type=int, default=3, help="reconnects within one run (default 3); a re-run resumes too"
    )
    mod.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server between bytes")
    mod.epilog = f"Source: the Google Drive id in tools/download.py REGISTRY; ${URL_ENV} overrides it with any URL."

    ver = sub.add_parser("verify", parents=[common], help="verify a MODEST zip (stamped when it passes) or folder")
    ver.add_argument("path", help="a .zip or a dataset folder")
    ver.add_argument("--quick", action="store_true", help=f"check {QUICK_SAMPLE} random members/files, not all")

    bld = sub.add_parser(
        "build", parents=[common], help="make a MODEST-format dataset from your own backgrounds and cut-outs"
    )
    bld.add_argument(
        "--backgrounds", required=True, help="folder of background photos (centre-cropped, resized to --size)"
    )
    bld.add_argument("--foregrounds", required=True, help="folder of cut-outs with transparency (PNG with alpha)")
    bld.add_argument("--out", required=True, help="dataset folder to write (must not exist, or be empty)")
    bld.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    bld.add_argument(
        "--placements",
        type=int,
        default=20,
        help="random positions per bg/fg pair, doubled by flipping the cut-out (default 20 -> 40 samples a pair)",
    )
    bld.add_argument(
        "--depth-model",
        default=None,
        help="a DepthNet checkpoint (runs/x/best.pt) or a torch.hub entry such as intel-isl/MiDaS:MiDaS_small "
        "(needs internet); without it depth maps are a flat placeholder",
    )
    bld.add_argument("--seed", type=int, default=0, help="random seed for the positions (default 0)")
    args = parser.parse_args(argv)
    if args.command == "synthetic":  # sizes left out take their defaults; sizes given count as an explicit choice
        given = {k: getattr(args, k) for k in SYNTHETIC_SIZES if getattr(args, k) is not None}
        args.sizes_given = bool(given)
        vars(args).update({**SYNTHETIC_SIZES, **given})
    return args


def describe_synthetic(size: int, backgrounds: int, foregrounds: int, placements: int) -> tuple[int, str]:
    """(sample count, 'about N GB') of a synthetic dataset, from its arguments."""
    samples = backgrounds * foregrounds * 2 * placements
    size_bytes = samples * BYTES_PER_SAMPLE_224 * (size / 224) ** 2
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size_bytes >= scale or unit == "KB":
            return samples, f"about {size_bytes / scale:.1f} {unit}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; errors come back as UserError (one line, see lib.errors.run_cli)."""
    args = parse_args(argv)
    progress = not args.quiet
    if args.command == "synthetic":
        from lib.synthetic import make_synthetic_dataset  # only this command needs it

        samples, size = describe_synthetic(args.size, args.backgrounds, args.foregrounds, args.placements)
        shape = f"{args.backgrounds} backgrounds x {args.foregrounds} foregrounds x {2 * args.placements} placements"
        if samples > ASK_ABOVE and not (args.yes or args.sizes_given):
            raise UserError(
                f"{args.out}: the default sizes make {samples:,} samples ({shape}, {size}); add --yes to write them, "
                "or choose --backgrounds, --foregrounds and --placements (e.g. --backgrounds 20 --foregrounds 10 "
                "--placements 2: 800 samples)"
            )
        # up front, on stderr: stdout's last line stays the result ("wrote N samples to PATH")
        print(f"writing {samples:,} samples ({shape} at {args.size} px, {size}) to {args.out}", file=sys.stderr)
        path = make_synthetic_dataset(
            Path(args.out),
            size=args.size,
            backgrounds=args.backgrounds,
            foregrounds=args.foregrounds,
            placements=args.placements,
            seed=args.seed,
            objects=args.objects,
            as_zip=args.zip,
            workers=args.workers,
            progress=progress,
        )
        print(f"wrote {count_samples(path):,} samples to {path}")
    elif args.command == "modest":
        got = get_modest(
            args.out,
            from_path=args.from_path,
            in_place=args.in_place,
            quick=args.quick,
            retries=args.retries,
            timeout=args.timeout,
            progress=progress,
        )
        if got.report is None:
            print(f"already verified: {got.path} (stamp {got.stamp}); nothing to do")
        else:
            print(f"{got.action}: {got.path}: {got.report.describe()}")
            if got.report.sha256:
                print(f"sha256 {got.report.sha256}")
        if args.extract:
            folder, fresh = extract_zip(got.path, args.out, progress=progress)
            print(f"{'extracted to' if fresh else 'already extracted:'} {folder}")
    elif args.command == "build":
        from tools.build import build_dataset, describe  # only this command needs it

        path = build_dataset(
            args.backgrounds,
            args.foregrounds,
            args.out,
            size=args.size,
            placements=args.placements,
            depth_model=args.depth_model,
            seed=args.seed,
            progress=progress,
        )
        print(describe(path))
    elif args.command == "verify":
        report, stamp = verify_path(args.path, quick=args.quick, progress=progress)
        print(f"ok: {report.path}: {report.describe()}")
        if stamp is not None:
            print(f"stamp: {stamp}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

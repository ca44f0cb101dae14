"""Command line: ``python -m st_from_he demo`` (also ``st-from-he demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``st-from-he`` command."""
    parser = argparse.ArgumentParser(prog="st-from-he", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train on her2st C2-C5 + B4, predict held-out C6, print scores, write figures and predictions",
    )
    demo.add_argument(
        "--data",
        default=None,
        help="folder with the her2st sections (default: $ST_FROM_HE_DATA_DIR, the cache, or download)",
    )
    demo.add_argument("--out", default="st_from_he_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--test", default="C6", help="held-out section (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    demo.add_argument("--preset", default="default", help="model preset (default: %(default)s)")
    demo.add_argument("--n-top", type=int, default=1000, help="top HVGs per section in the gene panel")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a two-minute look: 20 s of network training on the top 200 genes per section (lower scores)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(
            data=args.data,
            out=args.out,
            test=args.test,
            epochs=args.epochs,
            preset=args.preset,
            n_top=args.n_top,
            seed=args.seed,
            quick=args.quick,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

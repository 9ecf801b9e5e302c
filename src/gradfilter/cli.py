"""The ``gradfilter`` command. Nothing imports this module; it only dispatches to the library."""

from __future__ import annotations

import argparse
import sys


def _demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fine-tune pretrained EfficientNet-Lite0 on digits: "
                                    "vanilla vs gradient filtering, side by side")
    p.add_argument("--epochs", type=int, default=None, help="epochs per method")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="runs/demo", help="folder for metrics and the plot")

    def run(args: argparse.Namespace) -> int:
        from .demo import run_demo

        return run_demo(epochs=args.epochs, quiet=args.quiet, out=args.out)

    p.set_defaults(func=run)


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: vanilla vs filtered, alternating, same process")
    p.add_argument("suite", choices=["layers"], help="layers: the paper's per-layer configs")
    p.add_argument("--radii", default="2,4", help="comma-separated radii")
    p.add_argument("--batch", type=int, default=None, help="batch size (8 on CPU, 32 on GPU)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per method")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file for the results (a PNG is written "
                                               "beside it)")

    def run(args: argparse.Namespace) -> int:
        from .bench.layers import run_layers

        radii = [int(r) for r in args.radii.split(",")]
        return run_layers(radii=radii, batch=args.batch, repeats=args.repeats,
                          device=args.device, out=args.out)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo(sub)
    _bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"gradfilter {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

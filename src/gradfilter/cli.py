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


def _finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune the last N blocks of a model on a data set, "
                                        "checkpointing every epoch (resumable)")
    p.add_argument("--model", required=True, help="mobilenet_v2, resnet18, resnet34, "
                   "tf_efficientnet_lite0 or a timm name; segmentation: <head>_<encoder>, "
                   "head deeplabv3|fcn|pspnet|upernet, encoder tf_efficientnet_lite0|resnet18")
    p.add_argument("--pretrained", action="store_true",
                   help="start from built-in offline weights (tf_efficientnet_lite0 only)")
    p.add_argument("--checkpoint", default=None, help="state_dict file to start from")
    p.add_argument("--data", required=True, help="digits, mnist5k, lfw_faces, "
                   "imagefolder:PATH, cifar10:PATH, cifar100:PATH; segmentation: "
                   "synthetic-seg, voc:PATH, cityscapes:PATH")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--method", choices=["vanilla", "gradfilter"], required=True)
    p.add_argument("--radius", type=int, default=2, help="patch radius for gradfilter")
    p.add_argument("--train-last", type=int, required=True,
                   help="number of last blocks to train (plus the classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (the last complete epoch)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt and metrics.json")

    def run(args: argparse.Namespace) -> int:
        from .train.runner import finetune

        try:
            m = finetune(
                model=args.model, data=args.data, out=args.out, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, method=args.method,
                radius=args.radius, train_last=args.train_last, pretrained=args.pretrained,
                checkpoint=args.checkpoint, image_size=args.image_size, seed=args.seed,
                optimizer=args.optimizer, resume=args.resume, quiet=args.quiet,
                device=args.device,
            )
        except KeyboardInterrupt:
            print(f"gradfilter finetune: interrupted; continue with --resume --out {args.out}",
                  file=sys.stderr)
            return 130
        except ModuleNotFoundError as e:
            print(f"gradfilter finetune: error: {e}", file=sys.stderr)
            return 2
        radius = "" if m["radius"] is None else f" r={m['radius']}"
        label = "val mIoU" if "val_miou" in m else "val accuracy"
        acc = m["val_miou"] if "val_miou" in m else m["val_accuracy"]
        print(f"{m['model']} {m['method']}{radius} last {m['train_last']} on {m['data']}: "
              f"{label} {'-' if acc is None else f'{100 * acc:.2f}%'} after "
              f"{m['epochs']} epochs, step {m['step_time_ms']:.1f} ms, "
              f"{m['saved_activation_bytes'] / 2**20:.2f} MiB saved/step")
        print(f"wrote {args.out}/metrics.json and {m['checkpoint']}")
        return 0

    p.set_defaults(func=run)


def _evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="validation accuracy of a model with saved weights")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True,
                   help="a finetune checkpoint.pt or a plain state_dict file")
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from .train.runner import evaluate_checkpoint

        acc = evaluate_checkpoint(model=args.model, checkpoint=args.checkpoint, data=args.data,
                                  image_size=args.image_size, quiet=args.quiet,
                                  device=args.device)
        from .models.segmentation import is_segmentation_model

        label = "val mIoU" if is_segmentation_model(args.model) else "val accuracy"
        print(f"{label} {100 * acc:.2f}% ({args.model}, {args.checkpoint}, {args.data})")
        return 0

    p.set_defaults(func=run)


def _compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="table and plot of several finetune runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finetune --out folders")
    p.add_argument("--out", default="compare.png", help="PNG file for the plot")

    def run(args: argparse.Namespace) -> int:
        from .compare import compare_runs

        return compare_runs(args.runs, out=args.out)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo(sub)
    _bench(sub)
    _finetune(sub)
    _evaluate(sub)
    _compare(sub)
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

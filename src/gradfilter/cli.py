"""The ``gradfilter`` command. Nothing imports this module; it only dispatches to the library."""

from __future__ import annotations

import argparse
import sys

from .methods import METHODS


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


# bench step's input presets: (batch or None for the device's default, image size)
STEP_PROFILES: dict[str, tuple[int | None, int]] = {"default": (None, 224), "pi": (8, 128)}


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: vanilla vs filtered, alternating, same process")
    p.add_argument("suite", choices=["layers", "step", "executorch"],
                   help="layers: the paper's per-layer configs; step: one training step of "
                        "real models (end to end); executorch: the training step inside the "
                        "ExecuTorch runtime (needs the executorch extra)")
    p.add_argument("--radii", default=None,
                   help="comma-separated radii (layers: 2,4; step: 4)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (layers: 8 on CPU, 32 on GPU; step: 16 on CPU, 32 on GPU)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per method")
    p.add_argument("--models", default="mobilenet_v2,resnet18,tf_efficientnet_lite0",
                   help="step: comma-separated model names")
    p.add_argument("--last", default="4,8", help="step: comma-separated 'last N blocks'")
    p.add_argument("--image-size", type=int, default=None, help="step: input size (224)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--channels-last", action="store_true",
                   help="step: run every model (vanilla included) in channels-last memory format")
    p.add_argument("--compile", action="store_true",
                   help="step: also run every method compiled (torch.compile, inductor), "
                        "with compiled vanilla and compiled forward-only as its baseline")
    p.add_argument("--compile-mode", default=None,
                   help="step: torch.compile mode with --compile (e.g. reduce-overhead: CUDA "
                        "graphs of the whole forward and backward on a GPU)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="step: comma-separated methods (vanilla, the baseline, always runs)")
    p.add_argument("--profile", choices=sorted(STEP_PROFILES), default=None,
                   help="step: a preset input shape (pi: 128x128, batch 8: what a Raspberry "
                        "Pi-class board trains); --batch and --image-size override it")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, i.e. the cores)")
    p.add_argument("--load", type=int, default=0,
                   help="CPU-bound processes spinning beside the benchmark (another job on the "
                        "same cores)")
    p.add_argument("--out", default=None, help="JSON file for the results (a PNG is written "
                                               "beside it)")

    def run(args: argparse.Namespace) -> int:
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.suite == "layers":
            from .bench.layers import run_layers
            from .machine import cpu_load

            radii = [int(r) for r in (args.radii or "2,4").split(",")]
            with cpu_load(args.load):
                return run_layers(radii=radii, batch=args.batch, repeats=args.repeats,
                                  device=args.device, out=args.out)
        if args.suite == "executorch":
            from .bench.runtime import run_runtime_bench

            radii = [int(r) for r in (args.radii or "4").split(",")]
            if len(radii) != 1:
                raise ValueError("bench executorch takes one radius")
            run_runtime_bench(models=args.models.split(","),
                              lasts=[int(n) for n in args.last.split(",")], radius=radii[0],
                              batch=args.batch or 8, size=args.image_size or 128,
                              repeats=args.repeats, out=args.out)
            return 0
        from .bench.step import run_step_bench

        radii = [int(r) for r in (args.radii or "4").split(",")]
        if len(radii) != 1:
            raise ValueError("bench step takes one radius")
        batch, size = STEP_PROFILES[args.profile or "default"]
        run_step_bench(models=args.models.split(","),
                       lasts=[int(n) for n in args.last.split(",")], radius=radii[0],
                       batch=args.batch or batch, size=args.image_size or size,
                       repeats=args.repeats, device=args.device, out=args.out,
                       channels_last=args.channels_last, compile=args.compile,
                       compile_mode=args.compile_mode, methods=args.methods.split(","),
                       threads=args.threads, load=args.load)
        return 0

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
    p.add_argument("--reinit-head", action="store_true",
                   help="start the classifier afresh instead of loading it from --checkpoint "
                        "(the data has another class set; reported in metrics.json)")
    p.add_argument("--data", required=True, help="digits, mnist5k, lfw_faces, "
                   "imagefolder:PATH, cifar10:PATH, cifar100:PATH; segmentation: "
                   "synthetic-seg, synthetic-seg-source, voc:PATH, cityscapes:PATH")
    p.add_argument("--image-size", type=int, default=64,
                   help="side of the square inputs the images are resized to (default: 64)")
    p.add_argument("--epochs", type=int, default=3,
                   help="passes over the training split (default: 3)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per training step (default: 32)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (default: 5e-4)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw or sgd (momentum 0.9), cosine learning-rate schedule; PyTorch's "
                        "fused step where it applies (default: adamw)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="vanilla (plain backprop), filtered (filtered convs, the paper), lean "
                        "(+ lean ReLU/BatchNorm), fused (+ fused blocks) (default: fused; "
                        "with --plan: filtered)")
    p.add_argument("--radius", type=int, default=2,
                   help="patch radius of the filtered methods (default: 2)")
    p.add_argument("--train-last", type=int, default=None,
                   help="number of last blocks to train, plus the classifier (default: 4; "
                        "with --plan: the plan's)")
    p.add_argument("--plan", default=None,
                   help="plan.json from `gradfilter plan`: its blocks and per-conv radii")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split's shuffling and the initialisation (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (the last complete epoch)")
    p.add_argument("--lean", choices=["exact", "patch", "frozen"], default=None,
                   help="BatchNorm mode of the lean layers (ReLU/ReLU6 keep bit masks, exact): "
                        "exact (saves x only for its weight grad), patch (weight grad from "
                        "patch sums at --radius; the lean and fused methods' default), frozen "
                        "(weight frozen, saves nothing); with vanilla or filtered it adds lean "
                        "layers to them")
    p.add_argument("--input-grad", choices=["filtered", "exact"], default="filtered",
                   help="filtered methods: the input gradient the filtered convs pass down, from "
                        "the patch-mean output gradient (filtered, the paper) or exact (same "
                        "memory, vanilla backward-input cost, for tasks whose accuracy needs it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor) before training: the filtered layers "
                        "trace their stop-gradient form (same gradients); the first steps pay "
                        "about a minute of compilation (docs/performance.md)")
    p.add_argument("--cache-features", action="store_true",
                   help="compute the frozen prefix's features once and train the last blocks "
                        "from that cache (inputs are never augmented here, so it is exact)")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                   help="storage of the feature cache (float16 halves its RAM)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and batches in channels-last memory format: the same math, "
                        "1.2-1.5x faster steps on CPUs (docs/performance.md)")
    p.add_argument("--runtime", choices=["pytorch", "executorch"], default="pytorch",
                   help="executorch: export the training step to OUT/train.pte and run every "
                        "step and evaluation in the ExecuTorch runtime (its SGD: needs "
                        "--optimizer sgd; constant learning rate; the executorch extra)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default=None,
                   help="learning rate per step (default: cosine; constant with --runtime "
                        "executorch, whose SGD has no schedule)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt and metrics.json")

    def run(args: argparse.Namespace) -> int:
        from .train.distributed import shutdown
        from .train.runner import finetune

        radius, method, train_last = args.radius, args.method, args.train_last
        if args.plan is not None:
            from .plan import load_plan

            plan = load_plan(args.plan)
            if plan.model and plan.model != args.model:
                raise ValueError(f"--plan {args.plan} was made for {plan.model}, "
                                 f"not {args.model}")
            if method == "vanilla" or train_last not in (None, plan.train_last):
                raise ValueError("--plan sets a filtered method and --train-last "
                                 f"{plan.train_last}; drop the conflicting flag")
            radius, method, train_last = dict(plan.layers), method or "filtered", plan.train_last
            if tuple(plan.input_shape[-2:]) != (args.image_size, args.image_size):
                print(f"note: the plan was made for {plan.input_shape[-2]}x"
                      f"{plan.input_shape[-1]} inputs, training at {args.image_size}",
                      file=sys.stderr)
        else:
            method = method or "fused"
            train_last = 4 if train_last is None else train_last
        try:
            m = finetune(
                model=args.model, data=args.data, out=args.out, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, method=method,
                radius=radius, train_last=train_last, pretrained=args.pretrained,
                checkpoint=args.checkpoint, image_size=args.image_size, seed=args.seed,
                optimizer=args.optimizer, resume=args.resume, quiet=args.quiet,
                device=args.device, cache_features=args.cache_features,
                cache_dtype=args.cache_dtype, lean=args.lean, reinit_head=args.reinit_head,
                input_grad=args.input_grad, channels_last=args.channels_last,
                compile=args.compile, lr_schedule=args.lr_schedule,
                runtime=None if args.runtime == "pytorch" else args.runtime,
            )
            shutdown()  # under torchrun: leave the process group cleanly
        except KeyboardInterrupt:
            print(f"gradfilter finetune: interrupted; continue with --resume --out {args.out}",
                  file=sys.stderr)
            return 130
        except ModuleNotFoundError as e:
            print(f"gradfilter finetune: error: {e}", file=sys.stderr)
            return 2
        radius = "" if m["radius"] is None else (
            " planned radii" if isinstance(m["radius"], dict) else f" r={m['radius']}")
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
    p.add_argument("--model", required=True, help="the model name the checkpoint was trained as")
    p.add_argument("--checkpoint", required=True,
                   help="a finetune checkpoint.pt or a plain state_dict file")
    p.add_argument("--data", required=True,
                   help="the data set whose validation split is scored (as finetune --data)")
    p.add_argument("--image-size", type=int, default=64,
                   help="input size, as in training (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
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


def _federated(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federated", help="federated fine-tuning on Flower's simulation engine: "
                                         "K clients, only the trainable parameters travel")
    p.add_argument("--model", required=True, help="a classification model (as finetune --model)")
    p.add_argument("--pretrained", action="store_true",
                   help="start from built-in offline weights (tf_efficientnet_lite0 only)")
    p.add_argument("--data", required=True, help="a built-in data set or kind:PATH")
    p.add_argument("--image-size", type=int, default=64, help="input size (default: 64)")
    p.add_argument("--clients", type=int, required=True, help="number of clients (SuperNodes)")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="how every client backpropagates (as finetune --method)")
    p.add_argument("--radius", type=int, default=4,
                   help="patch radius of the filtered methods (default: 4)")
    p.add_argument("--train-last", type=int, required=True,
                   help="number of last blocks to train (plus the classifier)")
    p.add_argument("--lean", choices=["exact", "patch", "frozen"], default=None,
                   help="lean BatchNorm mode (as finetune --lean)")
    p.add_argument("--local-epochs", type=int, default=1,
                   help="passes over its own shard per client and round (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="client batch size (default: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="client learning rate (default: 1e-3)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="client optimizer (default: adamw)")
    p.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg",
                   help="Flower's aggregation strategy (default: fedavg)")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    p.add_argument("--fraction-train", type=float, default=1.0,
                   help="fraction of clients sampled per round")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds the server waits for replies; late clients count as failed")
    p.add_argument("--fault", default="",
                   help="inject failures, e.g. raise:1@2 (client 1 raises in round 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the partition, the clients' shuffling and the model (default: 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel client workers (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, fewer Flower logs")
    p.add_argument("--out", required=True, help="run folder: metrics.json and the model")

    def run(args: argparse.Namespace) -> int:
        from .federated import run_simulation

        m = run_simulation({
            "model": args.model, "pretrained": args.pretrained, "data": args.data,
            "image-size": args.image_size, "num-clients": args.clients, "rounds": args.rounds,
            "partition": args.partition, "method": args.method, "radius": args.radius,
            "train-last": args.train_last, "lean": args.lean or "",
            "local-epochs": args.local_epochs,
            "batch-size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
            "strategy": args.strategy, "proximal-mu": args.proximal_mu,
            "fraction-train": args.fraction_train, "round-timeout": args.round_timeout,
            "fault": args.fault, "seed": args.seed, "out": args.out, "quiet": args.quiet,
        }, workers=args.workers)
        sent = [r["bytes_sent_by_clients"] / max(1, r["clients_ok"]) for r in m["rounds_log"]]
        print(f"{m['model']} {m['method']} on {m['data']}, {m['num_clients']} clients, "
              f"{m['rounds']} rounds ({m['flower_strategy']}): val accuracy "
              f"{100 * m['val_accuracy']:.2f}%, {m['total_failures']} failed client rounds")
        print(f"each client sends {sent[0] / 2**20:.3f} MiB per round (whole model "
              f"{m['full_model_bytes'] / 2**20:.3f} MiB)")
        print(f"wrote {args.out}/metrics.json")
        return 0

    p.set_defaults(func=run)


def _inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="gradient fidelity per layer and radius on real batches: "
                                       "cosine to the exact gradients, energy kept, costs")
    p.add_argument("--model", required=True, help="model name (as finetune --model)")
    p.add_argument("--pretrained", action="store_true",
                   help="built-in offline weights (tf_efficientnet_lite0 only)")
    p.add_argument("--checkpoint", default=None, help="state_dict or checkpoint.pt to load")
    p.add_argument("--data", required=True, help="data set whose training batches are used")
    p.add_argument("--image-size", type=int, default=64, help="input size (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default: 16)")
    p.add_argument("--batches", type=int, default=2,
                   help="batches whose gradients are compared (default: 2)")
    p.add_argument("--layers", default=None,
                   help="comma-separated conv or block names / globs (default: every conv)")
    p.add_argument("--train-last", type=int, default=None,
                   help="inspect the convs of the last N blocks")
    p.add_argument("--radii", default="2,4,7",
                   help="comma-separated patch radii to compare (default: 2,4,7)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default="runs/inspect/inspect.json",
                   help="JSON report (a PNG is written beside it)")

    def run(args: argparse.Namespace) -> int:
        from .diagnostics import run_inspect

        run_inspect(model=args.model, data=args.data, out=args.out,
                    layers=args.layers.split(",") if args.layers else None,
                    train_last=args.train_last, radii=_ints(args.radii, "--radii"),
                    batches=args.batches, batch_size=args.batch_size,
                    image_size=args.image_size, pretrained=args.pretrained,
                    checkpoint=args.checkpoint, quiet=args.quiet)
        return 0

    p.set_defaults(func=run)


def _plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose the blocks to train and each conv's radius under a "
                                    "memory / time budget; writes plan.json")
    p.add_argument("--model", required=True, help="model name (as finetune --model)")
    p.add_argument("--input-shape", required=True, help="B,C,H,W of a training batch")
    p.add_argument("--memory-budget", default=None,
                   help="bytes saved for backward per step, e.g. 20MB, 512KiB")
    p.add_argument("--time-budget", default=None, help="training step time, e.g. 300ms, 1.5s")
    p.add_argument("--radii", default="2,4,7", help="comma-separated radii to choose from")
    p.add_argument("--num-classes", type=int, default=10,
                   help="classifier size of the model to plan for")
    p.add_argument("--pretrained", action="store_true",
                   help="plan on the built-in offline weights (tf_efficientnet_lite0 only)")
    p.add_argument("--checkpoint", default=None, help="state_dict file to plan on")
    p.add_argument("--data", default=None,
                   help="measure fidelity on this data set's first batch (default: random)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps per calibration config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for a model without weights and the synthetic batch")
    p.add_argument("--out", default="plan.json",
                   help="plan file to write (JSON; finetune --plan and gradfilter.apply read it)")

    def run(args: argparse.Namespace) -> int:
        from .plan.command import parse_shape, run_plan

        run_plan(model=args.model, input_shape=parse_shape(args.input_shape), out=args.out,
                 memory_budget=args.memory_budget, time_budget=args.time_budget,
                 radii=_ints(args.radii, "--radii"), num_classes=args.num_classes,
                 pretrained=args.pretrained, checkpoint=args.checkpoint, data=args.data,
                 repeats=args.repeats, quiet=args.quiet, seed=args.seed)
        return 0

    p.set_defaults(func=run)


def _export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the (filtered) training step of a model to an "
                                      "ExecuTorch program (.pte) for on-device training")
    p.add_argument("--model", required=True, help="a classification model (as finetune --model)")
    p.add_argument("--pretrained", action="store_true",
                   help="built-in offline weights (tf_efficientnet_lite0 only)")
    p.add_argument("--checkpoint", default=None, help="state_dict or checkpoint.pt to start from")
    p.add_argument("--num-classes", type=int, required=True, help="classifier size")
    p.add_argument("--train-last", type=int, default=4,
                   help="number of last blocks to train, plus the classifier (default: 4)")
    p.add_argument("--method", choices=METHODS, default="filtered",
                   help="backward of the trained blocks (as finetune --method; default: "
                        "filtered)")
    p.add_argument("--radius", type=int, default=2, help="patch radius (default: 2)")
    p.add_argument("--lean", choices=["exact", "patch", "frozen"], default=None,
                   help="lean BatchNorm mode (as finetune --lean)")
    p.add_argument("--input-shape", required=True,
                   help="B,C,H,W of a training batch (the program's fixed shape)")
    p.add_argument("--out", default="train.pte", help="the program file (default: train.pte)")

    def run(args: argparse.Namespace) -> int:
        from .plan.command import parse_shape
        from .runtime.executorch import export_model

        try:
            prog = export_model(model=args.model, num_classes=args.num_classes,
                                input_shape=parse_shape(args.input_shape),
                                train_last=args.train_last, method=args.method,
                                radius=args.radius, lean=args.lean, pretrained=args.pretrained,
                                checkpoint=args.checkpoint, out=args.out)
        except ModuleNotFoundError as e:
            print(f"gradfilter export: error: {e}", file=sys.stderr)
            return 2
        planned = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in prog.planned_bytes.items())
        print(f"wrote {prog.path} ({prog.size_bytes / 2**20:.1f} MiB; planned memory: "
              f"{planned})")
        return 0

    p.set_defaults(func=run)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradfilter", description=__doc__)
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                        help="CPU memory: 'tuned' keeps freed blocks for reuse instead of "
                             "faulting in fresh pages every step (glibc; see "
                             "gradfilter.tune_cpu_allocator), 'default' leaves malloc as it is")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo(sub)
    _bench(sub)
    _finetune(sub)
    _evaluate(sub)
    _compare(sub)
    _federated(sub)
    _inspect(sub)
    _plan(sub)
    _export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .platform_check import platform_warnings

    for line in platform_warnings():
        print(f"gradfilter: warning: {line}", file=sys.stderr)
    if args.allocator == "tuned":
        from .allocator import tune_cpu_allocator

        tune_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"gradfilter {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``gradfilter`` command's finetune / evaluate / compare subcommands, run in-process."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

from gradfilter.cli import main  # noqa: E402
from gradfilter.train import runner  # noqa: E402

METRIC_KEYS = {
    "val_accuracy", "epochs", "step_time_ms", "saved_activation_bytes", "method", "radius",
    "train_last", "blocks", "model", "data", "seed", "machine", "history",
}
CKPT_KEYS = {"format", "epoch", "model", "optimizer", "scheduler", "rng", "config", "history"}


def _args(out, *, epochs=2, method="filtered", extra=()):
    return [
        "finetune", "--model", "resnet18", "--data", "digits", "--image-size", "32",
        "--epochs", str(epochs), "--batch-size", "64", "--lr", "1e-3", "--method", method,
        "--radius", "2", "--train-last", "1", "--seed", "0", "--quiet", "--out", str(out),
        *extra,
    ]


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 2-epoch gradfilter run, the reference for resume."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(_args(out)) == 0
    return out


def test_finetune_writes_metrics_and_loadable_checkpoint(full_run):
    m = _metrics(full_run)
    assert METRIC_KEYS <= set(m)
    assert m["epochs"] == 2 and len(m["history"]) == 2
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["method"] == "filtered" and m["radius"] == 2 and m["train_last"] == 1
    assert m["blocks"] == ["layer4.1"] and m["model"] == "resnet18" and m["data"] == "digits"
    assert 0.0 <= m["val_accuracy"] <= 1.0
    assert m["step_time_ms"] > 0 and m["saved_activation_bytes"] > 0
    assert m["machine"]["torch"] == torch.__version__
    ckpt = torch.load(full_run / "checkpoint.pt", weights_only=True)
    assert CKPT_KEYS <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"]["method"] == "filtered"
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    assert not list(full_run.glob(".*.tmp"))  # no temp files left behind


def test_finetune_refuses_to_overwrite_without_resume(full_run, capsys):
    assert main(_args(full_run)) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_after_interruption_matches_uninterrupted_run(full_run, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real_save = runner.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        raise RuntimeError("killed after epoch 1")

    monkeypatch.setattr(runner, "save_atomic", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        main(_args(out))
    monkeypatch.setattr(runner, "save_atomic", real_save)
    assert not (out / "metrics.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1

    assert main(_args(out, extra=["--resume"])) == 0
    m, ref = _metrics(out), _metrics(full_run)
    assert m["epochs"] == 2 and m["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["steps"] == ref["steps"]
    # Same weights, same data order and RNG: the resumed run ends where the full one did.
    assert [h["train_loss"] for h in m["history"]] == pytest.approx(
        [h["train_loss"] for h in ref["history"]], rel=1e-5)
    assert m["val_accuracy"] == pytest.approx(ref["val_accuracy"], abs=1e-6)
    a, b = _weights(out), _weights(full_run)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_a_random_start_is_noted(tmp_path, capsys):
    """Fine-tuning the last blocks of a network whose frozen layers are random is allowed but
    never silent; a start from weights is not noted."""
    assert main(_args(tmp_path / "random", epochs=1, method="vanilla")) == 0
    assert "starts from random weights" in capsys.readouterr().err
    start = tmp_path / "start.pt"
    torch.save(_weights(tmp_path / "random"), start)
    assert main(_args(tmp_path / "from", epochs=1, method="vanilla",
                      extra=["--checkpoint", str(start)])) == 0
    assert "random weights" not in capsys.readouterr().err


def test_resume_extends_a_shorter_run(tmp_path, capsys):
    out = tmp_path / "extend"
    assert main(_args(out, epochs=1, method="vanilla")) == 0
    assert _metrics(out)["epochs"] == 1
    assert main(_args(out, epochs=2, method="vanilla", extra=["--resume"])) == 0
    m = _metrics(out)
    assert m["epochs"] == 2 and len(m["history"]) == 2 and m["resumed_from_epoch"] == 1
    assert "epochs=2" in capsys.readouterr().err  # noted: the schedule was for 1 epoch

    # A config that matters (method here) must match the checkpoint's.
    assert main(_args(out, epochs=3, method="filtered", extra=["--resume"])) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "method" in err


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "corrupt"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 this is not a zip file")
    assert main(_args(out, extra=["--resume"])) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "Traceback" not in err
    assert "weights_only=False" not in err and len(err.strip().splitlines()) == 1


def test_out_naming_a_file_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert main(_args(out)) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is a file" in err and "Traceback" not in err
    assert out.read_text() == "keep me"


def test_finetune_needs_only_model_data_and_out():
    """The documented defaults: a newcomer's first command runs."""
    from gradfilter.cli import build_parser

    args = build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--out", "o"])
    assert (args.epochs, args.batch_size, args.lr, args.optimizer, args.radius,
            args.image_size) == (3, 32, 5e-4, "adamw", 2, 64)
    assert args.method is None and args.train_last is None  # the command fills fused / 4


def test_truncated_checkpoint_is_one_clear_error(full_run, tmp_path, capsys):
    out = tmp_path / "truncated"
    out.mkdir()
    data = (full_run / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert main(_args(out, extra=["--resume"])) == 2
    assert str(out / "checkpoint.pt") in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--data", "imagefolder:/nonexistent/gradfilter-data"], "/nonexistent/gradfilter-data"),
    (["--model", "no_such_model_xyz"], "unknown model"),
    (["--model", "resnet18", "--pretrained"], "no offline pretrained weights"),
    (["--train-last", "999"], "train_last"),
])
def test_bad_inputs_exit_2_without_traceback(tmp_path, capsys, argv, needle):
    args = _args(tmp_path / "bad")
    for flag, value in zip(argv[::2], argv[1::2]):
        args[args.index(flag) + 1] = value
    if "--pretrained" in argv:
        args.append("--pretrained")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_evaluate_finetune_checkpoint_and_plain_state_dict(full_run, tmp_path, capsys):
    acc = _metrics(full_run)["val_accuracy"]
    base = ["evaluate", "--model", "resnet18", "--data", "digits", "--image-size", "32",
            "--quiet", "--checkpoint"]
    assert main([*base, str(full_run / "checkpoint.pt")]) == 0
    assert f"{100 * acc:.2f}%" in capsys.readouterr().out

    plain = tmp_path / "plain.pt"
    torch.save(_weights(full_run), plain)
    assert main([*base, str(plain)]) == 0
    assert f"{100 * acc:.2f}%" in capsys.readouterr().out

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main([*base, str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_compare_prints_table_and_writes_png(full_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    m = _metrics(full_run)
    m.update(method="vanilla", radius=None, saved_activation_bytes=2 * m["saved_activation_bytes"])
    (other / "metrics.json").write_text(json.dumps(m))
    png = tmp_path / "cmp.png"
    assert main(["compare", str(full_run), str(other), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    for word in ("method", "radius", "train_last", "val_accuracy", "step_time_ms", "saved MiB",
                 "filtered", "vanilla"):
        assert word in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = tmp_path / "empty"
    missing.mkdir()
    assert main(["compare", str(full_run), str(missing), "--out", str(png)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_compare_shortens_planned_radii_and_tells_like_runs_apart():
    """A planned run's per-conv radii become one short label (table and plot), fused blocks are
    named, and runs whose settings read the same are told apart by their folder."""
    from gradfilter.compare import format_table, plot_labels

    base = {"method": "fused", "train_last": 3, "val_accuracy": 0.9, "step_time_ms": 30.0,
            "saved_activation_bytes": 2**20, "lean": "exact", "fused_blocks": ["blocks.6.0"]}
    rows = [{**base, "run": "runs/a", "radius": {"blocks.5.3.conv_pw": 7, "conv_head": 7}},
            {**base, "run": "runs/b", "radius": {"blocks.5.3.conv_pw": 2, "conv_head": 7}},
            {**base, "run": "runs/c", "radius": 4},
            {**base, "run": "runs/d", "radius": 4}]
    table = format_table(rows)
    assert "plan 7" in table and "plan 2-7" in table and "conv_head" not in table
    labels = plot_labels(rows)
    assert labels[0] == "fused r=plan 7 lean exact last 3"
    assert labels[1] == "fused r=plan 2-7 lean exact last 3"
    assert labels[2:] == ["c: fused r=4 lean exact last 3", "d: fused r=4 lean exact last 3"]
    legacy = {**base, "method": "gradfilter", "lean": "patch", "radius": 4}  # a 0.1 run
    assert plot_labels([legacy]) == ["gradfilter r=4 lean patch fused last 3"]


def test_finetune_input_grad_exact_is_recorded_and_applied(full_run, tmp_path):
    out = tmp_path / "exact"
    assert main(_args(out, epochs=1, extra=["--input-grad", "exact"])) == 0
    m = _metrics(out)
    assert m["input_grad"] == "exact" and m["filtered_layers"]
    assert _metrics(full_run)["input_grad"] == "filtered"
    # exact input gradients need no extra saved tensors (the weight is a parameter)
    assert m["saved_activation_bytes"] == _metrics(full_run)["saved_activation_bytes"]


def test_every_cli_option_says_what_it_does():
    """Each option of each subcommand has help text (``gradfilter X --help`` is the manual)."""
    import argparse

    from gradfilter.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in subs.choices.items()
               for a in sp._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing


def test_cuda_torch_on_an_armv8_0_core_is_warned_with_the_remedy(tmp_path):
    """The combination that dies with SIGILL (a CUDA-build aarch64 torch on a core without
    ARMv8.1 atomics, e.g. a Raspberry Pi 4) is named before it crashes; others are not."""
    from gradfilter.platform_check import platform_warnings

    a72 = tmp_path / "a72"
    a72.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n")
    a76 = tmp_path / "a76"
    a76.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes atomics fphp asimdhp\n")
    (warning,) = platform_warnings("aarch64", True, a72)
    assert "SIGILL" in warning and "pip install torch==2.9.1 torchvision==0.24.1" in warning
    assert platform_warnings("aarch64", True, a76) == []
    assert platform_warnings("aarch64", False, a72) == []
    assert platform_warnings("x86_64", True, a72) == []

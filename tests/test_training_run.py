"""End-to-end training runs on tiny synthetic data: run folder, checkpoints, resume after SIGKILL, seeds, DDP."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import medseg
from medseg.atomic import host_tag
from medseg.errors import MedsegError
from medseg.checkpoint import load_checkpoint
from medseg.training.config import load_pipeline
from medseg.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"synthetic": {"cases": 5, "shape": [40, 36, 32], "seed": 1}, "label_scheme": "brats", "val_fold": 0, "workers": 0},
    "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}},
    "sampling": {"patch_size": [24, 24, 16], "batch_size": 2},
    # the CPU, also on a machine with a GPU: resumed and uninterrupted runs are compared bit for bit, and cuDNN's
    # kernels are not deterministic
    "training": {"epochs": 2, "iterations_per_epoch": 3, "threads": 1, "device": "cpu"},
    "inference": {"roi_size": [24, 24, 16], "overlap": 0.0, "sw_batch_size": 4},
}


def _pipeline(tmp_path: Path, **overrides) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in overrides.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _epochs(run: Path) -> list[int]:
    with open(run / "metrics.csv") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


def test_run_folder_holds_what_predict_needs(tmp_path):
    pipeline = _pipeline(tmp_path, inference__sigma_scale=0.25, inference__skip_empty=False, inference__device="cpu")
    result = train(load_pipeline(pipeline), run_dir=tmp_path / "run", progress=False)
    run = Path(result["run_dir"])
    assert (run / "pipeline.yaml").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert _epochs(run) == [1, 2]
    for name in ("best", "last"):
        ckpt = torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)  # loads without pickled code
        assert ckpt["format"] == "medseg-checkpoint"
        assert ckpt["model"]["name"] == "unet" and ckpt["model"]["in_channels"] == 4 and ckpt["model"]["out_channels"] == 3
        assert ckpt["label_scheme"]["name"] == "brats" and ckpt["target"] == "regions"
        assert ckpt["preprocessing"]["orientation"] == "RAS" and ckpt["inference"]["roi_size"] == [24, 24, 16]
        assert ckpt["channels"] == ["flair", "t1", "t1ce", "t2"]
        # every inference setting of the pipeline reaches medseg predict, except where it runs
        assert ckpt["inference"]["sigma_scale"] == 0.25 and ckpt["inference"]["skip_empty"] is False
        assert "device" not in ckpt["inference"] and list(ckpt["inference"]["largest_component"]) == []
    from medseg.inference.loading import load_model, settings_for

    infer, _ = settings_for(load_model(run))
    assert (infer.sigma_scale, infer.skip_empty, infer.device, infer.roi_size) == (0.25, False, "auto", (24, 24, 16))
    from medseg.models import build_from_config

    model = build_from_config(ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    row = result["history"][-1]
    assert {"train_loss", "lr", "dice_WT", "dice_TC", "dice_ET", "dice_mean", "patches_per_s"} <= set(row)


def test_existing_run_needs_resume_and_finished_run_needs_extend(tmp_path):
    pipeline = load_pipeline(_pipeline(tmp_path, training__epochs=1))
    train(pipeline, run_dir=tmp_path / "run", progress=False)
    with pytest.raises(MedsegError, match="add --resume"):
        train(pipeline, run_dir=tmp_path / "run", progress=False)
    again = train(pipeline, run_dir=tmp_path / "run", resume=True, progress=False)
    assert again["epochs"] == 1  # finished: nothing more without --extend-epochs
    longer = train(pipeline, run_dir=tmp_path / "run", resume=True, extend_epochs=2, progress=False)
    assert longer["epochs"] == 2 and _epochs(tmp_path / "run") == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epochs"] == 2


def test_a_warm_start_begins_from_the_weights_of_the_same_fold_of_the_given_run(tmp_path):
    from medseg.training.run import Run, RunOptions

    source = tmp_path / "stage1"  # a CV folder: the run validating on fold 1 starts from its fold_1
    for fold in (0, 1):
        train(load_pipeline(_pipeline(tmp_path, training__epochs=1, data__val_fold=fold), [f"seed={fold}"]),
              run_dir=source / f"fold_{fold}", progress=False)
    warm = load_pipeline(_pipeline(tmp_path, data__val_fold=1, training__init_from="stage1"))  # relative to the file
    weights = Run.build(warm, RunOptions(tmp_path / "warm", progress=False)).step.bare_model.state_dict()
    started = json.loads((tmp_path / "warm" / "history.jsonl").read_text().splitlines()[0])
    assert started["event"] == "start" and started["init_from"] == str(source.resolve() / "fold_1" / "checkpoints" / "last.pt")
    expected = load_checkpoint(source / "fold_1" / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    other = load_checkpoint(source / "fold_0" / "checkpoints" / "last.pt")["state_dict"]
    assert not all(torch.equal(weights[k], other[k]) for k in other)
    cold = Run.build(load_pipeline(_pipeline(tmp_path, data__val_fold=1)), RunOptions(tmp_path / "cold", progress=False))
    assert not all(torch.equal(cold.step.bare_model.state_dict()[k], expected[k]) for k in expected)
    wider = load_pipeline(_pipeline(tmp_path, data__val_fold=1, training__init_from="stage1"),
                          ["model.kwargs.channels=[8,16,32]"])
    with pytest.raises(MedsegError, match=r"init_from .*fold_1.*kwargs\.channels: \[4, 8, 16\] there, \[8, 16, 32\] here"):
        Run.build(wider, RunOptions(tmp_path / "wider", progress=False))
    untrained = load_pipeline(_pipeline(tmp_path, data__val_fold=1, training__init_from="stage2"))
    with pytest.raises(MedsegError, match=r"init_from .*stage2: no trained run there \(nor its fold_1\); train it first"):
        Run.build(untrained, RunOptions(tmp_path / "untrained", progress=False))


def test_same_seed_same_first_epoch_loss(tmp_path):
    pipeline = load_pipeline(_pipeline(tmp_path, training__epochs=1))
    a = train(pipeline, run_dir=tmp_path / "a", progress=False)
    b = train(pipeline, run_dir=tmp_path / "b", progress=False)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    other = load_pipeline(_pipeline(tmp_path, training__epochs=1), ["seed=4"])
    c = train(other, run_dir=tmp_path / "c", progress=False)
    assert c["history"][0]["train_loss"] != a["history"][0]["train_loss"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# Resume must give the run that never stopped. Dropout makes the result depend on the torch RNG state (patches are a
# pure function of seed, epoch and index, so without it a lost RNG state would go unnoticed); amp off, because fp32 on
# the CPU with one thread repeats every operation in the same order: the runs agree to rounding (in practice bit for
# bit), and atol 1e-5 only leaves room for a different kernel choice. Under bf16 each product keeps 8 bits of
# mantissa, so such a difference grows to ~1e-2 within a few steps and no tolerance would separate it from a bug.
# (The U-Net applies dropout in residual units only: num_res_units 1.)
RESUMABLE = {"model__kwargs": {**TINY["model"]["kwargs"], "num_res_units": 1, "dropout": 0.2}, "training__amp": "off"}


def _assert_same_training(run: Path, reference: Path) -> None:
    """Same epochs, same per-epoch training loss and the same weights in checkpoints/last.pt."""
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (run, reference))
    assert a["epoch"] == b["epoch"] and [row["epoch"] for row in a["history"]] == [row["epoch"] for row in b["history"]]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert [row["train_loss"] for row in a["history"]] == pytest.approx([row["train_loss"] for row in b["history"]], rel=1e-6, abs=1e-6)


def test_resume_after_a_shorter_run_equals_the_uninterrupted_run(tmp_path):
    """1 epoch, then --resume --extend-epochs 3: optimiser moments, RNG state and LR schedule carry over."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = load_pipeline(_pipeline(tmp_path / "a", training__epochs=3, **RESUMABLE))
    medseg.train(straight, run_dir=tmp_path / "straight", progress=False)
    short = load_pipeline(_pipeline(tmp_path / "b", training__epochs=1, **RESUMABLE))
    medseg.train(short, run_dir=tmp_path / "stopped", progress=False)
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["epoch"] == 1
    medseg.train(short, run_dir=tmp_path / "stopped", resume=True, extend_epochs=3, progress=False)
    _assert_same_training(tmp_path / "stopped", tmp_path / "straight")


def test_sigkill_mid_epoch_then_resume(tmp_path):
    pipeline = _pipeline(tmp_path, training__epochs=4, training__iterations_per_epoch=12, **RESUMABLE)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medseg", "train", str(pipeline), "--output", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not last.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        assert last.exists(), "no checkpoint within 120 s"
        time.sleep(0.3)  # epoch 2 is running now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = load_checkpoint(last)["epoch"]
    assert 1 <= done < 4, "the kill must land before the run finished"
    # metrics.csv is written after the checkpoint: a kill between the two leaves it one epoch behind
    assert _epochs(run) in (list(range(1, done + 1)), list(range(1, done)))
    # A kill during a checkpoint write leaves the killed process's temporary file (last.pt stays whole); make that
    # case certain instead of a matter of timing: --resume must remove it.
    (last.parent / f".last.pt.{host_tag()}-{proc.pid}.abcd1234.part.pt").write_bytes(b"half a checkpoint")
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.rglob("*.part*")), "a temporary file was left behind"
    assert _epochs(run) == [1, 2, 3, 4]  # no gap, no duplicate
    assert load_checkpoint(last)["epoch"] == 4
    medseg.train(load_pipeline(pipeline), run_dir=tmp_path / "straight", progress=False)  # the same pipeline, never stopped
    _assert_same_training(run, tmp_path / "straight")


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed port fails when another run, or one still closing, holds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_cpu_ranks_end_identical(tmp_path):
    """Two gloo ranks through the real trainer, with the batch Dice gathered across them (medseg.losses.AcrossRanks;
    its gradients are checked in test_losses.py): both end with the same weights."""
    pipeline = _pipeline(tmp_path, training__epochs=1, training__iterations_per_epoch=4, loss__batch_dice=True)
    out = tmp_path / "weights"
    script = ROOT / "tests" / "ddp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(pipeline), str(tmp_path / "run"), str(out)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    initial = torch.load(out / "initial.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    assert any(not torch.equal(w0[k], initial[k]) for k in w0), "training changed nothing"
    assert _epochs(tmp_path / "run") == [1]


@pytest.mark.parametrize("model, dims, kwargs, patch, extra", [
    ("segresnet_vae", 3, {"init_filters": 4, "vae_input_size": [24, 24, 16], "latent_dim": 8}, [24, 24, 16], {}),
    ("unetpp", 2, {"channels": [4, 8, 16], "deep_supervision": True}, [32, 32], {"loss": {"deep_supervision": True}}),
    ("dynunet", 3, {"filters": [4, 8, 16], "strides": [1, 2, 2], "kernel_size": [3, 3, 3]}, [24, 24, 16],
     {"loss": {"deep_supervision": True}, "data": {"target": "labels"}}),
    ("unet", 3, {"channels": [4, 8, 8, 8], "strides": [2, 2, 2], "num_res_units": 0}, [24, 24, 16],
     {"loss": {"deep_supervision": True}}),
])
def test_vae_deep_supervision_and_2d_models_train(tmp_path, model, dims, kwargs, patch, extra):
    """The same trainer runs the VAE regulariser, deep supervision and a 2D model on slices of the volumes."""
    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["model"] = {"name": model, "spatial_dims": dims, "kwargs": kwargs}
    data["sampling"]["patch_size"] = patch
    data["inference"]["roi_size"] = patch
    data["training"].update({"epochs": 1, "iterations_per_epoch": 2})
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    result = train(load_pipeline(path), run_dir=tmp_path / "run", progress=False)
    row = result["history"][0]
    assert math.isfinite(row["train_loss"]) and "dice_mean" in row
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]["spatial_dims"] == dims


def test_vae_regulariser_enters_the_training_loss(tmp_path):
    from medseg.training.steps import ModelStep

    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["model"] = {"name": "segresnet_vae", "spatial_dims": 3, "kwargs": {"init_filters": 4, "vae_input_size": [16, 16, 16], "latent_dim": 4}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    seg_only = torch.nn.Module()
    seg_only.forward = lambda out, y: torch.zeros(())  # isolate the regulariser
    x, y = torch.randn(1, 4, 16, 16, 16), torch.zeros(1, 3, 16, 16, 16)
    losses = []
    for weight in (0.0, 1.0, 2.0):
        pipeline = load_pipeline(path, [f"loss.vae_weight={weight}"])
        torch.manual_seed(0)
        step = ModelStep.build(pipeline, 4, 3, torch.device("cpu"))
        losses.append(float(step.loss(x, y, seg_only).detach()))
    assert losses[0] == 0.0 and losses[1] > 0 and losses[2] == pytest.approx(2 * losses[1], rel=1e-5)


def test_tiny_unet_overfits_one_case(tmp_path):
    """The model learns at all: trained on one small case, it segments that case (validated on the same files)."""
    from medseg.data.manifest import Case, Manifest, read_manifest, write_manifest
    from medseg.data.synthetic import SyntheticSpec, generate_dataset

    source = read_manifest(generate_dataset(tmp_path / "data", n_cases=1, spec=SyntheticSpec(shape=(32, 28, 24)), seed=0))
    case = source.cases[0]
    twice = Manifest(source.channels, (Case("train_copy", case.images, case.label, split="train"),
                                       Case("val_copy", case.images, case.label, split="val")), "brats")
    data = {
        "name": "overfit", "seed": 0,
        "data": {"manifest": str(write_manifest(twice, tmp_path / "manifest.csv")), "val_fold": None, "val_split": "val", "workers": 0},
        "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0}},
        "sampling": {"patch_size": [24, 20, 16], "batch_size": 2},  # about the whole cropped case
        "augmentation": {"enabled": False},
        "optimizer": {"lr": 0.01},
        # one thread: two threads on a busy two-core machine took 24-37 s instead of 5 s
        "training": {"epochs": 8, "iterations_per_epoch": 10, "val_interval": 8, "amp": "off", "threads": 1},
        "inference": {"roi_size": [24, 20, 16], "overlap": 0.0},
    }
    (tmp_path / "overfit.yaml").write_text(yaml.safe_dump(data))
    history = medseg.train(load_pipeline(tmp_path / "overfit.yaml"), run_dir=tmp_path / "run", progress=False)["history"]
    # measured: WT 0.98-1.00 after these 80 steps for data seeds 0-2 and model seeds 0-3; with the learning rate at 0,
    # or the loss multiplied by 0 before backward, WT stays at 0.11 (the initial guess)
    assert history[-1]["dice_WT"] >= 0.9, history[-1]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [row["train_loss"] for row in history]

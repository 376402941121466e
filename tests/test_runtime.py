"""One device and precision resolver for training, validation and inference."""
from __future__ import annotations

import pytest
import torch

from medseg import runtime
from medseg.errors import MedsegError
from medseg.inference import engine
from medseg.training.config import parse_pipeline


def test_one_vocabulary_everywhere():
    assert runtime.PRECISIONS == ("auto", "off", "bf16", "fp16")
    p = parse_pipeline({"data": {"synthetic": {"cases": 2}}, "training": {"amp": "bf16"}, "inference": {"amp": "off"}})
    assert (p.training.amp, p.inference.amp) == ("bf16", "off")
    for key in ("training.amp", "inference.amp"):
        section, name = key.split(".")
        with pytest.raises(MedsegError, match=f"{key}: 'on' is not valid"):
            parse_pipeline({"data": {"synthetic": {"cases": 2}}, section: {name: "on"}})


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_on_cpu_follows_the_hardware(monkeypatch, has_bf16):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if has_bf16 else None
    assert runtime.resolve_precision("auto", cpu).dtype == expected
    assert engine.autocast_dtype("auto", cpu) == expected  # inference resolves through the same function
    assert runtime.resolve_precision("off", cpu).dtype is None and runtime.resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert not runtime.resolve_precision("bf16", cpu).scaler


def test_fp16_needs_cuda_and_bad_devices_are_one_line_errors():
    with pytest.raises(MedsegError, match="fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(MedsegError, match="'gpu' is not valid"):
        runtime.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="CUDA is not available"):
            runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_more_ranks_than_gpus_is_a_clear_error_not_a_cuda_crash(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 is told what to change (CUDA would say 'invalid device
    ordinal' from deep inside the first copy)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(MedsegError, match=r"local rank 1\) would use cuda:1, but this machine has 1 CUDA device.*"
                                          r"--nproc_per_node 1.*training.device cpu"):
        runtime.resolve_device("auto", local_rank=1)
    with pytest.raises(MedsegError, match="'cuda:3', but this machine has 1 CUDA device"):
        runtime.resolve_device("cuda:3")


def test_a_rank_without_its_gpu_stops_before_joining_the_process_group(monkeypatch):
    """Under torchrun on a GPU machine the NCCL set-up names the missing GPU (seen on an H100 with 2 ranks)."""
    import torch.distributed as dist

    from medseg.training.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached with a missing GPU"))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("joined the process group"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(MedsegError, match=r"local rank 1\) would use cuda:1, but this machine has 1 CUDA device"):
        init_distributed("cuda")


def test_precision_autocast_context_runs_in_its_dtype():
    p = runtime.resolve_precision("bf16", torch.device("cpu"))
    with p.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and p.name == "bf16"
    with runtime.resolve_precision("off", torch.device("cpu")).autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32

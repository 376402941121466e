"""Contract tests generated from the model registry: every model x spatial_dims x declared test variant.

A model added with ``@register(...)`` is tested here without a new test: forward shape in train and eval,
finite gradients on every parameter it uses, config + state_dict round trip, and a clear error for an input
size it cannot take. Models are made tiny with the ``test_kwargs`` of their registry entry.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from medseg.errors import MedsegError
from medseg.models import (MODELS, TrainOutput, build_from_config, check_input_size, create_model, forward_train, list_models,
                           model_config)

IN_CHANNELS, OUT_CHANNELS, BATCH = 2, 3, 2
TARGET = {2: (64, 48), 3: (32, 24, 16)}  # a different size on every axis

CASES = [pytest.param(name, dims, k, id=f"{name}-{dims}d-v{k}")
         for name in list_models() if MODELS[name].task == "semantic" for dims in MODELS[name].spatial_dims
         for k in range(len(MODELS[name].test_variants))]


def build(name: str, dims: int, k: int) -> torch.nn.Module:
    entry = MODELS[name]
    torch.manual_seed(0)
    return create_model(name, dims, IN_CHANNELS, OUT_CHANNELS, **{**entry.test_kwargs, **entry.test_variants[k]})


def test_size(model: torch.nn.Module) -> tuple[int, ...]:
    """The target size rounded up to the model's rule, made distinct per axis where the rule allows."""
    sizes: list[int] = []
    for t, d, m in zip(TARGET[model.spatial_dims], model.size_divisor, model.min_size):
        s = max(m + (-m) % d, t + (-t) % d)
        while s in sizes:
            s += d
        sizes.append(s)
    return tuple(sizes)


test_size.__test__ = False  # a helper, not a test


def sample(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(BATCH, IN_CHANNELS, *test_size(model))


@pytest.mark.parametrize("name,dims,k", CASES)
def test_forward_shape_train_and_eval(name: str, dims: int, k: int) -> None:
    model = build(name, dims, k)
    x = sample(model)
    expected = (BATCH, OUT_CHANNELS, *x.shape[2:])
    out = model.train()(x)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == expected
    train_out = forward_train(model, x)
    assert isinstance(train_out, TrainOutput) and tuple(train_out.seg.shape) == expected
    for aux in train_out.aux:
        assert isinstance(aux, torch.Tensor) and aux.shape[:2] == out.shape[:2]
    assert bool(train_out.aux) == bool(getattr(model, "deep_supervision", False))
    assert not hasattr(model, "aux_outputs")  # nothing stored on the module: forward passes are re-entrant
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,dims,k", CASES)
def test_backward_reaches_every_used_parameter(name: str, dims: int, k: int) -> None:
    model = build(name, dims, k).train()
    x = sample(model)
    train_out = forward_train(model, x)
    out = train_out.seg
    weights = torch.randn_like(out)
    loss = (out * weights).mean()
    for aux in train_out.aux:
        loss = loss + aux.square().mean()
    if train_out.extra_loss is not None:
        loss = loss + train_out.extra_loss
    loss.backward()
    unused = tuple(getattr(model, "unused_in_forward", ()))
    checked = 0
    for pname, p in model.named_parameters():
        if not p.requires_grad or pname.startswith(unused) or any(f".{u}" in f".{pname}" for u in unused):
            continue
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("name,dims,k", CASES)
def test_config_and_state_dict_round_trip(name: str, dims: int, k: int) -> None:
    model = build(name, dims, k).eval()
    cfg = json.loads(json.dumps(model_config(model)))  # survives a JSON checkpoint
    assert cfg["name"] == name and cfg["spatial_dims"] == dims
    assert (cfg["in_channels"], cfg["out_channels"]) == (IN_CHANNELS, OUT_CHANNELS)
    torch.manual_seed(123)  # different random init: equality must come from the state_dict
    twin = build_from_config(cfg).eval()
    twin.load_state_dict(model.state_dict())
    x = sample(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,dims,k", [c for c in CASES if c.values[2] == 0])
def test_bad_input_size_names_a_valid_size(name: str, dims: int, k: int) -> None:
    model = build(name, dims, k).eval()
    good = test_size(model)
    bad = (good[0] + 1, *good[1:])
    with pytest.raises(MedsegError) as err:
        model(torch.zeros(1, IN_CHANNELS, *bad))
    message = str(err.value)
    assert str(bad) in message
    suggested = [tuple(int(v) for v in m.split(",")) for m in re.findall(r"use \(([\d, ]+)\)", message)
                 + re.findall(r"or \(([\d, ]+)\)", message)]
    assert suggested, message
    for size in suggested:
        check_input_size(model, size)  # every suggestion is accepted
    assert any(all(abs(a - b) <= d for a, b, d in zip(size, bad, model.size_divisor)) for size in suggested)

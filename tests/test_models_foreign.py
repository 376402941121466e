"""Other people's models: MONAI networks by name, a user's module, entry points, output adapters, size rules."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from medseg.errors import MedsegError
from medseg.models import (MODELS, build_from_config, check_input_size, create_model, forward_train, load_model_module,
                           model_config, register)
from medseg.models import registry

ROOT = Path(__file__).resolve().parents[1]
DYNUNET = {"kernel_size": [3, 3, 3], "strides": [1, 2, (2, 2, 1)], "upsample_kernel_size": [2, (2, 2, 1)], "filters": [4, 8, 8]}

USER_MODULE = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from medseg.models import register


    class TinyNet(nn.Module):
        """Somebody's network: a plain nn.Module with one pooling (so inputs must be even)."""

        def __init__(self, spatial_dims, in_channels, out_channels, width=4):
            super().__init__()
            conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
            self.enc = conv(in_channels, width, 3, padding=1)
            self.pool = (nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d)(2)
            self.mid = conv(width, width, 3, padding=1)
            self.out = conv(2 * width, out_channels, 1)

        def forward(self, x):
            e = torch.relu(self.enc(x))
            m = torch.relu(self.mid(self.pool(e)))
            m = nn.functional.interpolate(m, scale_factor=2, mode="nearest")
            return self.out(torch.cat([e, m], 1))


    @register("{name}", (2, 3), "a user's network")
    def tiny(spatial_dims, in_channels, out_channels, width=4):
        return TinyNet(spatial_dims, in_channels, out_channels, width)
''')


@pytest.fixture
def clean_registry():
    """Remove what a test registers (user modules, entry points) from the registry afterwards."""
    before, loaded = dict(MODELS), dict(registry._LOADED_MODULES)
    yield
    MODELS.clear()
    MODELS.update(before)
    registry._LOADED_MODULES.clear()
    registry._LOADED_MODULES.update(loaded)


def _write_module(folder: Path, name: str = "user_tiny_net") -> Path:
    path = folder / "my_models.py"
    path.write_text(USER_MODULE.replace("{name}", name))
    return path


# ----------------------------------------------------------------------------------------------- MONAI by name
def test_monai_dynunet_by_name_has_its_size_rule_and_deep_supervision():
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = create_model("monai:DynUNet", 3, 2, 3, **DYNUNET, deep_supervision=True)
    assert net.size_divisor == (4, 4, 2) and net.deep_supervision
    with pytest.raises(MedsegError, match=r"multiple of \(4, 4, 2\)"):
        check_input_size(net, (16, 16, 7))
    out = forward_train(net.train(), torch.randn(2, 2, 16, 12, 6))
    assert out.seg.shape == (2, 3, 16, 12, 6) and len(out.aux) == 1 and out.aux[0].shape == out.seg.shape
    assert net.eval()(torch.randn(1, 2, 16, 12, 6)).shape == (1, 3, 16, 12, 6)
    cfg = model_config(net)
    assert cfg["name"] == "monai:DynUNet" and "module" not in cfg
    twin = build_from_config(cfg).eval()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(1, 2, 16, 12, 6)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x))
        ref = DynUNet(3, 2, 3, **DYNUNET, deep_supervision=True).eval()
        ref.load_state_dict({k.removeprefix("net."): v for k, v in net.state_dict().items()})
        torch.testing.assert_close(ref(x), net(x))  # MONAI's network, unchanged


def test_monai_segresnet_vae_tuple_is_read_as_segmentation_and_loss():
    net = create_model("monai:SegResNetVAE", 3, 2, 3, input_image_size=[32, 32, 32], init_filters=8).train()
    out = forward_train(net, torch.randn(1, 2, 32, 32, 32))
    assert out.seg.shape == (1, 3, 32, 32, 32) and out.extra_loss is not None and out.extra_loss.ndim == 0
    with pytest.raises(MedsegError, match=r"fixed at build time, each axis must be exactly \(32, 32, 32\)"):
        net(torch.zeros(1, 2, 48, 48, 48))


def test_monai_transformers_by_name():
    unetr = create_model("monai:UNETR", 3, 2, 3, img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8)
    assert (unetr.size_divisor, unetr.min_size, unetr.max_size) == ((16,) * 3, (32,) * 3, (32,) * 3)
    assert unetr.eval()(torch.zeros(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    swin = create_model("monai:SwinUNETR", 3, 2, 3, feature_size=12)
    assert swin.size_divisor == (32,) * 3 and swin.min_size == (64,) * 3
    with pytest.raises(MedsegError, match="multiple of 32"):
        swin(torch.zeros(1, 2, 48, 64, 64))


def test_monai_names_errors():
    with pytest.raises(MedsegError, match=r"'monai:DynUnett' is not a network of monai.networks.nets \(did you mean"):
        create_model("monai:DynUnett", 3, 1, 2)
    with pytest.raises(TypeError, match="missing 3 required positional arguments"):
        create_model("monai:DynUNet", 3, 1, 2)
    with pytest.raises(MedsegError, match="MONAI refused the arguments"):
        create_model("monai:SegResNet", 3, 1, 2, init_filters=4)  # 4 channels, 8 groups


def test_monai_list_output_needs_its_adapter():
    with pytest.raises(MedsegError) as err:  # BasicUNetPlusPlus returns a list even without deep supervision
        create_model("monai:BasicUNetPlusPlus", 2, 2, 3, features=(4, 4, 8, 8, 16, 4), output="tensor")
    message = str(err.value)
    assert "returned a list of 1" in message and "aux_seg" in message and "seg_loss" in message
    net = create_model("monai:BasicUNetPlusPlus", 2, 2, 3, features=(4, 4, 8, 8, 16, 4), deep_supervision=True)
    out = forward_train(net.train(), torch.randn(2, 2, 32, 32))
    assert net.deep_supervision and len(out.aux) == 3


# ----------------------------------------------------------------------------------------------- plain modules
class _TupleNet(nn.Module):
    def __init__(self, spatial_dims, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.pool = nn.AvgPool2d(4)

    def forward(self, x):
        y = self.conv(x)
        return y, nn.functional.interpolate(self.pool(y), size=y.shape[2:])


def test_tuple_output_is_caught_when_the_model_is_built(clean_registry):
    register("tuple_net_plain", (2,))(_TupleNet)
    with pytest.raises(MedsegError, match=r"tuple_net_plain returned a tuple of 2 .* declare how to read"):
        create_model("tuple_net_plain", 2, 1, 2)
    register("tuple_net_adapted", (2,), output="seg_aux")(_TupleNet)
    net = create_model("tuple_net_adapted", 2, 1, 2)
    assert net.size_divisor == (2, 2) and "inferred" in net.size_note  # 3 (< the 4x4 pooling) fails, 6 and 10 work
    out = forward_train(net, torch.randn(1, 1, 8, 12))
    assert net.deep_supervision and len(out.aux) == 1 and out.seg.shape == (1, 2, 8, 12)
    with pytest.raises(MedsegError, match="output: 'tensr' is not a known output adapter"):
        register("bad_output", (2,), output="tensr")(_TupleNet)


def test_wrong_output_shape_is_an_error(clean_registry):
    register("half_net", (2,), size_divisor=2)(lambda spatial_dims, in_channels, out_channels: nn.Conv2d(in_channels, out_channels, 2, 2))
    with pytest.raises(MedsegError, match=r"half_net returned a tensor of shape \(2, 2, 4, 4\)"):
        create_model("half_net", 2, 1, 2)


def test_user_module_registers_and_is_recorded(tmp_path, clean_registry):
    path = _write_module(tmp_path)
    assert load_model_module(path) == ["user_tiny_net"]
    assert load_model_module(str(path)) == ["user_tiny_net"]  # loading twice does nothing
    assert MODELS["user_tiny_net"].source == str(path.resolve())
    net = create_model("user_tiny_net", 3, 2, 3, width=2)
    assert net.size_divisor == (2, 2, 2)
    cfg = model_config(net)
    assert cfg["module"] == str(path.resolve())
    # a new process (here: a registry without the model) rebuilds it from the config alone
    del MODELS["user_tiny_net"]
    registry._LOADED_MODULES.clear()
    twin = build_from_config(cfg)
    twin.load_state_dict(net.state_dict())
    moved = tmp_path / "elsewhere.py"
    path.rename(moved)
    del MODELS["user_tiny_net"]
    registry._LOADED_MODULES.clear()
    with pytest.raises(MedsegError, match="pass its current location with --model-module"):
        build_from_config(cfg)
    with pytest.raises(MedsegError, match="file not found"):
        load_model_module(tmp_path / "nothing.py")


def test_user_module_import_error_leaves_the_registry_clean(tmp_path, clean_registry):
    path = tmp_path / "broken.py"
    path.write_text("from medseg.models import register\n"
                    "register('half_registered')(lambda spatial_dims, in_channels, out_channels: None)\n"
                    "raise RuntimeError('boom')\n")
    with pytest.raises(MedsegError, match=r"importing it failed \(RuntimeError: boom\)"):
        load_model_module(path)
    assert "half_registered" not in MODELS


def test_entry_points_register_models(monkeypatch, clean_registry):
    calls = []

    class EntryPoint:
        name, value, module = "tiny", "my_pkg.models:register_all", "my_pkg.models"

        def load(self):
            def register_all():
                calls.append(1)
                register("ep_tiny_net", (2,), size_divisor=1)(
                    lambda spatial_dims, in_channels, out_channels: nn.Conv2d(in_channels, out_channels, 1))
            return register_all

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [EntryPoint()] if group == "medseg.models" else [])
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    assert "ep_tiny_net" in registry.list_models() and calls == [1]
    net = create_model("ep_tiny_net", 2, 1, 2)
    assert model_config(net)["module"] == "my_pkg.models"


def test_a_model_not_built_by_create_model_gets_a_clear_message():
    with pytest.raises(MedsegError, match="register it .* build it with create_model"):
        check_input_size(nn.Conv3d(1, 2, 3), (8, 8, 8))


def test_pipeline_names_monai_and_user_models(tmp_path, clean_registry):
    from medseg.training.config import parse_pipeline, choices

    base = {"data": {"synthetic": {"cases": 4}}, "sampling": {"patch_size": [16, 16, 8]}}
    p = parse_pipeline({**base, "model": {"name": "monai:DynUNet", "kwargs": DYNUNET}})
    assert p.model.name == "monai:DynUNet"
    with pytest.raises(MedsegError, match="model.name: 'monai:DynUNett' is not a network"):
        parse_pipeline({**base, "model": {"name": "monai:DynUNett"}})
    with pytest.raises(MedsegError, match="model.name: 'user_tiny_net' is not valid"):
        parse_pipeline({**base, "model": {"name": "user_tiny_net"}})
    _write_module(tmp_path)
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({**base, "model": {"name": "user_tiny_net", "module": "my_models.py"}}))
    from medseg.training.config import load_pipeline

    p = load_pipeline(tmp_path / "pipe.yaml")
    assert p.model_module == str((tmp_path / "my_models.py").resolve())
    assert p.to_dict(resolve_paths=True)["model"]["module"] == p.model_module
    assert "user_tiny_net" in choices()["model.name"]


# ----------------------------------------------------------------------------------------------- medseg train end to end
TINY = {
    "seed": 3,
    "data": {"synthetic": {"cases": 4, "shape": [40, 36, 32], "seed": 1}, "label_scheme": "brats", "val_fold": 0, "workers": 0},
    "sampling": {"patch_size": [24, 24, 16], "batch_size": 2},
    "training": {"epochs": 1, "iterations_per_epoch": 2, "threads": 1},
    "inference": {"roi_size": [24, 24, 16], "overlap": 0.0, "sw_batch_size": 4},
}


def _medseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-m", "medseg", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_medseg_train_a_monai_network_by_name(tmp_path):
    pipeline = {**TINY, "name": "tiny_monai", "loss": {"deep_supervision": True},
                "model": {"name": "monai:DynUNet", "spatial_dims": 3,
                          "kwargs": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                                     "filters": [4, 8, 8]}}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipeline))
    _medseg("train", "pipe.yaml", "--output", "run", "--no-progress", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model"]["name"] == "monai:DynUNet" and ckpt["model"]["kwargs"]["deep_supervision"] is True
    net = build_from_config(ckpt["model"])
    net.load_state_dict(ckpt["state_dict"])


def test_medseg_train_and_predict_a_users_module(tmp_path):
    _write_module(tmp_path, "my_tiny_net")
    pipeline = {**TINY, "name": "tiny_user", "model": {"name": "my_tiny_net", "spatial_dims": 3, "kwargs": {"width": 4}}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipeline))
    _medseg("train", "pipe.yaml", "--model-module", "my_models.py", "--output", "run", "--no-progress", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["model"]["module"] == str((tmp_path / "my_models.py").resolve())
    # predict in a new process rebuilds the model from the module the checkpoint names, without options
    out = _medseg("predict", "--model", "run", "--input", "run/data/manifest.csv", "--output", "preds", "--no-progress",
                  cwd=tmp_path)
    assert "4 prediction(s) written" in out.stdout

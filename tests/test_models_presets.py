"""Presets that reproduce the papers, MONAI-compatible layouts, and parameter counts pinned to published numbers.

Parameter counts are taken on the meta device (no memory, no compute). Published figures:
Çiçek 2016 (3D U-Net, 3 inputs, 3 labels): 19,069,955 — "The architecture has 19 069 955 parameters in total".
SegNet (Badrinarayanan 2017, Table 6): 29.5M. FCN-8s (Long 2015 / SegNet Table 6): 134M. DeconvNet (SegNet Table 6):
252M. UNet++ (Zhou 2018, Table 1): 9.04M with and without deep supervision. HRNetV2-W18: 9.6M and HRNetV2-W48: 65.9M
(Wang 2020, Cityscapes, 19 classes); HRNetV2-W48 + OCR (Yuan 2020): 70.3M.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models import build_from_config, create_model, model_config

ROOT = Path(__file__).resolve().parents[1]


def params(name: str, dims: int, cin: int, cout: int, **kw) -> int:
    with torch.device("meta"):
        model = create_model(name, dims, cin, cout, **kw)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- pinned counts
@pytest.mark.parametrize("name, dims, cin, cout, kwargs, published, tolerance", [
    ("unet", 3, 3, 3, {"preset": "cicek2016"}, 19_069_955, 0),           # exact
    ("segnet", 2, 3, 11, {}, 29.5e6, 0.05e6),
    ("fcn", 2, 3, 21, {"variant": "8s"}, 134e6, 0.5e6),
    ("deconvnet", 2, 3, 21, {}, 252e6, 0.5e6),
    ("unetpp", 2, 1, 1, {"preset": "zhou2018", "deep_supervision": True}, 9.04e6, 0.005e6),
    ("unetpp", 2, 1, 1, {"preset": "zhou2018"}, 9.04e6, 0.005e6),
    ("hrnet", 2, 3, 19, {"width": 18}, 9.6e6, 0.05e6),
    ("hrnet", 2, 3, 19, {"width": 48}, 65.9e6, 0.05e6),
    ("hrnet_ocr", 2, 3, 19, {"width": 48}, 70.3e6, 0.1e6),
])
def test_parameter_counts_match_the_papers(name, dims, cin, cout, kwargs, published, tolerance):
    assert abs(params(name, dims, cin, cout, **kwargs) - published) <= tolerance


def test_unchanged_defaults_keep_their_counts():
    """Defaults are not changed by the presets (existing pipelines and checkpoints keep their networks)."""
    assert params("unet", 3, 4, 3) == 6_865_621
    assert params("vnet", 3, 4, 3) == 65_188_323
    assert params("segresnet_vae", 3, 4, 3) == 26_034_135
    assert params("unetpp", 2, 3, 2) == 8_357_730


# ----------------------------------------------------------------------------------------------- unet
def test_cicek2016_layout_is_the_papers():
    model = create_model("unet", 3, 3, 3, preset="cicek2016", channels=(8, 16, 32, 64))
    convs = [m for m in model.down.modules() if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 32),
                                                                (32, 32), (32, 64)]  # doubled before each pooling
    assert all(isinstance(p, nn.MaxPool3d) for p in model.pools)
    assert all(isinstance(u, nn.ConvTranspose3d) and u.in_channels == u.out_channels for u in model.up)
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert model(torch.randn(1, 3, 16, 24, 8)).shape == (1, 3, 16, 24, 8)
    with pytest.raises(TypeError, match="unet preset 'cicek2016' does not take num_res_units; it takes channels, strides, norm"):
        create_model("unet", 3, 3, 3, preset="cicek2016", num_res_units=2)
    with pytest.raises(MedsegError, match="did you mean 'cicek2016'"):
        create_model("unet", 3, 3, 3, preset="cicek2061")


@pytest.mark.parametrize("dims, kwargs", [(3, {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 2}),
                                          (2, {"channels": (4, 8, 16, 32), "strides": (2, 2, 2), "num_res_units": 0}),
                                          (3, {"channels": (4, 8, 16), "strides": (2, (2, 2, 1)), "norm": "BATCH", "num_res_units": 1})])
def test_monai_preset_weights_load_into_monai_unet(dims, kwargs):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    ours = create_model("unet", dims, 2, 3, preset="monai", **kwargs).eval()
    ref = UNet(dims, 2, 3, **kwargs).eval()
    ref.load_state_dict(ours.state_dict())  # strict: the same weight names
    x = torch.randn(2, 2, *([16, 32, 8][:dims]))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_monai_preset_has_the_size_check_and_config():
    model = create_model("unet", 3, 1, 2, preset="monai", channels=(4, 8, 16), strides=(2, 2))
    assert model.size_divisor == (4, 4, 4)
    with pytest.raises(MedsegError, match="multiple of 4"):
        model(torch.zeros(1, 1, 18, 16, 16))
    twin = build_from_config(model_config(model))
    twin.load_state_dict(model.state_dict())


# ----------------------------------------------------------------------------------------------- vnet
def test_milletari2016_has_no_norm_and_repeats_the_input():
    model = create_model("vnet", 3, 2, 2, preset="milletari2016", base_channels=4, kernel_size=3)
    assert not any(isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm)) for m in model.modules())
    assert model.in_proj is None and model.input_residual == "repeat"
    assert any(isinstance(m, nn.PReLU) for m in model.modules())
    assert model(torch.randn(1, 2, 16, 32, 16)).shape == (1, 2, 16, 32, 16)
    with pytest.raises(MedsegError, match="base_channels % in_channels"):
        create_model("vnet", 3, 3, 2, preset="milletari2016")
    # paper figure: 1, 2, 3, 3 convolutions down, 3 at the bottom, 3, 3, 2, 1 up
    assert [len([m for m in s.body if isinstance(m, nn.Conv3d)]) for s in model.down_stacks] == [2, 3, 3, 3]
    assert [len([m for m in s.body if isinstance(m, nn.Conv3d)]) for s in model.up_stacks] == [3, 3, 2, 1]


def test_vnet_monai_preset_is_monai_vnet():
    from monai.networks.nets import VNet

    assert params("vnet", 3, 1, 2, preset="monai") == sum(p.numel() for p in VNet(3, 1, 2).parameters()) == 45_597_898
    torch.manual_seed(0)
    ours = create_model("vnet", 2, 2, 3, preset="monai").eval()
    ref = VNet(2, 2, 3).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- segresnet_vae
def test_myronenko2018_layers():
    model = create_model("segresnet_vae", 3, 4, 3, preset="myronenko2018", init_filters=8, vae_input_size=(32, 32, 32))
    assert isinstance(model.stem_dropout, nn.Dropout3d) and model.stem_dropout.p == 0.2  # spatial dropout 0.2
    assert len(model.head) == 1 and isinstance(model.head[0], nn.Conv3d)  # plain 1x1x1 output convolution
    assert model.latent_dim == 128 and model.kl_normalization == "voxels"
    assert (model.vae_l2_weight, model.vae_kl_weight) == (0.1, 0.1)
    assert model.vae_grid == (2, 2, 2)  # 32 / 16: exactly the paper's layout at this input size, no pooling
    default = create_model("segresnet_vae", 3, 4, 3, init_filters=8)
    assert isinstance(default.stem_dropout, nn.Identity) and default.kl_normalization == "latent"  # unchanged default


def test_kl_is_divided_by_the_number_of_voxels_in_the_paper_mode():
    x = torch.randn(2, 4, 32, 24, 16)
    mu, logvar = torch.randn(2, 128), torch.randn(2, 128) * 0.1
    terms = mu.pow(2) + logvar.exp() - logvar - 1
    paper = create_model("segresnet_vae", 3, 4, 3, init_filters=8, vae_input_size=32, kl_normalization="voxels",
                         vae_l2_weight=0.0, vae_kl_weight=1.0)
    latent = create_model("segresnet_vae", 3, 4, 3, init_filters=8, vae_input_size=32, vae_l2_weight=0.0, vae_kl_weight=1.0)
    torch.testing.assert_close(paper.vae_loss_terms(x, x, mu, logvar), terms.sum(1).mean() / (32 * 24 * 16))
    torch.testing.assert_close(latent.vae_loss_terms(x, x, mu, logvar), terms.mean())
    with pytest.raises(MedsegError, match="did you mean 'voxels'"):
        create_model("segresnet_vae", 3, 4, 3, kl_normalization="voxel")


def test_preset_in_a_pipeline_ties_the_vae_to_the_patch_and_picks_the_squared_dice():
    from medseg.training.config import parse_pipeline
    from medseg.training.steps import ModelStep

    data = {"data": {"synthetic": {"cases": 4}}, "sampling": {"patch_size": [32, 24, 16]},
            "model": {"name": "segresnet_vae", "kwargs": {"preset": "myronenko2018", "init_filters": 8}}}
    p = parse_pipeline(data)
    assert p.loss.name == "dice_squared"
    step = ModelStep.build(p, 4, 3, torch.device("cpu"))
    assert step.config["kwargs"]["vae_input_size"] == [32, 24, 16]  # recorded as a size: predict rebuilds the same net
    assert step.bare_model.vae_grid == (2, 1, 1)
    # "patch" asks for the same without a preset; an explicit size is kept
    data["model"]["kwargs"] = {"init_filters": 8, "vae_input_size": "patch"}
    assert ModelStep.build(parse_pipeline(data), 4, 3, torch.device("cpu")).config["kwargs"]["vae_input_size"] == [32, 24, 16]
    assert parse_pipeline(data).loss.name == "auto"  # no preset: the usual loss
    data["loss"] = {"name": "dice"}
    data["model"]["kwargs"] = {"preset": "myronenko2018", "init_filters": 8}
    assert parse_pipeline(data).loss.name == "dice"  # a named loss is kept
    with pytest.raises(MedsegError, match="filled in by 'medseg train'"):
        create_model("segresnet_vae", 3, 4, 3, vae_input_size="patch")


def test_existing_segresnet_vae_pipeline_is_unchanged():
    from medseg.training.config import load_pipeline
    from medseg.training.steps import ModelStep

    p = load_pipeline(ROOT / "pipelines" / "brats_segresnet_vae.yaml")
    assert p.loss.name == "dice" and "preset" not in p.model.kwargs
    with torch.device("meta"):
        step = ModelStep.build(p, 4, 3, torch.device("meta"))
    assert step.config["kwargs"] == {"init_filters": 32, "vae_input_size": [160, 192, 128], "vae_l2_weight": 0.1,
                                     "vae_kl_weight": 0.1}
    model = step.bare_model
    assert model.kl_normalization == "latent" and isinstance(model.stem_dropout, nn.Identity) and len(model.head) == 3


def test_squared_dice_loss_is_the_papers_formula():
    from medseg.losses import create_loss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8, 8), (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    p = torch.sigmoid(logits)
    dims = (2, 3, 4)
    dice = (2 * (p * target).sum(dims) + 1e-5) / (p.pow(2).sum(dims) + target.pow(2).sum(dims) + 1e-5)
    torch.testing.assert_close(create_loss("dice_squared", "regions")(logits, target), (1 - dice).mean())
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    assert torch.isfinite(create_loss("dice_squared", "labels")(torch.randn(2, 3, 8, 8), labels))


# ----------------------------------------------------------------------------------------------- new 2D/3D networks
@pytest.mark.parametrize("name, kwargs", [
    ("deconvnet", {"base_channels": 4, "fc_channels": 8}),
    ("refinenet", {"base_channels": 4, "features": (8, 4, 4, 4), "blocks": (1, 1, 1, 1)}),
    ("hrnet", {"width": 2, "stem_channels": 4, "blocks": 1, "modules": (1, 1, 1), "stage1_blocks": 1}),
    ("hrnet_ocr", {"width": 2, "stem_channels": 4, "blocks": 1, "modules": (1, 1, 1), "stage1_blocks": 1,
                   "ocr_channels": 8, "key_channels": 4}),
    ("danet", {"base_channels": 4, "blocks": (1, 1, 1, 1)}),
])
def test_new_networks_accept_one_class_and_batch_one_in_training(name, kwargs):
    model = create_model(name, 2, 3, 1, **kwargs).train()
    out = model.forward_train(torch.randn(1, 3, 64, 32))
    assert out.seg.shape == (1, 1, 64, 32)


def test_danet_attention_modules_attend():
    from medseg.models.blocks import ChannelAttention, PositionAttention

    torch.manual_seed(0)
    pam, cam = PositionAttention(2, 16), ChannelAttention()
    x = torch.randn(1, 16, 6, 5)
    torch.testing.assert_close(pam(x), x)  # gamma starts at 0
    with torch.no_grad():
        pam.gamma.fill_(1.0)
        cam.beta.fill_(1.0)
        y = x.clone()
        y[..., 0, 0] += 5  # a change at one position reaches every position through position attention
        assert not torch.allclose(pam(y)[..., 3, 3], pam(x)[..., 3, 3])
        assert not torch.allclose(cam(y)[..., 3, 3], cam(x)[..., 3, 3])  # and through the channel affinities


def test_hrnet_ocr_soft_regions_are_the_auxiliary_output():
    model = create_model("hrnet_ocr", 2, 3, 4, width=2, stem_channels=4, blocks=1, modules=(1, 1, 1), stage1_blocks=1,
                         ocr_channels=8, key_channels=4).train()
    out = model.forward_train(torch.randn(2, 3, 64, 32))
    assert model.deep_supervision and len(out.aux) == 1 and out.aux[0].shape == (2, 4, 64, 32)


def test_plain_unet_applies_its_dropout():
    from medseg.models import create_model

    x = torch.randn(1, 1, 16, 16)
    plain = create_model("unet", 2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in plain.modules()) == 6  # after each conv of the 3 blocks
    plain.train()
    torch.manual_seed(0)
    assert not torch.equal(plain(x), plain(x))  # two different dropout masks
    plain.eval()
    assert torch.equal(plain(x), plain(x))
    none = create_model("unet", 2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    assert not any(isinstance(m, nn.Dropout) for m in none.modules())  # dropout 0: the modules (and keys) of before

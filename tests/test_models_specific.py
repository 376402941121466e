"""Behaviour of individual models that the registry contract cannot name."""
from __future__ import annotations

import pytest
import torch

from medseg.errors import MedsegError
from medseg.models import create_model, model_config, valid_input_size


def _vae(**kw):
    torch.manual_seed(0)
    return create_model("segresnet_vae", 3, 2, 3, init_filters=8, vae_input_size=32, latent_dim=8, **kw)


def test_segresnet_vae_loss_depends_on_input_and_trains_the_encoder() -> None:
    model = _vae().train()
    x = torch.randn(1, 2, 32, 24, 16)
    out = model.forward_train(x)
    seg, vae_loss = out.seg, out.extra_loss
    assert seg.shape == (1, 3, 32, 24, 16) and vae_loss.ndim == 0 and torch.isfinite(vae_loss)
    vae_loss.backward()
    encoder_grads = [p.grad for n, p in model.named_parameters() if n.startswith(("stem.", "down."))]
    assert encoder_grads and all(g is not None for g in encoder_grads)
    assert sum(float(g.abs().sum()) for g in encoder_grads) > 0
    vae_grads = [p.grad for n, p in model.named_parameters() if n.startswith("vae.")]
    assert vae_grads and all(g is not None for g in vae_grads)  # non-empty: a renamed branch must not pass vacuously
    model.eval()  # deterministic latent (the mean) so that only the input differs
    with torch.no_grad():
        a = model.vae_loss(x)
        b = model.vae_loss(x * 3 + 1)
    assert not torch.isclose(a, b)


def test_segresnet_vae_loss_weights_are_applied() -> None:
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        base = _vae().eval().vae_loss(x)
        doubled = _vae(vae_l2_weight=0.2, vae_kl_weight=0.2).eval().vae_loss(x)
    torch.testing.assert_close(doubled, 2 * base)


@pytest.mark.parametrize("training", [True, False])
def test_segresnet_vae_forward_returns_a_tensor(training: bool) -> None:
    model = _vae().train(training)
    with torch.set_grad_enabled(training):
        out = model(torch.randn(1, 2, 16, 24, 32))  # not the vae_input_size: the VAE branch adapts
        loss = model.forward_train(torch.randn(1, 2, 16, 24, 32)).extra_loss
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 16, 24, 32) and torch.isfinite(loss)


def test_vnet_accepts_four_inputs_three_outputs() -> None:
    model = create_model("vnet", 3, 4, 3, base_channels=4, kernel_size=3)
    assert model(torch.randn(1, 4, 16, 32, 16)).shape == (1, 3, 16, 32, 16)
    assert create_model("vnet", 2, 5, 2, base_channels=4)(torch.randn(1, 5, 32, 16)).shape == (1, 2, 32, 16)


def test_segnet_decoder_places_values_at_the_pooling_indices() -> None:
    torch.manual_seed(0)
    model = create_model("segnet", 2, 1, 2, base_channels=4, depth=2).eval()
    seen: dict[str, torch.Tensor] = {}
    def keep_first_indices(module, inputs, output) -> None:  # the first call is the finest pooling
        seen.setdefault("idx", output[1])

    def keep_last_unpooled(module, inputs, output) -> None:  # the last call is the finest level
        seen["unpooled"] = output

    model.pool.register_forward_hook(keep_first_indices)
    model.unpool.register_forward_hook(keep_last_unpooled)
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 16))
    idx, unpooled = seen["idx"], seen["unpooled"]
    expected = torch.zeros_like(unpooled).flatten(2).scatter_(2, idx.flatten(2), 1.0).view_as(unpooled).bool()
    assert unpooled.shape[2:] == (32, 16)
    assert not unpooled[~expected].any()  # zero everywhere except at the stored argmax positions
    assert unpooled[expected].abs().sum() > 0


def test_unknown_model_suggests_the_nearest_name() -> None:
    with pytest.raises(MedsegError, match=r"model: 'unetp' is not valid \(did you mean 'unetpp'\?\); choose one of .*segresnet_vae"):
        create_model("unetp", 3, 1, 2)


def test_unsupported_dims_and_bad_options_are_user_errors() -> None:
    with pytest.raises(MedsegError, match="spatial_dims"):
        create_model("unet", 4, 1, 2)
    with pytest.raises(MedsegError, match="did you mean 'instance'"):
        create_model("unet", 3, 1, 2, norm="instanse")


def test_size_message_and_padding_helper() -> None:
    model = create_model("unet", 3, 1, 2, channels=(4, 8, 8, 8, 8), num_res_units=0)
    with pytest.raises(MedsegError) as err:
        model(torch.zeros(1, 1, 97, 96, 96))
    assert str(err.value) == ("spatial size (97, 96, 96) is not accepted by unet (depth 4): each axis must be a "
                              "multiple of 16; use (96, 96, 96) or (112, 96, 96)")
    assert valid_input_size(model, (97, 96, 5)) == (112, 96, 16)
    assert valid_input_size("dynunet", (100, 130, 60)) == (128, 160, 64)


def test_deep_supervision_outputs_only_in_training() -> None:
    counts = {"unetpp": 1, "dynunet": 2, "unet": 2}
    for name, kw in (("unetpp", {"channels": (4, 8, 8)}), ("dynunet", {"filters": (4, 8, 8, 8), "strides": (1, 2, 2, 2),
                                                                         "deep_supr_num": 2}),
                     ("unet", {"channels": (4, 8, 8, 8, 8), "strides": (2, 2, 2, (2, 1)), "num_res_units": 0})):
        model = create_model(name, 2, 1, 2, deep_supervision=True, **kw).train()
        x = torch.randn(2, 1, 32, 16)
        train_out = model.forward_train(x)
        out = train_out.seg
        assert isinstance(out, torch.Tensor) and len(train_out.aux) == counts[name]
        assert all(a.shape[:2] == out.shape[:2] for a in train_out.aux)
        torch.testing.assert_close(model(x), out)  # forward gives the main output of forward_train
        model.eval()
        assert model(torch.randn(1, 1, 32, 16)).shape == (1, 2, 32, 16)
        assert model_config(model)["kwargs"]["deep_supervision"] is True


def test_unet_deep_supervision_heads_sit_on_the_decoder_levels() -> None:
    """nnU-Net's layout: one head per decoder level from half resolution to the second coarsest, each at its level's
    grid (anisotropic strides included); without deep supervision the network and its weights are unchanged."""
    kw = {"channels": (4, 8, 16, 32, 32), "strides": (2, 2, (2, 2, 1), 2), "num_res_units": 0}
    torch.manual_seed(0)
    plain = create_model("unet", 3, 2, 3, **kw)
    torch.manual_seed(0)
    deep = create_model("unet", 3, 2, 3, deep_supervision=True, **kw)
    assert not any(k.startswith("aux_heads") for k in plain.state_dict())
    assert deep.load_state_dict(plain.state_dict(), strict=False).missing_keys == [
        "aux_heads.0.weight", "aux_heads.0.bias", "aux_heads.1.weight", "aux_heads.1.bias"]
    x = torch.randn(1, 2, 32, 32, 16)
    out = deep.forward_train(x)
    assert [tuple(a.shape) for a in out.aux] == [(1, 3, 16, 16, 8), (1, 3, 8, 8, 4)]  # levels 1 and 2 of depth 4
    torch.testing.assert_close(out.seg, plain(x))  # same trunk, same main output
    assert create_model("unet", 3, 2, 3, deep_supervision=True, channels=(4, 8, 16), strides=(2, 2)).forward_train(
        torch.randn(1, 2, 8, 8, 8)).aux == ()  # depth 2: no level between the finest and the coarsest

"""Sliding-window engine: window plans, blending weights, agreement with MONAI, skipping, 2D slices, AMP, OOM retry."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference import InferenceSettings, axis_starts, gaussian_weights, plan_layout, plan_windows, sliding_window
from medseg.inference import engine
from medseg.inference.windows import max_step


def _net3d(cin=2, cout=3, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(cin, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(6, cout, 3, padding=1)).eval()


class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.windows = net, 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.net(x)


FP32 = dict(amp="off", device="cpu")


@pytest.mark.parametrize("length,roi,overlap", [(L, r, o) for L in (1, 7, 31, 64, 97, 240) for r in (8, 32, 96) for o in (0.0, 0.25, 0.5, 0.7)])
def test_axis_plan_covers_every_voxel_with_fewest_windows(length, roi, overlap):
    starts = axis_starts(length, roi, overlap)
    covered = np.zeros(max(length, roi), bool)
    for s in starts:
        covered[s:s + roi] = True
    assert covered[:length].all()
    assert starts[0] == 0 and starts[-1] + roi >= length and starts[-1] + roi <= max(length, roi)
    step = max_step(roi, overlap)
    assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))
    n = len(starts)
    # one window fewer cannot cover the axis without a stride above the maximum
    assert n == 1 or (n - 2) * step + roi < length
    # closed form of the issue: ceil((L - overlap_size) / (roi - overlap_size)) when the stride is exact
    if length > roi and roi * (1 - overlap) == step:
        ov = roi - step
        assert n == int(np.ceil((length - ov) / (roi - ov)))


def test_plan_windows_covers_volume():
    shape, roi = (50, 23, 17), (16, 16, 8)
    covered = np.zeros(shape, int)
    for start in plan_windows(shape, roi, 0.5):
        covered[tuple(slice(s, s + r) for s, r in zip(start, roi))] += 1
    assert covered.min() >= 1


def test_gaussian_weights_match_monai():
    from monai.data.utils import compute_importance_map

    for roi in [(16, 12, 8), (7, 9, 5), (33, 1), (64, 64, 1)]:
        ref = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125).numpy()
        np.testing.assert_allclose(gaussian_weights(roi), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(32, 24, 20), (10, 30, 7)])  # windows aligned with MONAI's; the second is padded
def test_full_foreground_equals_monai(blend, shape):
    from monai.inferers import sliding_window_inference

    net = _net3d()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    ours = sliding_window(net, x, InferenceSettings(roi_size=(16, 12, 8), overlap=0.5, blend=blend, **FP32))
    with torch.inference_mode():
        ref = sliding_window_inference(x[None], (16, 12, 8), 2, net, overlap=0.5, mode=blend)[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _blob_image(shape=(40, 36, 28), seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((2, *shape), np.float32)
    x[:, 4:17, 20:33, 3:13] = rng.normal(size=(2, 13, 13, 10))
    return torch.from_numpy(x)


def _whole_volume_labels(net, x: torch.Tensor) -> torch.Tensor:
    """Argmax of one fp32 pass over the whole volume: the engine's reference inside the image's foreground.

    The image is zero outside its blob, so a window reaching at least the receptive field (2 voxels here) past the
    blob sees exactly what the whole-volume pass sees there; no window planning or stitching is involved.
    """
    with torch.inference_mode():
        return net(x[None].float())[0].argmax(0).cpu()


def _foreground_agreement(pred: torch.Tensor, ref: torch.Tensor, region: torch.Tensor) -> float:
    """Agreement of two label maps over the voxels of ``region`` that either labels foreground (class != 0).

    Voxels both call background are left out: an all-background output scores 0, not the background share.
    """
    union = ((pred != 0) | (ref != 0)) & region
    assert union.sum() > 0.5 * region.sum(), "the reference labels too little foreground for a meaningful check"
    return float(((pred == ref) & union).sum() / union.sum())


def test_skipping_empty_windows_keeps_foreground_output():
    net = _net3d()
    x = _blob_image()
    fg = (x != 0).any(0)
    counted, full_net = Counting(net), Counting(net)
    s = dict(roi_size=(12, 12, 12), overlap=0.25, sw_batch_size=8, crop_foreground=False, **FP32)
    fast = sliding_window(counted, x, InferenceSettings(**s), fill=-5.0)
    naive = sliding_window(full_net, x, InferenceSettings(**{**s, "skip_empty": False}))
    assert counted.windows < full_net.windows / 4
    torch.testing.assert_close(fast[:, fg], naive[:, fg], atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.argmax(0)[fg], naive.argmax(0)[fg])
    assert (fast[:, 30:, :, :] == -5.0).all()  # far from the foreground: background fill


def test_crop_and_skip_change_nothing_for_a_pointwise_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 1), torch.nn.Tanh(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = _blob_image()
    fg = (x != 0).any(0)
    counted, full_net = Counting(net), Counting(net)
    s = dict(roi_size=(12, 12, 12), overlap=0.25, sw_batch_size=8, **FP32)
    fast = sliding_window(counted, x, InferenceSettings(**s))
    naive = sliding_window(full_net, x, InferenceSettings(**s, crop_foreground=False, skip_empty=False))
    assert counted.windows < full_net.windows / 4
    torch.testing.assert_close(fast[:, fg], naive[:, fg], atol=1e-5, rtol=1e-5)


def test_explicit_mask_limits_windows():
    x = torch.randn(1, 32, 32, 32)
    mask = np.zeros((32, 32, 32), bool)
    mask[2:5, 2:5, 2:5] = True
    layout = plan_layout((32, 32, 32), InferenceSettings(roi_size=(8, 8, 8)), mask)
    assert len(layout.starts) == 1 and layout.box == ((0, 8), (0, 8), (0, 8))
    out = sliding_window(_net3d(cin=1), x, InferenceSettings(roi_size=(8, 8, 8), **FP32), mask=mask, fill=7.0)
    assert (out[:, 20:] == 7.0).all() and not (out[:, :5, :5, :5] == 7.0).any()
    with pytest.raises(MedsegError, match="mask shape"):
        sliding_window(_net3d(cin=1), x, InferenceSettings(roi_size=(8, 8, 8), **FP32), mask=mask[:5])


def test_2d_model_predicts_volume_slice_by_slice():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1).eval()
    x = torch.randn(2, 20, 16, 9)
    counted = Counting(net)
    out = sliding_window(counted, x, InferenceSettings(roi_size=(20, 16), sw_batch_size=4, **FP32))
    assert out.shape == (3, 20, 16, 9)
    assert counted.windows == 9  # one window per slice, batched
    with torch.inference_mode():
        ref = torch.stack([net(x[None, :, :, :, z])[0] for z in range(9)], -1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    other = sliding_window(net, x, InferenceSettings(roi_size=(20, 9), slice_axis=1, **FP32))
    assert other.shape == (3, 20, 16, 9)


def test_2d_image_with_2d_model():
    net = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    out = sliding_window(net, torch.randn(1, 50, 37), InferenceSettings(roi_size=(16, 16), **FP32))
    assert out.shape == (2, 50, 37)


def test_tta_mirroring():
    sym = torch.nn.Conv3d(2, 3, 1).eval()  # pointwise: mirroring cannot change it
    x = torch.randn(2, 12, 10, 8)
    s = InferenceSettings(roi_size=(8, 8, 8), **FP32)
    torch.testing.assert_close(sliding_window(sym, x, s), sliding_window(sym, x, InferenceSettings(**{**s.__dict__, "tta": True})))
    net = _net3d()
    plain = sliding_window(net, x, s)
    tta = sliding_window(net, x, InferenceSettings(**{**s.__dict__, "tta": True}))
    assert not torch.allclose(plain, tta)
    with torch.inference_mode():  # manual average over the 8 mirrorings of a single whole-volume window
        s_full = InferenceSettings(roi_size=(12, 10, 8), tta=True, **FP32)
        ref = sum(torch.flip(net(torch.flip(x[None], a)), a) for k in range(4) for a in itertools.combinations((2, 3, 4), k)) / 8
    torch.testing.assert_close(sliding_window(net, x, s_full), ref[0], atol=1e-5, rtol=1e-5)


def test_amp_resolution_and_bf16_cpu_run():
    cpu = torch.device("cpu")
    assert engine.autocast_dtype("off", cpu) is None
    assert engine.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert engine.autocast_dtype("auto", cpu) == (torch.bfloat16 if engine.cpu_has_bf16() else None)
    net = _net3d()
    x = _blob_image()
    fg = (x != 0).any(0)  # ~4 % of the volume; outside it the engine gives the fill (background) by design
    ref = _whole_volume_labels(net, x)
    a = sliding_window(net, x, InferenceSettings(roi_size=(16, 16, 16), amp="off", device="cpu"))
    b = sliding_window(net, x, InferenceSettings(roi_size=(16, 16, 16), amp="bf16", device="cpu"))
    assert b.dtype == torch.float32
    assert torch.equal(a.argmax(0)[fg], ref[fg])  # fp32: the same labels as one pass over the whole volume
    # bf16 flips the labels of a few near-ties only (measured: 99.8 % agree; shifted by one voxel: 26-29 %; all background: 0 %)
    assert _foreground_agreement(b.argmax(0), ref, fg) > 0.97


def test_settings_are_validated():
    with pytest.raises(MedsegError, match="overlap"):
        InferenceSettings(roi_size=(8, 8, 8), overlap=1.0)
    with pytest.raises(MedsegError, match="did you mean 'gaussian'"):
        InferenceSettings(roi_size=(8, 8, 8), blend="gausian")
    with pytest.raises(MedsegError, match="roi_size"):
        InferenceSettings(roi_size=(8,))
    with pytest.raises(MedsegError, match="spatial axes"):
        sliding_window(_net3d(), torch.randn(2, 8, 8), InferenceSettings(roi_size=(4, 4, 4), **FP32))
    bad = torch.nn.Conv3d(2, 3, 3)  # no padding: output smaller than the window
    with pytest.raises(MedsegError, match="must return"):
        sliding_window(bad, torch.randn(2, 8, 8, 8), InferenceSettings(roi_size=(8, 8, 8), **FP32))


def test_cuda_oom_while_stitching_on_gpu_retries_on_cpu(monkeypatch):
    calls = []
    real_run = engine._run

    def fake_run(model, image, settings, mask, fill, device, stitch):
        calls.append(stitch.type)
        if stitch.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(model, image, settings, mask, fill, device, stitch)

    monkeypatch.setattr(engine, "_run", fake_run)
    monkeypatch.setattr(engine, "_stitch_device", lambda s, d, i: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = sliding_window(_net3d(), torch.randn(2, 12, 10, 8), InferenceSettings(roi_size=(8, 8, 8), **FP32))
    assert calls == ["cuda", "cpu"] and out.shape == (3, 12, 10, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stitch", ["device", "cpu"])
def test_gpu_windows_match_cpu(stitch, monkeypatch):
    # cuDNN convolutions use TF32 by default on Ampere and later (differences ~3e-4 here): off, to compare the engine
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = _net3d()
    x = _blob_image()
    fg, labels = (x != 0).any(0), _whole_volume_labels(net, x)
    ref = sliding_window(net, x, InferenceSettings(roi_size=(16, 16, 16), **FP32))
    out = sliding_window(net.cuda(), x, InferenceSettings(roi_size=(16, 16, 16), amp="off", device="cuda", stitch=stitch))
    assert out.device.type == ("cuda" if stitch == "device" else "cpu")
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    half = sliding_window(net, x, InferenceSettings(roi_size=(16, 16, 16), amp="auto", device="cuda", stitch=stitch))
    assert _foreground_agreement(half.cpu().argmax(0), labels, fg) > 0.97


def test_windows_with_foreground_keeps_exactly_the_windows_touching_it():
    from medseg.inference.windows import windows_with_foreground

    shape, roi = (30, 20, 10), (8, 8, 4)
    starts = plan_windows(shape, roi, 0.5)
    mask = np.zeros(shape, bool)
    mask[9, 0, 9] = True  # a single voxel
    expected = [s for s in starts if all(a <= p < a + r for a, p, r in zip(s, (9, 0, 9), roi))]
    assert windows_with_foreground(starts, roi, mask) == expected and len(expected) >= 1

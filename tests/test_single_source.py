"""One way to do each thing: one "did you mean", option lists read from their registries, one image reference
type for ``path[channel]``, one demo pipeline."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.data.io import ImageRef, write_volume
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.training.config import choices, load_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]
BASE = {"data": {"synthetic": {"cases": 4}}, "sampling": {"patch_size": [32, 32, 32]}}


def _pipeline(section: str, values: dict) -> dict:
    d = {k: dict(v) for k, v in BASE.items()}
    d.setdefault(section, {}).update(values)
    return d


# ----------------------------------------------------------------------------- one "did you mean"
def test_difflib_is_used_in_one_place_only():
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "medseg").rglob("*.py") if "difflib" in p.read_text(encoding="utf-8"))
    assert users == ["medseg/errors.py"], "write suggestions with medseg.errors.suggest / check_choice"


@pytest.mark.parametrize("section, values, message", [
    ("sampling", {"samplr": "uniform"}, "sampling.samplr: unknown key (did you mean 'sampler'?); valid keys here: patch_size"),
    ("model", {"name": "unetp"}, "model.name: 'unetp' is not valid (did you mean 'unetpp'?); choose one of "),
    ("sampling", {"sampler": "foregound"}, "sampling.sampler: 'foregound' is not valid (did you mean 'foreground'?)"),
    ("loss", {"name": "dise"}, "loss.name: 'dise' is not valid (did you mean 'dice'?); choose one of auto, "),
    ("training", {"amp": "bf61"}, "training.amp: 'bf61' is not valid (did you mean 'bf16'?); choose one of auto, off, bf16, fp16"),
    ("training", {"amp": "on"}, "training.amp: 'on' is not valid; choose one of auto, off, bf16, fp16"),
    ("inference", {"blend": "gausian"}, "inference.blend: 'gausian' is not valid (did you mean 'gaussian'?)"),
    ("preprocessing", {"normalize": "zscore_nonzro"}, "preprocessing.normalize: 'zscore_nonzro' is not valid (did you mean 'zscore_nonzero'?)"),
    ("data", {"cache": "none"}, "data.cache: 'none' is not valid; choose one of memory, disk"),  # none behaved as memory
])
def test_pipeline_typos_name_the_key_and_suggest(section, values, message):
    with pytest.raises(MedsegError) as info:
        parse_pipeline(_pipeline(section, values))
    assert message in str(info.value)


def _scheme(value):
    from medseg.data.labels import get_scheme

    get_scheme(value)


def _layout(value, tmp_path):
    from medseg.data.layouts import build_manifest

    build_manifest(value, tmp_path)


def _model(value):
    from medseg.models import create_model

    create_model(value, 3, 1, 2)


def _norm(value):
    from medseg.models import create_model

    create_model("unet", 3, 1, 2, norm=value)


def _inference(field, value):
    from medseg.inference import InferenceSettings

    InferenceSettings(roi_size=(8, 8, 8), **{field: value})


def _empty_rule(value):
    from medseg.evaluation import MetricSettings

    MetricSettings(empty=value)


@pytest.mark.parametrize("call, message", [
    (lambda tmp: _scheme("brats2032"), "label scheme: 'brats2032' is not valid (did you mean 'brats2023'?); choose one of brats, brats2023, msd"),
    (lambda tmp: _layout("nnunnet", tmp), "layout: 'nnunnet' is not valid (did you mean 'nnunet'?); choose one of auto, brats2018"),
    (lambda tmp: _model("segresnet_vea"), "model: 'segresnet_vea' is not valid (did you mean 'segresnet_vae'?); choose one of "),
    (lambda tmp: _norm("instanse"), "norm: 'instanse' is not valid (did you mean 'instance'?); choose one of instance, batch, group"),
    (lambda tmp: _inference("blend", "constnt"), "blend: 'constnt' is not valid (did you mean 'constant'?); choose one of gaussian, constant"),
    (lambda tmp: _inference("stitch", "cpus"), "stitch: 'cpus' is not valid (did you mean 'cpu'?); choose one of auto, device, cpu"),
    (lambda tmp: _empty_rule("nan!"), "empty: 'nan!' is not valid (did you mean 'nan'?); choose one of brats, nan"),
])
def test_every_choice_outside_pipelines_has_the_same_message(tmp_path, call, message):
    with pytest.raises(MedsegError) as info:
        call(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- option lists from their registries
def test_pipeline_options_are_the_registries():
    from medseg.data.sampling import SAMPLERS
    from medseg.inference.windows import BLENDS
    from medseg.losses import LOSSES
    from medseg.models import list_models
    from medseg.runtime import PRECISIONS

    c = choices()
    assert c["sampling.sampler"] == tuple(SAMPLERS)
    assert c["loss.name"] == ("auto", *LOSSES)
    assert c["training.amp"] == PRECISIONS
    assert c["inference.blend"] == BLENDS
    assert c["model.name"] == tuple(list_models())


def test_a_newly_registered_loss_or_sampler_is_accepted(monkeypatch):
    from medseg import losses
    from medseg.data import sampling

    loss = _pipeline("loss", {"name": "my_loss"})
    sampler = _pipeline("sampling", {"sampler": "my_sampler"})
    with pytest.raises(MedsegError, match="loss.name: 'my_loss' is not valid"):
        parse_pipeline(loss)
    with pytest.raises(MedsegError, match="sampling.sampler: 'my_sampler' is not valid"):
        parse_pipeline(sampler)
    monkeypatch.setitem(losses.LOSSES, "my_loss", lambda target: None)  # registered after the config was imported
    monkeypatch.setattr(sampling, "SAMPLERS", (*sampling.SAMPLERS, "my_sampler"))
    assert parse_pipeline(loss).loss.name == "my_loss"
    assert parse_pipeline(sampler).sampling.sampler == "my_sampler"


def test_predict_command_offers_the_engine_vocabularies():
    from medseg.cli import build_parser
    from medseg.inference.windows import BLENDS, STITCH_MODES
    from medseg.runtime import PRECISIONS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    options = {a.dest: a.choices for a in sub.choices["predict"]._actions}
    assert (options["blend"], options["stitch"], options["amp"]) == (BLENDS, STITCH_MODES, PRECISIONS)


def test_command_line_start_up_does_not_import_torch():
    """The vocabularies live in torch-free modules, so `medseg --help` and `medseg validate` start fast."""
    code = "import sys; from medseg.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- one image reference type
def test_manifest_entries_and_prediction_inputs_are_image_refs(tmp_path):
    from medseg.data.manifest import Case, read_manifest
    from medseg.inference.inputs import resolve_inputs

    array = np.arange(5 * 4 * 3 * 2, dtype=np.int16).reshape(5, 4, 3, 2)
    four = write_volume(Volume(array, np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "four.nii.gz")
    (tmp_path / "m.csv").write_text("id,ct,pet\na,four.nii.gz[0],four.nii.gz[1]\n")
    case = read_manifest(tmp_path / "m.csv")["a"]
    assert case.images == {"ct": ImageRef(four, 0), "pet": ImageRef(four, 1)}
    assert Case("a", {"ct": f"{four}[0]", "pet": ImageRef(four, 1)}).images == case.images  # text is parsed once, here
    (single,) = resolve_inputs([four], ["ct", "pet"])  # one 4D file holding both channels
    assert single.images == (ImageRef(four, 0), ImageRef(four, 1))
    (chosen,) = resolve_inputs([f"{four}[1]"], ["pet"])
    assert chosen.images == (ImageRef(four, 1),) and chosen.id == "four"
    (listed,) = resolve_inputs([tmp_path / "m.csv"], ["pet", "ct"])  # the model's order, matched by name
    assert listed.images == (ImageRef(four, 1), ImageRef(four, 0))


def test_disk_cache_of_cases_with_channel_refs(tmp_path):
    from medseg.data.dataset import CaseCache
    from medseg.data.manifest import Case
    from medseg.data.preprocess import Preprocessing

    array = np.random.default_rng(0).normal(size=(6, 5, 4, 2)).astype(np.float32)
    four = write_volume(Volume(array, np.eye(4)), tmp_path / "four.nii.gz")
    case = Case("a", {"ct": ImageRef(four, 0), "pet": ImageRef(four, 1)})
    prep = Preprocessing(orientation=None, crop_foreground=False, normalize="none")
    first = CaseCache([case], prep, None, cache_dir=tmp_path / "cache", workers=1)["a"]
    assert len(list((tmp_path / "cache").glob("a_*"))) == 1
    again = CaseCache([case], prep, None, cache_dir=tmp_path / "cache", workers=1)["a"]  # mapped from the folder
    np.testing.assert_array_equal(again.image, np.moveaxis(array, -1, 0))
    np.testing.assert_array_equal(again.image, first.image)


def test_disk_cache_of_an_older_label_resampling_is_prepared_again(tmp_path, monkeypatch):
    """A cache written when labels were resampled by nearest neighbour (half a voxel off) must not be read back."""
    from medseg.data import dataset
    from medseg.data.manifest import Case
    from medseg.data.preprocess import Preprocessing

    image = write_volume(Volume(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    label = write_volume(Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "lab.nii.gz")
    case = Case("a", {"t1": image}, label)
    prep = Preprocessing(orientation=None, spacing=(2.0, 2.0, 2.0), crop_foreground=False, normalize="none")
    monkeypatch.setattr(dataset, "LABEL_RESAMPLING_VERSION", 1)
    dataset.CaseCache([case], prep, None, cache_dir=tmp_path / "cache", workers=1)
    monkeypatch.undo()
    dataset.CaseCache([case], prep, None, cache_dir=tmp_path / "cache", workers=1)
    assert len(list((tmp_path / "cache").glob("a_*"))) == 2  # not the old folder


# ----------------------------------------------------------------------------- one demo pipeline
def test_demo_pipeline_has_one_source():
    link = ROOT / "pipelines" / "demo.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "medseg" / "resources" / "demo.yaml").resolve()
    p = load_pipeline(link)
    assert p.name == "demo" and p.data.synthetic is not None and p.data.manifest is None  # no paths to resolve

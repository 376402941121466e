"""Many cases into an output folder: the Python face of ``medseg predict``.

:func:`predict` resolves the inputs (files, a case or dataset folder, a manifest, DICOM), loads the model once
(:class:`~medseg.inference.predictor.Predictor`) and writes each case's label map (and the side files asked for)
atomically; :func:`predict_cases` is the loop shared with the cross-validation's out-of-fold predictions. A case
whose outputs are already there and sound is skipped, so a killed run resumes; ``shard`` splits the cases between
processes or machines.

Example:
    >>> written = predict("runs/unet3d", ["Brats18_X_flair.nii.gz", "..._t1.nii.gz", "..._t1ce.nii.gz", "..._t2.nii.gz"],
    ...                   "predictions")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medseg.data.images2d import IMAGE_2D_SUFFIXES
from medseg.data.io import read_volume
from medseg.errors import MedsegError, ValidationError
from medseg.inference.inputs import CaseInput, resolve_inputs
from medseg.inference.instances import check_settings
from medseg.inference.predictor import Predictor


def predict(model: str | Path, inputs: str | Path | Sequence[str | Path], output: str | Path, *, case_id: str | None = None,
            probabilities: bool = False, overwrite: bool = False, shard: tuple[int, int] = (0, 1), progress: bool = False,
            overlay: bool = False, nan_policy: str = "error", crf: bool | dict = False, instances=None,
            announce: bool = False, **options) -> list[Path]:
    """Predict every case named by ``inputs`` with ``model``; write ``<output>/<case_id>.nii.gz`` per case
    (``<case_id>.png`` for 2D images, of the input's width and height; with ``overlay``, ``<case_id>_overlay.png``).

    Args:
        model: a run folder (``checkpoints/best.pt``, else ``last.pt``) or a checkpoint file.
        inputs: one scan's channel files, one file, a case or dataset folder, a manifest, or a DICOM folder.
        output: folder for the predictions (created when the first one is written; checked before anything is
            computed). Temporary files that a killed run left there are removed.
        shard: ``(i, n)``: predict only cases ``i, i + n, i + 2n, ...`` (for several processes or machines).
        overwrite: predict cases whose output already exists. Otherwise they are skipped when their label map reads
            and has the scan's shape, and predicted again (with a warning) when it does not.
        nan_policy: NaN/infinite input voxels are an error (``"error"``) or set to 0 with a warning (``"zero"``).
        instances: also write objects: an :class:`medseg.inference.instances.InstanceSettings`, a method name
            (``"auto"``, ``"components"``, ``"watershed"``, ``"model"``) or True (auto): ``<case_id>_instances.png``
            / ``.nii.gz`` (an instance map on the same grid) and ``<case_id>_instances.json`` (score and size per object).
        announce: print what predicts (:meth:`Predictor.describe`) before the first case (the command line).
        crf: refine the probabilities with a dense CRF on the scan (:func:`medseg.inference.postprocess.crf_refine`)
            before the labels are taken: True for the defaults, or a dict of its options; needs pydensecrf2.
            The probabilities written (``probabilities=True``) are then the refined ones.
        options: :class:`InferenceSettings` and :class:`PostprocessSettings` fields overriding the checkpoint's, and
            ``localiser`` (a run folder) / ``localiser_margin_mm`` / ``localiser_average`` (names; [] = none)
            overriding a cascade's first stage (:mod:`medseg.inference.cascade`; a single fold's model is localised
            by the same fold of a CV localiser).

    Returns:
        The files written (label maps first per case).
    """
    from medseg.atomic import check_output_dir, sweep_stale
    from medseg.data.checks import check_nan_policy, warn

    check_nan_policy(nan_policy)
    output = check_output_dir(output, "--output")
    index, count = shard
    if not 0 <= index < count:
        raise MedsegError(f"shard {index}/{count}: the index must be within 0..{count - 1}")
    predictor = Predictor.from_checkpoint(model, probabilities=probabilities, **options)
    predictor.overlay = overlay
    predictor.instances = check_settings(instances, predictor.segmenter.instance_model, predictor.loaded.path)
    predictor.crf = (dict(crf) if isinstance(crf, dict) else {}) if crf else None
    if crf and predictor.segmenter.instance_model:
        raise MedsegError(f"--crf refines a semantic model's probabilities; {model} is an instance model, whose labels are "
                          "its objects: predict without --crf")
    predictor.nan_policy = nan_policy
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    cases = resolve_inputs(list(inputs), predictor.loaded.channels, case_id)
    cases = cases[index::count]
    if announce and cases:
        print(predictor.describe(), flush=True)
    removed = sweep_stale(output)
    if removed:
        warn([f"{output}: removed {len(removed)} temporary file(s) left by a killed run ({', '.join(p.name for p in removed[:3])}"
              f"{' ...' if len(removed) > 3 else ''})"])
    return predict_cases(predictor, cases, [output], overwrite=overwrite, progress=progress)


def predict_cases(predictor: Predictor, cases: Sequence[CaseInput], outputs: Sequence[Path], run=None, *,
                  overwrite: bool = False, progress: bool = False, desc: str = "predict") -> list[Path]:
    """Predict each of ``cases`` and write its predictions, one per folder of ``outputs``: ``run(images)`` gives them
    (default: ``predictor.predict_volumes``, one folder; a cascade's CV: :meth:`Predictor.cascade_variants`, one per
    mix).
    A case whose outputs are all done (:func:`_done`) is skipped unless ``overwrite``; a scan's check names its case.

    Returns:
        The files written (label maps first per case and folder).
    """
    run = run or (lambda images: (predictor.predict_volumes(images),))
    todo = [c for c in cases if overwrite or not all(_done(predictor, c, out) for out in outputs)]
    written: list[Path] = []
    bar = None
    if progress and len(todo) > 0:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="case")
    for case in todo:
        images = [read_volume(p) for p in case.images]
        try:
            predictions = run(images)
        except ValidationError as err:  # the scan's check: name the case
            raise ValidationError([f"case {case.id}: {line}" for line in err.problems]) from None
        for prediction, out in zip(predictions, outputs):
            written += predictor.write(prediction, case, out, images)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(case.id)
    if bar is not None:
        bar.close()
    return written


def _done(predictor: Predictor, case: CaseInput, output: Path) -> bool:
    """True when every output of ``case`` exists and its label map reads with the shape of the scan's first channel;
    a damaged label map (a partial copy, another case's file) is predicted again, with a warning."""
    from medseg.data.checks import warn

    paths = predictor.output_paths(case, output)
    if not all(p.exists() for p in paths):
        return False
    try:
        labels = read_volume(paths[0])
    except MedsegError as err:
        warn([f"case {case.id}: the existing output is unreadable ({str(err).splitlines()[0][:200]}); predicting the case again"])
        return False
    try:
        expected = input_shape(case.images[0])
    except MedsegError:
        return False  # the input is reported when the case is predicted
    got = labels.shape if labels.array.ndim <= 3 else None
    if got != expected or labels.array.dtype.kind not in "ui":
        what = f"shape {labels.array.shape}, type {labels.array.dtype}"
        warn([f"case {case.id}: the existing output {paths[0]} is not a label map of the scan's shape {expected} ({what}); "
              "predicting the case again"])
        return False
    return True


def input_shape(ref) -> tuple[int, ...]:
    """Spatial shape of an input image from its header when the format allows (NIfTI, 2D images), else read."""
    from medseg.data.io import ImageRef

    ref = ImageRef.parse(ref)
    name = ref.path.name.lower()
    if ref.path.is_file() and name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            return tuple(int(n) for n in nib.load(str(ref.path)).shape[:3])
        except Exception:  # noqa: BLE001 - unreadable: read_volume says why
            pass
    elif ref.path.is_file() and ref.path.suffix.lower() in IMAGE_2D_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(ref.path) as im:
                return (int(im.size[0]), int(im.size[1]), int(getattr(im, "n_frames", 1)))
        except OSError:
            pass
    return read_volume(ref).shape

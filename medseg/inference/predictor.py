"""A trained checkpoint applied to patient scans, with the prediction written in each scan's own geometry.

For one scan: read the channels -> the checkpoint's preprocessing (canonical orientation, optional resampling,
foreground crop, z-score) -> sliding-window logits -> sigmoid (regions) or softmax (labels) -> invert the
preprocessing onto the first channel's original grid -> threshold / argmax -> the scheme's label values ->
postprocessing -> a uint8 NIfTI with the first channel's exact affine. An instance model gives objects on the whole
image instead, and ``--instances`` adds an instance map (:mod:`medseg.inference.instances`). Loading checkpoints and
ensembles: :mod:`medseg.inference.loading`; many cases into an output folder (``medseg predict``):
:mod:`medseg.inference.batch`.

Example:
    >>> predictor = Predictor.from_checkpoint("runs/unet3d")  # doctest: +SKIP
    >>> labels = predictor.predict_volumes([read_volume(f) for f in channel_files]).labels  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medseg.checkpoint import for_fold
from medseg.data.checks import check_images
from medseg.data.images2d import IMAGE_2D_SUFFIXES
from medseg.data.io import read_volume, write_volume
from medseg.data.labels import LabelScheme
from medseg.data.manifest import check_case_id
from medseg.data.preprocess import Prepared, Preprocessing
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.inference.cascade import FirstStage, cascade_options, restrict
from medseg.inference.engine import (InferenceSettings, autocast_dtype, channels_last_format, resolve_device,
                                     sliding_window)
from medseg.inference.inputs import CaseInput
from medseg.inference.instances import (InstanceSettings, drop_small, in_plane, object_table, semantic_instances,
                                       write_object_table)
from medseg.inference.loading import LoadedModel, check_ensemble, chosen_postprocessing, find_members, load_model, settings_for
from medseg.inference.postprocess import PostprocessSettings, postprocess, to_labels

BACKGROUND_LOGIT = 30.0  # |logit| given to voxels no window evaluated: sigmoid/softmax ~1e-13 from 0 or 1


@dataclass(frozen=True)
class Prediction:
    """``labels`` on the first channel's grid; ``probabilities`` ``(*spatial, K)`` there too when asked for."""

    labels: Volume
    probabilities: Volume | None = None
    instances: Volume | None = None  # instance map (0 background, objects 1..N) when objects are asked for
    objects: tuple[dict, ...] = ()  # one row per object: id, score, voxels, centre (volume_ml, class)


def is_image_2d(path: str | Path) -> bool:
    """A 2D image file (PNG, JPEG, BMP, TIFF, GIF): its prediction is written as a PNG of the same size."""
    return Path(path).suffix.lower() in IMAGE_2D_SUFFIXES


def background_logits(target: str, k: int) -> list[float]:
    """Logits of a confident background for ``k`` outputs: what voxels that no window evaluated receive."""
    if target == "regions":
        return [-BACKGROUND_LOGIT] * k
    return [BACKGROUND_LOGIT] + [-BACKGROUND_LOGIT] * (k - 1)


@dataclass(frozen=True)
class Segmenter:
    """The core shared by ``medseg predict`` and validation during training: a prepared image -> labels on the
    scan's original grid.

    Sliding-window logits of each model -> sigmoid (regions) / softmax (labels), averaged over the models (a fold
    ensemble) -> the preprocessing inverted onto the first channel's original grid -> threshold / argmax -> the
    scheme's values -> postprocessing. Put the models in eval mode on ``settings.device`` first.
    """

    models: tuple[torch.nn.Module, ...]
    preprocessing: Preprocessing
    scheme: LabelScheme
    target: str
    settings: InferenceSettings
    post: PostprocessSettings = PostprocessSettings()

    @property
    def out_channels(self) -> int:
        return len(self.scheme.regions) if self.target == "regions" else len(self.scheme.values)

    @property
    def instance_model(self) -> bool:
        """True for instance models (``maskrcnn``, ``yolact``): whole-image objects instead of sliding windows."""
        return getattr(self.models[0], "task", "semantic") == "instances"

    def prepared_objects(self, image: np.ndarray | torch.Tensor, mask_threshold: float = 0.5,
                         score_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict[int, float], dict[int, int]]:
        """An instance model on a whole prepared image ``(C, *spatial)``
        (:func:`medseg.inference.instances.model_objects`)."""
        from medseg.inference.instances import model_objects

        if len(self.models) > 1:
            raise MedsegError("an ensemble of instance models is not supported: predict with one fold's run folder")
        return model_objects(self.models[0], image, self.out_channels, mask_threshold, score_threshold)

    def prepared_probabilities(self, image: np.ndarray | torch.Tensor, mask: np.ndarray | None = None) -> np.ndarray:
        """``(K, *prepared spatial)`` float32 probabilities for a prepared image ``(C, *spatial)``. With ``mask``,
        only the windows (of the whole image's tiling, so they see the image around the mask, not zero padding)
        that touch it are evaluated, background elsewhere."""
        if self.instance_model:
            return self.prepared_objects(image)[0]
        total = None
        if isinstance(image, np.ndarray) and not image.flags.writeable:  # a memory-mapped case (data.cache: disk)
            image = np.array(image)
        image = torch.as_tensor(image)
        fill = background_logits(self.target, self.out_channels)
        settings = self.settings if mask is None else dataclasses.replace(self.settings, crop_foreground=False, skip_empty=True)
        for model in self.models:
            logits = sliding_window(model, image, settings, mask=mask, fill=fill)
            probs = torch.sigmoid(logits) if self.target == "regions" else torch.softmax(logits, dim=0)
            del logits
            total = probs if total is None else total.add_(probs)
        return (total / len(self.models)).float().cpu().numpy()

    def probabilities(self, image: np.ndarray | torch.Tensor, prepared: Prepared, mask: np.ndarray | None = None) -> np.ndarray:
        """``(K, *original spatial)`` probabilities on the original grid described by ``prepared``."""
        probs = self.prepared_probabilities(image, mask)
        background = [0.0] * probs.shape[0] if self.target == "regions" else [1.0] + [0.0] * (probs.shape[0] - 1)
        return self.preprocessing.invert(probs, prepared, order="linear", fill=background)

    def labels(self, probabilities: np.ndarray, post: PostprocessSettings | None = None) -> np.ndarray:
        """Postprocessed label map (scheme values) from ``(K, *spatial)`` probabilities."""
        post = post or self.post
        target = "labels" if self.target == "instances" else self.target  # an instance model's classes
        return postprocess(to_labels(probabilities, target, self.scheme, post.threshold), self.scheme, post)


class Predictor:
    """Apply loaded models (one, or the folds of an ensemble) to scans. ``predict_volumes`` works on arrays in
    memory; ``predict_case`` on files."""

    def __init__(self, loaded: LoadedModel | Sequence[LoadedModel], settings: InferenceSettings,
                 post: PostprocessSettings | None = None, probabilities: bool = False):
        members = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
        self.loaded = members[0]
        check_ensemble(members)
        self.settings = settings
        self.probabilities = probabilities
        device = resolve_device(settings.device)
        channels_last = settings.channels_last and device.type == "cpu" and autocast_dtype(settings.amp, device) == torch.bfloat16
        for member in members:
            member.model.to(device)
            if channels_last:
                member.model.to(memory_format=channels_last_format(member.spatial_dims))
        self.segmenter = Segmenter(tuple(m.model for m in members), self.loaded.preprocessing, self.loaded.scheme,
                                   self.loaded.target, settings, post or PostprocessSettings())

    @property
    def post(self) -> PostprocessSettings:
        return self.segmenter.post

    @classmethod
    def from_checkpoint(cls, run_or_file: str | Path, *, probabilities: bool = False, **overrides) -> "Predictor":
        """One model, or the ensemble of a cross-validation folder with its chosen postprocessing (module
        :mod:`medseg.training.crossval`); ``overrides`` (non-None) take precedence over both."""
        members = [load_model(path) for path in find_members(run_or_file)]
        chosen = chosen_postprocessing(run_or_file) if len(members) > 1 else {}
        localiser, margin, average = cascade_options(overrides, chosen, members[0].inference)
        infer, post = settings_for(members[0], {**chosen, **{k: v for k, v in overrides.items() if v is not None}})
        predictor = cls(members, infer, post, probabilities)
        if localiser:
            if not Path(localiser).exists():
                raise MedsegError(f"{run_or_file}: its first stage (cascade.localiser) {localiser} does not exist; train it "
                                  "first (docs/training.md, Cascade) or give --localiser RUN")
            first = cls.from_checkpoint(for_fold(localiser, members[0].fold if len(members) == 1 else None),
                                        device=infer.device, amp=infer.amp)
            predictor.first_stage = FirstStage.attach(predictor, first, margin, average)
        return predictor

    first_stage: FirstStage | None = None  # a cascade's localiser (medseg.inference.cascade)

    def describe(self) -> str:
        """One line per stage saying what predicts: the model (or the number of fold models), the outputs, TTA, the
        device and postprocessing; for a cascade the localiser, its margin and the regions averaged with it."""
        def line(predictor: "Predictor", what: str) -> str:
            n, loaded, post = len(predictor.segmenter.models), predictor.loaded, predictor.post
            models = f"{n} fold models" if n > 1 else "1 model"
            outputs = list(loaded.scheme.regions) if loaded.target == "regions" else list(loaded.scheme.labels)
            kept = ", ".join(map(str, post.largest_component)) or "none"
            source = loaded.path.parents[2] if n > 1 else loaded.path  # CV/fold_K/checkpoints/best.pt
            return (f"{what}: {models} from {source} ({loaded.target} {'/'.join(map(str, outputs))}), TTA "
                    f"{'on' if predictor.settings.tta else 'off'}, {resolve_device(predictor.settings.device).type}, "
                    f"largest component kept: {kept}")
        if self.first_stage is None:
            return line(self, "model")
        first = self.first_stage
        names = [list(self.loaded.scheme.regions)[c] for c in first.channels] if self.loaded.target == "regions" else \
            (["all classes"] if first.channels else [])
        return "\n".join([line(first.localiser, "cascade, stage 1"), line(self, "cascade, stage 2"),
                          f"cascade: stage 2 kept within {first.margin_mm:g} mm of stage 1's foreground; averaged with "
                          f"stage 1: {'+'.join(names) or 'none'}"])

    nan_policy = "error"  # NaN/infinite input voxels: "error", or "zero" (set to 0 with a warning); predict(nan_policy=...)

    def predict_volumes(self, images: Sequence[Volume]) -> Prediction:
        """Label map (and probabilities) on the grid of ``images[0]`` for one scan's channels, in model order.

        The channels are checked first as ``medseg validate`` checks them (:func:`medseg.data.checks.check_images`:
        one grid, 3D, invertible affine, finite values), so a bad scan is an error before any compute."""
        images = self._checked(images)
        first = images[0]
        if self.first_stage is not None:  # a cascade: the refiner's output only where the first stage found the object
            refined, localised, region = self._stages(images)
            full = self.first_stage.refine(refined, localised, region, self.loaded.target)
        else:
            prep = self.loaded.preprocessing.apply(list(images))
            if self.segmenter.instance_model and (self.instances is None or self.instances.method in ("auto", "model")):
                return self._predict_objects(images, prep)
            full = self.segmenter.probabilities(prep.image, prep)
        if self.crf is not None:  # dense CRF on the scan's own grid, before threshold / argmax
            from medseg.inference.postprocess import crf_refine

            full = crf_refine(full, images, self.loaded.target, **self.crf)
        labels = self.segmenter.labels(full)
        prob_vol = first.with_array(np.ascontiguousarray(np.moveaxis(full, 0, -1))) if self.probabilities else None
        if self.instances is None:
            return Prediction(first.with_array(labels), prob_vol)
        image2d = bool(first.meta.get("image2d"))
        flat, spacing = in_plane(labels, image2d, first.spacing)
        imap, scores = semantic_instances(flat, self.instances, scheme=self.loaded.scheme, spacing=spacing,
                                          probabilities=in_plane(full, image2d, first.spacing, channels_first=True)[0])
        return self._with_objects(first, labels, prob_vol, imap.reshape(labels.shape), scores, {})

    def _checked(self, images: Sequence[Volume]) -> list[Volume]:
        channels = self.loaded.channels
        if len(images) != len(channels):
            raise MedsegError(f"{len(images)} channel image(s) given but the model needs {len(channels)} ({', '.join(channels)})")
        where = [f"channel {name} {_source(vol)}" for name, vol in zip(channels, images)]
        return check_images(images, channels, where, nan_policy=self.nan_policy)

    def _stages(self, images: Sequence[Volume]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """A cascade's two stages on one checked scan: the refiner's ``(K, *spatial)`` probabilities (its windows
        only over the localiser's region, on the refiner's grid; zeros where the localiser found nothing), the
        localiser's probabilities when averaged (else None) and the region, all on the grid of ``images[0]``."""
        region, localised = self.first_stage.region(images)
        prep = self.loaded.preprocessing.apply(list(images), masks=region[None])
        if region.any():
            refined = self.segmenter.probabilities(prep.image, prep, mask=prep.masks[0] > 0)
        else:  # nothing to refine
            refined = np.zeros((self.segmenter.out_channels, *region.shape), np.float32)
        return refined, localised, region

    def cascade_variants(self, images: Sequence[Volume], mixes: Sequence[Sequence[str]]) -> tuple[Prediction, ...]:
        """A cascade's label maps of one scan, one per mix (the regions, or classes, averaged with the localiser; the
        others from the refiner alone), from one pass of each stage: what ``predict`` would give with
        ``localiser_average`` set to each mix (the CV chooses among them,
        :func:`medseg.training.crossval.cascade_predictions`). No CRF, no objects."""
        from medseg.inference.cascade import average_channels, average_stages

        if self.first_stage is None or not self.first_stage.channels:
            raise MedsegError(f"{self.loaded.path}: cascade_variants needs a refiner whose first stage averages "
                              "regions (localiser_average)")
        images = self._checked(images)
        refined, localised, region = self._stages(images)
        target, out = self.loaded.target, []
        # background outside the region in both stages first: the mean of two backgrounds is background, so each
        # mix then costs one average, not an average and a restriction
        refined, localised = restrict(refined, region, target), restrict(localised, region, target)
        for mix in mixes:
            channels = average_channels(list(mix), self.loaded.scheme, target, self.segmenter.out_channels)
            probabilities = average_stages(refined, localised, channels) if channels else refined
            out.append(Prediction(images[0].with_array(self.segmenter.labels(probabilities))))
        return tuple(out)

    def _predict_objects(self, images: Sequence[Volume], prep: Prepared) -> Prediction:
        """An instance model: its objects (one pass) give the instance map, and the label map is the map's objects
        painted with their classes (so the two outputs agree voxel for voxel); the probabilities written are the
        semantic ones rendered from the objects."""
        from medseg.inference.postprocess import postprocess

        first = images[0]
        settings = self.instances or InstanceSettings()
        probs, imap, scores, classes = self.segmenter.prepared_objects(prep.image, settings.mask_threshold, settings.score_threshold)
        pre = self.loaded.preprocessing
        imap = pre.invert(imap[None].astype(np.float32), prep, order="nearest", fill=0.0)[0].astype(np.int32)
        if settings.min_size or settings.min_volume_ml:
            imap = drop_small(imap, settings, first.spacing)
        lut = np.zeros(int(imap.max(initial=0)) + 1, np.int64)
        for i, c in classes.items():
            if i < lut.size:
                lut[i] = c
        scheme = self.loaded.scheme
        labels = postprocess(scheme.from_indices(lut[imap]), scheme, self.post)
        imap = np.where(labels > 0, imap, 0)
        prob_vol = None
        if self.probabilities:
            full = pre.invert(probs, prep, order="linear", fill=[1.0] + [0.0] * (probs.shape[0] - 1))
            prob_vol = first.with_array(np.ascontiguousarray(np.moveaxis(full, 0, -1)))
        if self.instances is None:
            return Prediction(first.with_array(labels), prob_vol)
        kept = set(np.unique(imap).tolist()) - {0}
        return self._with_objects(first, labels, prob_vol, imap, {i: s for i, s in scores.items() if i in kept},
                                  {i: c for i, c in classes.items() if i in kept})

    def _with_objects(self, first: Volume, labels: np.ndarray, prob_vol: Volume | None, imap: np.ndarray,
                      scores: dict[int, float], classes: dict[int, int]) -> Prediction:
        flat, spacing = in_plane(imap, bool(first.meta.get("image2d")), first.spacing)
        dtype = np.uint16 if imap.max(initial=0) < 65536 else np.uint32
        rows = object_table(flat, scores, None if first.meta.get("image2d") else spacing, classes or None)
        return Prediction(first.with_array(labels), prob_vol, first.with_array(imap.astype(dtype)), tuple(rows))

    def predict_case(self, case: CaseInput) -> Prediction:
        return self.predict_volumes([read_volume(p) for p in case.images])

    overlay = False  # also write <id>_overlay.png for 2D images (set by predict(overlay=True))
    instances = None  # InstanceSettings: also write <id>_instances.* and <id>_instances.json (predict(instances=...))
    crf: dict | None = None  # dense-CRF options ({} = defaults) refining the probabilities (set by predict(crf=...))

    def output_paths(self, case: CaseInput | str, output_dir: Path) -> list[Path]:
        """Label map first: ``<id>.png`` for a 2D image (PNG, JPEG, BMP, TIFF input), ``<id>.tif`` for a multi-page
        TIFF (one page per input page), ``<id>.nii.gz`` otherwise; then ``<id>_prob.nii.gz`` and
        ``<id>_overlay.png`` (one-page images) when asked for."""
        from medseg.data.images2d import tiff_pages

        case_id, two_d = (case, False) if isinstance(case, str) else (case.id, is_image_2d(case.images[0].path))
        check_case_id(case_id, str(output_dir))  # outputs stay inside output_dir
        output_dir = Path(output_dir)
        stack = two_d and tiff_pages(case.images[0].path) > 1
        suffix = ".tif" if stack else ".png" if two_d else ".nii.gz"
        paths = [output_dir / f"{case_id}{suffix}"]
        if self.instances is not None:
            paths += [output_dir / f"{case_id}_instances{suffix}", output_dir / f"{case_id}_instances.json"]
        if self.probabilities:
            paths.append(output_dir / f"{case_id}_prob.nii.gz")
        if self.overlay and two_d and not stack:
            paths.append(output_dir / f"{case_id}_overlay.png")
        return paths

    def write(self, prediction: Prediction, case: CaseInput | str, output_dir: str | Path,
              images: Sequence[Volume] | None = None) -> list[Path]:
        """Write the label map (uint8 NIfTI; PNG for 2D images, 16-bit when labels exceed 255), the probabilities
        (float32 NIfTI) and, for 2D images, the colour overlay on ``images``, each atomically; labels last."""
        labels_path, *extra = self.output_paths(case, Path(output_dir))
        case_id = case if isinstance(case, str) else case.id
        image = labels_path.suffix in (".png", ".tif")  # 8- or 16-bit grey as the values need
        if not image and int(prediction.labels.array.max(initial=0)) > 255:
            raise MedsegError(f"case {case_id}: label values above 255 do not fit the uint8 output; use a scheme with values < 256")
        written = []
        for path in extra:
            side = path.name[len(case_id):]  # "_instances.png", "_instances.json", "_prob.nii.gz", "_overlay.png"
            if side == "_instances.json" and prediction.instances is not None:
                method = self.instances.method
                if method == "auto":
                    method = "model" if self.segmenter.instance_model else "components"
                written.append(write_object_table(path, case_id, prediction.objects,
                                                  path.name.replace(".json", labels_path.name[len(case_id):]),
                                                  method, self.instances.target))
            elif side.startswith("_instances.") and prediction.instances is not None:
                written.append(write_volume(prediction.instances, path, dtype=None))
            elif side.startswith("_prob.") and prediction.probabilities is not None:
                written.append(write_volume(prediction.probabilities, path, dtype=np.float32))
            elif side.startswith("_overlay.") and images:
                from medseg.data.images2d import write_overlay

                photo = read_volume(images[0].meta["path"]) if images[0].meta.get("path") else images[0]
                written.append(write_overlay(photo, prediction.labels, path))
        written.insert(0, write_volume(prediction.labels, labels_path, dtype=None if image else np.uint8))
        return written


def _source(vol: Volume) -> str:
    """The file a volume was read from, ``file[N]`` for one channel of a 4D or colour file."""
    path = vol.meta.get("path", "(in memory)")
    return f"{path}[{vol.meta['channel']}]" if vol.meta.get("channel") is not None else str(path)

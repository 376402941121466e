"""Pipeline files: one YAML file = one reproducible experiment.

Every key is a field of a frozen dataclass below; a pipeline is validated when loaded: an unknown key (with a
"did you mean"), a wrong type or an impossible value is a :class:`MedsegError` naming the key and the fix.
Paths inside a pipeline are relative to the pipeline file. See ``pipelines/demo.yaml`` for every section.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from medseg.data.augment import Augmentation
from medseg.data.preprocess import Preprocessing
from medseg.inference.cascade import CascadeSettings
from medseg.inference.engine import InferenceSettings
from medseg.inference.postprocess import PostprocessSettings
from medseg.errors import MedsegError, check_choice, suggest


@dataclass(frozen=True)
class SyntheticData:
    """Generate a synthetic BraTS-like dataset into the run directory instead of reading a manifest."""

    cases: int = 12
    shape: tuple[int, ...] = (64, 56, 48)
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    manifest: Optional[str] = None
    synthetic: Optional[SyntheticData] = None
    label_scheme: Optional[Union[str, dict]] = None  # default: the manifest's
    target: str = "regions"  # regions: sigmoid per region (BraTS WT/TC/ET); labels: softmax over classes;
    # instances: the label is an instance map (one id per object), for instance models (maskrcnn, yolact)
    val_fold: Optional[int] = 0  # cases of this fold validate; the others train
    val_split: Optional[str] = None  # alternatively: cases whose split is this value validate
    train_split: Optional[str] = None
    soft_targets: bool = False  # regions: train on each region's share of a resampled voxel, not its majority label
    cache: str = "memory"  # memory | disk
    cache_dir: Optional[str] = None
    workers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    name: str = "unet"  # a registered name, 'monai:ClassName', or a name registered by `module`
    spatial_dims: int = 3
    kwargs: dict = field(default_factory=dict)  # e.g. {preset: cicek2016}; see docs/models.md
    module: Optional[str] = None  # a .py file (relative to the pipeline) or module name that registers the model
    init_weights: Optional[str] = None  # weights to start from: a medseg checkpoint or a state_dict file (.pt)


@dataclass(frozen=True)
class SamplingConfig:
    patch_size: tuple[int, ...] = (64, 64, 64)
    batch_size: int = 2
    sampler: str = "foreground"  # a name of medseg.data.sampling.SAMPLERS
    foreground_fraction: float = 0.33


@dataclass(frozen=True)
class LossConfig:
    name: str = "auto"  # auto or a name of medseg.losses.LOSSES
    deep_supervision: bool = False
    batch_dice: bool = False  # Dice sums over the whole batch per channel (nnU-Net 3D full resolution and 2D)
    vae_weight: float = 1.0  # weight of the segresnet_vae regulariser in the total loss


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = 0.99


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "poly"  # poly | cosine | constant
    power: float = 0.9
    warmup_epochs: int = 0
    min_lr: float = 0.0


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 50
    iterations_per_epoch: int = 100
    val_interval: int = 1
    amp: str = "auto"  # medseg.runtime.PRECISIONS (auto: bf16/fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else off)
    grad_clip: Optional[float] = 12.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None
    model_selection: str = "final"  # final | smoothed | best: which epoch's model checkpoints/best.pt holds
    smoothing: float = 0.9  # model_selection smoothed: weight of the past in the moving average of validation Dice
    init_from: Optional[str] = None  # a run folder or checkpoint whose network weights start the run (fold K of a CV folder for fold K)


@dataclass(frozen=True)
class Pipeline:
    name: str = "experiment"
    seed: int = 0
    output_dir: Optional[str] = None  # default runs/<name>, relative to the working directory
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augmentation: Augmentation = field(default_factory=Augmentation)  # of the training patches; nnU-Net's defaults
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceSettings = field(default_factory=InferenceSettings)  # roi_size null: the patch size
    postprocessing: PostprocessSettings = field(default_factory=PostprocessSettings)  # applied by validation and predict
    cascade: CascadeSettings = field(default_factory=CascadeSettings)  # predict within a first-stage model's foreground
    base_dir: str = field(default=".", metadata={"internal": True})  # folder of the pipeline file

    def to_dict(self, resolve_paths: bool = False) -> dict:
        """Plain data; ``resolve_paths`` makes file paths absolute (the copy a run folder keeps can be moved)."""
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        if resolve_paths:
            for key in ("manifest", "cache_dir"):
                if d["data"][key] is not None:
                    d["data"][key] = str(self.resolve(d["data"][key]))
            if d["model"]["module"] is not None:
                d["model"]["module"] = self.model_module
            for section, key in (("cascade", "localiser"), ("training", "init_from")):
                if d[section][key] is not None:
                    d[section][key] = str(self.resolve(d[section][key]))
        return _plain(d)

    @property
    def model_module(self) -> str | None:
        """``model.module`` as given to :func:`medseg.models.load_model_module`: a file path made absolute against
        the pipeline's folder, or a dotted module name."""
        from medseg.models.registry import _is_path

        m = self.model.module
        return None if m is None else (str(self.resolve(m)) if _is_path(m) else m)

    def resolve(self, path: str | None) -> Path | None:
        """A path of the pipeline, made absolute against the pipeline file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def roi_size(self) -> tuple[int, ...]:
        return tuple(self.inference.roi_size or self.sampling.patch_size)


CHOICES = {  # options with no registry of their own; those with one are read from it by choices()
    "data.target": ("regions", "labels", "instances"),
    "data.cache": ("memory", "disk"),
    "optimizer.name": ("adam", "adamw", "sgd"),
    "schedule.name": ("poly", "cosine", "constant"),
    "training.model_selection": ("final", "smoothed", "best"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every option key of a pipeline with its valid values: :data:`CHOICES` plus the lists read from their
    registries at call time, so that a model, sampler or loss registered after import is accepted."""
    from medseg.data.sampling import SAMPLERS
    from medseg.inference.windows import BLENDS
    from medseg.losses import loss_names
    from medseg.models import list_models
    from medseg.runtime import PRECISIONS

    return {**CHOICES, "model.name": tuple(list_models()), "sampling.sampler": tuple(SAMPLERS), "loss.name": loss_names(),
            "training.amp": PRECISIONS, "inference.blend": BLENDS}


POSITIVE = ("sampling.batch_size", "training.epochs", "training.iterations_per_epoch", "training.val_interval",
            "optimizer.lr", "inference.sw_batch_size", "data.synthetic.cases")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_SCALARS = {  # type -> (accepts the YAML value, what to ask for)
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "text"),
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except MedsegError as err:
                errors.append(str(err))
        raise MedsegError(errors[0] if len(errors) == 1 else f"{key}: {value!r} has the wrong type; expected one of {[_type_name(a) for a in args]}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MedsegError(f"{key}: expected a list such as [64, 64, 64], got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise MedsegError(f"{key}: expected a mapping (key: value lines), got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            hint = " (YAML reads unquoted off/on/no/yes as true/false: quote the word, e.g. 'off')" if tp is str and isinstance(value, bool) else ""
            raise MedsegError(f"{key}: expected {expected}, got {value!r}{hint}")
        return float(value) if tp is float else value
    return value


MOVED = {  # keys of older pipeline files -> where their setting lives now
    "sampling.flip": "mirroring is augmentation.mirror_p (0.5 per axis; 0 turns it off); remove sampling.flip",
    "sampling.intensity": "intensity augmentation is in the augmentation section (e.g. augmentation.gamma_p; "
                          "augmentation.enabled: false turns all augmentation off); remove sampling.intensity",
}


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MedsegError(f"{prefix or 'pipeline'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if full in MOVED:
            raise MedsegError(f"{full}: this key moved: {MOVED[full]}")
        if key not in fields:
            raise MedsegError(f"{full}: unknown key{suggest(key, fields)}; valid keys here: {', '.join(fields)}")
        values[key] = _coerce(value, hints[key], full)
    try:
        return cls(**values)
    except MedsegError as err:  # a settings class that checks itself names its field; add the section
        raise MedsegError(f"{prefix}.{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def _check_values(p: Pipeline) -> None:
    for key, options in choices().items():
        section, name = key.split(".")
        value = getattr(getattr(p, section), name)
        if key == "model.name" and isinstance(value, str) and value.startswith("monai:"):
            from medseg.models import get_entry

            try:
                get_entry(value)
            except MedsegError as err:
                raise MedsegError(f"model.name: {str(err).removeprefix('model: ')}") from None
            continue
        check_choice(value, options, key)
    for key in POSITIVE:
        obj = p
        for part in key.split("."):
            obj = getattr(obj, part) if obj is not None else None
        if obj is not None and obj <= 0:
            raise MedsegError(f"{key}: must be positive, got {obj}")
    if (p.data.manifest is None) == (p.data.synthetic is None):
        raise MedsegError("data: give exactly one of data.manifest (a manifest file) or data.synthetic (generated data)")
    dims = p.model.spatial_dims
    if dims not in (2, 3):
        raise MedsegError(f"model.spatial_dims: {dims} is not 2 or 3")
    p.augmentation.check(dims)
    for key, size in (("sampling.patch_size", p.sampling.patch_size), ("inference.roi_size", p.inference.roi_size)):
        if size is not None and (len(size) != dims or any(s <= 0 for s in size)):
            raise MedsegError(f"{key}: {list(size)} must have {dims} positive sizes for a {dims}D model")
    if not 0.0 <= p.sampling.foreground_fraction <= 1.0:
        raise MedsegError(f"sampling.foreground_fraction: {p.sampling.foreground_fraction} must be within [0, 1] (nnU-Net uses 0.33)")
    if not 0.0 <= p.inference.overlap < 1.0:
        raise MedsegError(f"inference.overlap: {p.inference.overlap} must be within [0, 1)")
    if p.data.val_fold is not None and p.data.val_split is not None:
        raise MedsegError("data: give data.val_fold or data.val_split, not both (set the other to null)")


def parse_pipeline(data: dict, base_dir: str | Path = ".") -> Pipeline:
    """Validate a pipeline given as a dict (as read from YAML)."""
    pipeline = _build(Pipeline, data, "")
    pipeline = dataclasses.replace(pipeline, base_dir=str(Path(base_dir).resolve()))
    if pipeline.model.module is not None:
        from medseg.models import load_model_module

        try:
            load_model_module(pipeline.model_module)
        except MedsegError as err:
            raise MedsegError(f"model.module: {err}") from None
    _check_values(pipeline)
    return _auto_loss(pipeline)


def _auto_loss(p: Pipeline) -> Pipeline:
    """``loss.name: auto`` with a model preset that names its paper's loss (``segresnet_vae`` ``myronenko2018``:
    ``dice_squared``) becomes that loss, so the run's pipeline.yaml says which loss trained."""
    if p.loss.name != "auto":
        return p
    from medseg.models import get_entry

    preset = p.model.kwargs.get("preset")
    name = get_entry(p.model.name).preset_losses.get(preset) if isinstance(preset, str) else None
    return dataclasses.replace(p, loss=dataclasses.replace(p.loss, name=name)) if name else p


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a pipeline file; ``overrides`` are ``section.key=value`` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: pipeline file not found; see pipelines/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise MedsegError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise MedsegError(f"{path}: a pipeline is a mapping of sections (data:, model:, training: ...), not {type(data).__name__}; "
                          "see pipelines/demo.yaml")
    for item in overrides or []:
        if "=" not in item:
            raise MedsegError(f"override '{item}': expected section.key=value, e.g. training.epochs=10")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MedsegError(f"override '{item}': {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise MedsegError(f"override '{item}': the value is not valid YAML ({str(err).splitlines()[0]}); quote text "
                              "and close brackets, e.g. sampling.patch_size=[64,64,64]") from None
    try:
        return parse_pipeline(data, path.parent)
    except MedsegError as err:
        raise MedsegError(f"{path}: {err}") from None

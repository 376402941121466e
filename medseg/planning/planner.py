"""Plan rules: pure functions from a dataset fingerprint and a budget to the settings of a pipeline.

Each rule says where its numbers come from; docs/planning.md lists them all. The only measurement is injected:
``timer(network, batch)`` returns the seconds of one training step and of one inference window
(:func:`medseg.planning.measure.step_timer` measures them; tests pass a fixed function), so a plan is a
deterministic function of (fingerprint, budget, timer).

Axes: a fingerprint is on the RAS grid. A 2D plan slices the axis it names last (2D models take slices along the
last axis of the prepared volume), so its orientation code puts that axis last (``ASR`` slices R-L) and every
per-axis value of the plan is in the prepared order.

Example:
    >>> target_spacing(np.array([[1.0, 1.0, 5.0], [0.8, 0.8, 5.0], [0.9, 0.9, 1.5]]))[0]
    (0.9, 0.9, 1.5)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from medseg.errors import MedsegError, check_choice
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.network import Network, conv_flops, fit_network, training_bytes

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: spacing ratio above which the low-resolution axis is treated apart
LOWRES_PERCENTILE = 10.0  # nnU-Net: that axis takes the 10th percentile of its spacings
THIN_RATIO = 0.25  # 2D when the 3D patch's thinnest axis is under a quarter of its in-plane size
WIDTHS = {"cuda": {3: (32, 320), 2: (32, 512)}, "cpu": {3: (16, 256), 2: (16, 256)}}  # (base, cap); GPU: nnU-Net's
DEFAULT_CPU_MEMORY_GIB = 8.0
RUNTIME_GIB = 1.0  # Python, torch, MONAI, loader processes (CPU) / CUDA context and workspaces (GPU)
CACHE_MEMORY_SHARE = 0.5  # medseg: prepared cases stay in memory up to half of it, beyond are mapped from disk
MIN_BATCH = 2  # nnU-Net's minimum
BATCH_DATASET_FRACTION = 0.05  # nnU-Net: a batch covers at most 5% of the dataset's voxels
ITERATIONS = 250  # nnU-Net's iterations per epoch
MIN_EPOCHS = 10
VALIDATION_SHARE = 0.1  # validation passes may take a tenth of the budget (at least the final one runs)
COARSEN_FACTORS = (1.25, 1.5, 1.75, 2.0)  # medseg: tried in turn when too few steps fit the time budget
OVERLAP = {"cuda": 0.5, "cpu": 0.25}  # window overlap of validation and prediction
CPU_DATA_FACTOR = 1.1  # medseg, measured: a CPU training step with its data path takes 1.03-1.08x the bare step (below)
TTA_MAX_SECONDS = 60.0  # medseg: mirroring TTA at prediction while a median case takes at most this long with it
MIN_STEPS = 1500  # medseg, measured (docs/planning.md, short budgets): fewer steps at a finer grid scored worse on BraTS
SGD_MIN_STEPS = 25_000  # a tenth of nnU-Net's 250,000 steps: fewer, and AdamW is used

Timer = Callable[[Network, int], "StepTime"]


@dataclass(frozen=True)
class Budget:
    """What the plan must fit: device, memory (GiB; None: 8 on CPU, required for CUDA), time (minutes), dims
    (``auto``, ``2`` or ``3``), the fewest training steps worth running, and whether steps run under bf16/fp16."""

    device: str = "cpu"
    memory_gib: float | None = None
    time_budget_min: float = 20.0
    dims: str = "auto"
    min_steps: int = MIN_STEPS
    precision: str = "fp32"  # fp32 | bf16 | fp16: the precision the step time was measured in

    @property
    def memory_bytes(self) -> float:
        if self.memory_gib is None:
            if self.device != "cpu":
                raise MedsegError("--memory: give the GPU's memory in GiB (it is read from the GPU when planning on it)")
            return DEFAULT_CPU_MEMORY_GIB * 2**30
        return float(self.memory_gib) * 2**30

    @property
    def half(self) -> bool:
        return self.precision != "fp32"


@dataclass(frozen=True)
class StepTime:
    """Seconds of one training step (the planned batch) and of one inference forward of one window."""

    step_seconds: float
    forward_seconds: float
    note: str = ""


@dataclass(frozen=True)
class Layout:
    """RAS axes in the order of the prepared arrays (a 2D model slices the last one) and the model's dims."""

    order: tuple[int, ...]
    spatial_dims: int

    @property
    def orientation(self) -> str:
        return "".join("RAS"[i] for i in self.order) if len(self.order) == 3 else "RAS"

    def permute(self, values) -> tuple:
        return tuple(values[i] for i in self.order)


@dataclass(frozen=True)
class Design:
    """The spatial part of a plan at one spacing (prepared axis order)."""

    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    network: Network
    batch: int
    memory_bytes: float
    available_bytes: float


@dataclass(frozen=True)
class Schedule:
    epochs: int
    iterations: int
    val_interval: int
    validations: int
    validation_seconds: float  # one validation pass
    train_seconds: float  # the budget left for training steps
    startup_seconds: float


@dataclass(frozen=True)
class Plan:
    cases: int
    val_cases: int
    in_channels: int
    out_channels: int
    target: str
    label_scheme: dict | None  # written when the manifest names no usable scheme
    budget: Budget
    layout: Layout
    target_spacing: tuple[float, ...]  # before coarsening, prepared order
    coarsen_factor: float
    design: Design
    timing: StepTime
    schedule: Schedule
    normalization: Mapping
    optimizer: Mapping
    overlap: float
    notes: Mapping[str, str] = field(default_factory=dict)
    tta: bool = False  # mirroring test-time augmentation in the plan's inference settings (:func:`tta_rule`)
    deep_supervision: bool = False  # loss on the decoder levels too (:func:`deep_supervision_rule`)
    foreground_fraction: float = 0.33  # nnU-Net: a third of the patches centred on foreground
    cascade: Mapping | None = None  # a refiner's cascade section (:mod:`medseg.planning.cascade`)
    augmentation: Mapping | None = None  # settings that differ from nnU-Net's defaults (a cascade's localiser)
    init_from: str | None = None  # a run whose weights start the training (a cascade's refiner: its first stage)
    cache: str = "memory"  # data.cache: memory | disk (:func:`cache_rule`)


# ---------------------------------------------------------------------------------------------- spacing and shape
def target_spacing(spacings: np.ndarray) -> tuple[tuple[float, ...], str]:
    """Median spacing per axis; when the largest median is more than 3x the smallest (nnU-Net's anisotropy rule),
    that axis takes the 10th percentile of its spacings instead, but never finer than the other axes."""
    spacings = np.asarray(spacings, dtype=float)
    median = np.median(spacings, axis=0)
    n = len(spacings)
    worst = int(np.argmax(median))
    ratio = median[worst] / median.min()
    if ratio <= ANISOTROPY_THRESHOLD:
        return _mm(median), f"median spacing of {n} case{'s' * (n > 1)}"
    others = max(median[i] for i in range(len(median)) if i != worst)
    low = max(float(np.percentile(spacings[:, worst], LOWRES_PERCENTILE)), others)
    target = median.copy()
    target[worst] = low
    return _mm(target), (f"median spacing of {n} case{'s' * (n > 1)}; axis {worst} is {ratio:.1f}x coarser "
                         f"(> {ANISOTROPY_THRESHOLD:g}): the 10th percentile of its spacings there")


def _mm(values) -> tuple[float, ...]:
    return tuple(float(round(v, 4)) for v in values)


def median_shape(spacings: np.ndarray, shapes: np.ndarray, spacing) -> tuple[int, ...]:
    """Median per axis of the case shapes resampled to ``spacing`` (RAS order)."""
    resampled = np.asarray(shapes, float) * np.asarray(spacings, float) / np.asarray(spacing, float)
    return tuple(max(1, int(round(v))) for v in np.median(resampled, axis=0))


def coarsen(spacing: tuple[float, ...], factor: float, axes) -> tuple[float, ...]:
    """Coarser spacing for a short time budget: on ``axes`` (the model's), every spacing finer than ``factor`` x the
    finest becomes that, so the finest axes coarsen first and an already coarse axis is left alone."""
    finest = min(spacing[i] for i in axes)
    return _mm([max(s, factor * finest) if i in axes else s for i, s in enumerate(spacing)])


# ---------------------------------------------------------------------------------------------- memory and batch
def dataset_voxels(fp: Fingerprint, spacing) -> float:
    """Voxels of every case (cropped) resampled to ``spacing`` (RAS)."""
    return float(np.sum(np.prod(fp.shapes * fp.spacings / np.asarray(spacing, float), axis=1)))


def prepared_bytes(fp: Fingerprint, spacing) -> float:
    """Bytes of every case prepared at ``spacing`` (RAS): 4 per voxel and channel, 1 per label voxel."""
    return dataset_voxels(fp, spacing) * (4 * len(fp.channels) + 1)


def host_memory_bytes() -> float | None:
    """This machine's physical memory, or None where the system does not say."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def cache_rule(fp: Fingerprint, spacing, budget: Budget) -> tuple[str, str]:
    """``data.cache`` for the cases prepared at ``spacing`` (RAS), and why: ``memory`` while they take at most half
    of the memory (on CPU the ``--memory`` budget, on a GPU this machine's memory), else ``disk``: each case written
    once as ``.npy`` files and memory-mapped (:class:`medseg.data.dataset.CaseCache`), as nnU-Net does."""
    size = prepared_bytes(fp, spacing)
    if budget.device == "cpu":
        limit, of = budget.memory_bytes, f"the {budget.memory_bytes / 2**30:g} GiB budget"
    else:
        limit = host_memory_bytes()
        if limit is None:
            return "memory", f"every prepared case in memory ({size / 2**30:.1f} GiB); disk maps them from files instead"
        of = f"this machine's {limit / 2**30:.0f} GiB"
    if size <= CACHE_MEMORY_SHARE * limit:
        return "memory", (f"every prepared case in memory ({size / 2**30:.1f} GiB, at most half of {of}"
                          f"{', counted in the budget' if budget.device == 'cpu' else ''})")
    return "disk", (f"the prepared cases ({size / 2**30:.1f} GiB) are over half of {of}: each written once under the "
                    "run folder and memory-mapped, so the patches read only what they touch")


def available_memory(fp: Fingerprint, spacing, budget: Budget) -> tuple[float, str]:
    """Bytes a training step may use: the memory budget less the runtime (1 GiB) and, on CPU, the cached cases when
    :func:`cache_rule` keeps them in memory."""
    total = budget.memory_bytes
    if budget.device != "cpu":
        return total - RUNTIME_GIB * 2**30, f"{total / 2**30:.0f} GiB GPU memory less {RUNTIME_GIB:g} GiB runtime"
    cache = prepared_bytes(fp, spacing) if cache_rule(fp, spacing, budget)[0] == "memory" else 0.0
    left = total - cache - RUNTIME_GIB * 2**30
    if left <= 0:
        raise MedsegError(f"--memory: {total / 2**30:.1f} GiB does not hold the {cache / 2**30:.1f} GiB of prepared cases "
                          f"plus {RUNTIME_GIB:g} GiB of runtime; give more --memory")
    return left, f"{total / 2**30:g} GiB less {cache / 2**30:.1f} GiB of cached cases and {RUNTIME_GIB:g} GiB runtime"


def batch_size(net: Network, available: float, in_ch: int, out_ch: int, half: bool, dataset_voxels: float,
               device: str) -> int:
    """2 (nnU-Net's minimum); on a GPU more while memory allows, up to a batch covering 5% of the dataset's voxels
    (nnU-Net's cap). On a CPU a step's time grows with the batch, so a larger batch only means fewer steps: 2."""
    if device == "cpu":
        return MIN_BATCH
    fixed = training_bytes(net, 0, in_ch, out_ch, half)
    per_sample = training_bytes(net, 1, in_ch, out_ch, half) - fixed
    fits = int((available - fixed) // per_sample)
    cap = int(BATCH_DATASET_FRACTION * dataset_voxels // math.prod(net.patch))
    return max(MIN_BATCH, min(fits, cap))


def design_at(fp: Fingerprint, spacing, layout: Layout, budget: Budget, in_ch: int, out_ch: int) -> Design:
    """Network, patch and batch at ``spacing`` (RAS order) for ``layout``: the patch starts at the median shape
    and shrinks until a step fits the memory (:func:`medseg.planning.network.fit_network`)."""
    dims = layout.spatial_dims
    sp = layout.permute(spacing)
    med = layout.permute(median_shape(fp.spacings, fp.shapes, spacing))
    available, _ = available_memory(fp, spacing, budget)
    base, cap = WIDTHS["cpu" if budget.device == "cpu" else "cuda"][dims]
    net = fit_network(med[:dims], sp[:dims], (base, cap), available, (in_ch, out_ch), budget.half)
    batch = batch_size(net, available, in_ch, out_ch, budget.half, dataset_voxels(fp, spacing), budget.device)
    return Design(sp, med, net, batch, training_bytes(net, batch, in_ch, out_ch, budget.half), available)


# ---------------------------------------------------------------------------------------------- 2D or 3D
def _layout_2d(axis: int) -> Layout:
    return Layout((*(i for i in range(3) if i != axis), axis), 2)


def choose_layout(fp: Fingerprint, spacing, budget: Budget, in_ch: int, out_ch: int) -> tuple[Layout, str]:
    """3D, unless the images are 2D (2D arrays or one voxel thick), ``--dims 2``, or the data is so anisotropic that
    the 3D patch's thinnest axis is under a quarter of its in-plane size; a 2D model then slices that axis."""
    if fp.spatial_dims == 2:
        return Layout((0, 1), 2), "the images are 2D"
    med = median_shape(fp.spacings, fp.shapes, spacing)
    flat = [i for i in range(3) if med[i] == 1]
    if flat:
        if budget.dims == "3":
            raise MedsegError(f"--dims 3: the images are one voxel thick along axis {flat[-1]}; plan them with --dims 2 or auto")
        return _layout_2d(flat[-1]), f"the images are one voxel thick along {'RAS'[flat[-1]]}-axis: 2D slices"
    if budget.dims == "3":
        return Layout((0, 1, 2), 3), "3D: --dims 3"
    patch = design_at(fp, spacing, Layout((0, 1, 2), 3), budget, in_ch, out_ch).network.patch
    thin = min(range(3), key=lambda i: (patch[i], -i))
    inplane = min(patch[i] for i in range(3) if i != thin)
    if budget.dims == "2":
        return _layout_2d(thin), f"2D: --dims 2; slices across the {'RAS'[thin]}-axis (thinnest 3D patch axis)"
    if patch[thin] < THIN_RATIO * inplane:
        return _layout_2d(thin), (f"2D: at the median spacing a 3D patch would be {list(patch)}, its {'RAS'[thin]}-axis "
                                  f"under 1/4 of the in-plane size; slices across that axis")
    return Layout((0, 1, 2), 3), f"3D: at the median spacing a 3D patch of {list(patch)} is at least 1/4 as deep as wide"


# ---------------------------------------------------------------------------------------------- intensities, labels
def images_8bit_2d(fp: Fingerprint) -> bool:
    """2D images (or one pixel thick) whose every channel holds whole numbers within 0..255: photographs, 8-bit
    microscopy (a 2D NIfTI of floats, e.g. within 0..1, is not: dividing it by 255 would flatten it)."""
    flat = all(len(c.shape) == 2 or c.shape[-1] == 1 for c in fp.cases)
    return flat and all(0 <= s.min and s.max <= 255 and s.integer is not False for s in fp.intensity.values())


def normalization(fp: Fingerprint) -> tuple[dict, str]:
    """CT (every channel CT): clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean and std
    (nnU-Net's CT scheme); otherwise z-score each image over its non-zero voxels (nnU-Net's scheme for MRI)."""
    ct = [ch for ch in fp.channels if fp.modalities[ch] == "ct"]
    if not ct and images_8bit_2d(fp):
        return {"normalize": "rgb"}, ("8-bit 2D images (photographs, microscopy): divided by 255, no per-image statistics, "
                                      "so colour augmentation acts on real colours")
    if ct and len(ct) == len(fp.channels):
        s = [fp.intensity[ch] for ch in fp.channels]
        return ({"normalize": "ct", "ct_clip": [[round(x.percentile_00_5, 2), round(x.percentile_99_5, 2)] for x in s],
                 "ct_mean": [round(x.mean, 3) for x in s], "ct_std": [round(max(x.std, 1e-3), 3) for x in s]},
                f"CT ({fp.modality_reasons[ct[0]]}): clip to the foreground 0.5/99.5 percentiles, z-score with its mean/std")
    if ct:
        return {"normalize": "zscore_nonzero"}, f"channels {ct} look like CT but the others do not: every channel z-scored alike"
    return {"normalize": "zscore_nonzero"}, "MRI: z-score each image over its non-zero voxels"


def target_and_scheme(fp: Fingerprint) -> tuple[str, dict | None, int, str]:
    """(target, scheme to write or None, output channels, note): regions when the scheme has regions (one sigmoid
    each, as nnU-Net's region-based BraTS training), else classes; a scheme named from the label values seen when the
    manifest gives none (or only the generic ``labels``)."""
    from medseg.data.labels import get_scheme
    from medseg.training.setup import out_channels

    spec = fp.label_scheme
    scheme = get_scheme(spec) if spec else None
    written = None
    if scheme is None or scheme.is_generic:
        written = {"name": "planned", "labels": {f"class_{v}": v for v in fp.class_values}, "regions": {}}
        scheme = get_scheme(written)
    target = "regions" if scheme.regions else "labels"
    note = (f"scheme {scheme.name} has regions {list(scheme.regions)}: one sigmoid each" if target == "regions"
            else f"scheme {scheme.name}: softmax over {len(scheme.values)} classes")
    return target, written, out_channels(scheme, target), note


# ---------------------------------------------------------------------------------------------- time
def windows_per_case(design: Design, overlap: float) -> int:
    """Sliding windows over a median-shaped prepared case (2D: per slice, times the slices)."""
    from medseg.inference.windows import plan_windows

    dims = design.network.spatial_dims
    n = len(plan_windows(design.median_shape[:dims], design.network.patch, overlap))
    return n * (design.median_shape[2] if dims == 2 and len(design.median_shape) == 3 else 1)


def tta_rule(design: Design, timing: StepTime, overlap: float) -> tuple[bool, str]:
    """Mirroring TTA (nnU-Net predicts with it by default) while its ``2**dims`` passes over a median-shaped case take
    at most :data:`TTA_MAX_SECONDS` on the planned device (the measured forward time of a window x the windows)."""
    passes = 2 ** design.network.spatial_dims
    seconds = passes * windows_per_case(design, overlap) * timing.forward_seconds
    use = seconds <= TTA_MAX_SECONDS
    return use, (f"nnU-Net's mirroring: {passes} passes, ~{seconds:.0f} s for a median case here" if use else
                 f"off: {passes} mirrored passes would take ~{seconds:.0f} s per median case here (> {TTA_MAX_SECONDS:g} s)")


def training_step_seconds(timing: StepTime, budget: Budget) -> float:
    """Seconds of a training step with its data path: the measured bare step (forward, loss, backward, optimiser) x
    :data:`CPU_DATA_FACTOR` on a CPU, where the loader's sampling and augmentation share the cores with the step
    (the 5-fold 2 mm BraTS run of docs/results.md on the quiet machine: 0.515-0.54 s per step, epoch time / steps,
    against 0.50 s measured bare; 1.1 leaves a little room. An earlier run beside other work took 0.655 s against
    0.52 s, and its factor of 1.25 left a quarter of the budget unused on the quiet machine), x 1 on a GPU (the
    loader runs on CPU cores the GPU step leaves free)."""
    return timing.step_seconds * (CPU_DATA_FACTOR if budget.device == "cpu" else 1.0)


def make_schedule(timing: StepTime, windows: int, val_cases: int, budget: Budget, startup_seconds: float) -> Schedule:
    """Epochs x iterations that fill the time budget less case loading and validation: validation passes may use a
    tenth of the budget (at least one, the final); iterations per epoch are nnU-Net's 250 unless fewer give at least
    10 epochs; epochs fill what is left."""
    usable = budget.time_budget_min * 60.0 - startup_seconds
    step = training_step_seconds(timing, budget)
    one_val = val_cases * windows * timing.forward_seconds
    most = max(1, int(VALIDATION_SHARE * usable // one_val)) if one_val > 0 else 1  # validation passes allowed
    if usable - one_val < step:
        raise MedsegError(f"--time-budget: {budget.time_budget_min:g} min leave no time for a training step "
                          f"({step:.2f} s) after loading the cases ({startup_seconds:.0f} s) and one validation "
                          f"({one_val:.0f} s); give a larger --time-budget")
    iterations = max(1, min(ITERATIONS, int((usable - most * one_val) // (MIN_EPOCHS * step))))

    def seconds(epochs: int) -> float:
        interval = max(1, math.ceil(epochs / most))
        return epochs * iterations * step + math.ceil(epochs / interval) * one_val

    epochs = max(1, int((usable - one_val) // (iterations * step)))
    while epochs > 1 and seconds(epochs) > usable:  # the most epochs whose steps and validations fit
        epochs -= 1
    interval = max(1, math.ceil(epochs / most))
    validations = math.ceil(epochs / interval)
    return Schedule(epochs, iterations, interval, validations, one_val, usable - validations * one_val, startup_seconds)


def optimizer_for(total_steps: int) -> tuple[dict, str]:
    """nnU-Net's SGD for long schedules; AdamW (the project's measured short-CPU setting) below 25,000 steps."""
    if total_steps >= SGD_MIN_STEPS:
        return ({"name": "sgd", "lr": 0.01, "momentum": 0.99, "weight_decay": 3e-5},
                "nnU-Net: SGD, Nesterov momentum 0.99, lr 0.01, weight decay 3e-5")
    return ({"name": "adamw", "lr": 0.002, "weight_decay": 1e-5},
            f"{total_steps} steps (< {SGD_MIN_STEPS}): AdamW lr 2e-3, the setting of docs/results.md's short CPU run")


def deep_supervision_rule(net: Network, total_steps: int) -> tuple[bool, str]:
    """nnU-Net's deep supervision for long schedules (its regime, where the plan also takes nnU-Net's SGD) on a
    network with room for heads; off below :data:`SGD_MIN_STEPS` steps, where it did not help the 2 mm BraTS CPU
    plan (docs/planning.md: cross-validated with and without, 2,080 steps)."""
    if net.supervision_heads == 0:
        return False, "off: no decoder level between the finest and the coarsest (fewer than 4 levels)"
    if total_steps < SGD_MIN_STEPS:
        return False, (f"off: {total_steps} steps (< {SGD_MIN_STEPS}); it did not help the short CPU BraTS plan "
                       "(docs/planning.md). true: the loss also on the decoder levels 1 .. levels - 3")
    return True, "nnU-Net: the loss also on the decoder levels 1 .. levels - 3, weights halving"


def validation_case_count(fp: Fingerprint) -> int:
    """Cases of fold 0 (the plan's val_fold); without folds the trainer assigns 5; none for a single case."""
    if len(fp.cases) < 2:
        return 0
    if any(c.fold is not None for c in fp.cases):
        return max(1, sum(1 for c in fp.cases if c.fold == 0))
    return max(1, math.ceil(len(fp.cases) / 5))


# ---------------------------------------------------------------------------------------------- the plan
def make_plan(fp: Fingerprint, budget: Budget, timer: Timer) -> Plan:
    """The plan for ``fp`` within ``budget``; ``timer(network, batch)`` measures (or, in tests, fixes) step times.

    Order: target spacing -> 2D or 3D -> patch, network and batch that fit the memory -> step time -> if fewer than
    ``budget.min_steps`` steps fit the time budget, a coarser spacing (:data:`COARSEN_FACTORS`, chosen by the FLOPs
    of each candidate, then measured) -> epochs x iterations -> optimiser.
    """
    check_choice(budget.dims, ("auto", "2", "3"), "--dims")
    check_choice(budget.device, ("cpu", "cuda"), "--device")
    in_ch = len(fp.channels)
    target, scheme, out_ch, target_note = target_and_scheme(fp)
    spacing, spacing_note = target_spacing(fp.spacings)
    layout, layout_note = choose_layout(fp, spacing, budget, in_ch, out_ch)
    overlap = OVERLAP["cpu" if budget.device == "cpu" else "cuda"]
    val_cases = validation_case_count(fp)

    def schedule_of(design: Design, timing: StepTime) -> Schedule:
        return make_schedule(timing, windows_per_case(design, overlap), val_cases, budget, fp.read_seconds)

    design = design_at(fp, spacing, layout, budget, in_ch, out_ch)
    timing = timer(design.network, design.batch)
    schedule = schedule_of(design, timing)
    factor, fitting = 1.0, int(schedule.train_seconds // training_step_seconds(timing, budget))
    if fitting < budget.min_steps:
        factor, design = _coarser(fp, spacing, layout, budget, (in_ch, out_ch), (design, timing), schedule_of)
        if factor != 1.0:
            timing = timer(design.network, design.batch)
            schedule = schedule_of(design, timing)
    steps = schedule.epochs * schedule.iterations
    if factor != 1.0:
        spacing_note = (f"x{factor:g} coarser on the finest axes than {list(layout.permute(spacing))} ({spacing_note}): "
                        f"there only {fitting} training steps fit {budget.time_budget_min:g} min, under --min-steps "
                        f"{budget.min_steps} (medseg rule, at most x{COARSEN_FACTORS[-1]:g})")
    optimizer, optimizer_note = optimizer_for(steps)
    supervised, supervision_note = deep_supervision_rule(design.network, steps)
    norm, norm_note = normalization(fp)
    tta, tta_note = tta_rule(design, timing, overlap)
    cache, cache_note = cache_rule(fp, coarsen(spacing, factor, layout.order[:layout.spatial_dims]), budget)
    notes = {"spacing": spacing_note, "layout": layout_note, "normalize": norm_note, "target": target_note,
             "optimizer": optimizer_note, "tta": tta_note, "deep_supervision": supervision_note, "cache": cache_note}
    return Plan(len(fp.cases), val_cases, in_ch, out_ch, target, scheme, budget, layout, layout.permute(spacing), factor,
                design, timing, schedule, norm, optimizer, overlap, notes, tta, supervised, cache=cache)


def _coarser(fp: Fingerprint, spacing, layout: Layout, budget: Budget, channels: tuple[int, int],
             start: tuple[Design, StepTime], schedule_of) -> tuple[float, Design]:
    """The first of :data:`COARSEN_FACTORS` whose design (step time predicted from the measured one by the ratio of
    FLOPs) leaves room for ``budget.min_steps`` steps; the coarsest when none does."""
    design, timing = start
    axes = layout.order[:layout.spatial_dims]
    step0, window0 = conv_flops(design.network, design.batch, *channels), conv_flops(design.network, 1, *channels)
    chosen = (1.0, design)
    for factor in COARSEN_FACTORS:
        cand = design_at(fp, coarsen(spacing, factor, axes), layout, budget, *channels)
        predicted = StepTime(timing.step_seconds * conv_flops(cand.network, cand.batch, *channels) / step0,
                             timing.forward_seconds * conv_flops(cand.network, 1, *channels) / window0)
        chosen = (factor, cand)
        schedule = schedule_of(cand, predicted)
        if schedule.train_seconds / training_step_seconds(predicted, budget) >= budget.min_steps:
            break
    return chosen

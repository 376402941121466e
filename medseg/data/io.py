"""Reading and writing volumes with their geometry.

NIfTI goes through nibabel. 2D images (PNG, JPEG, BMP, TIFF, GIF) go through Pillow (:mod:`medseg.data.images2d`),
as volumes one voxel thick with channels last. NRRD, MHA/MHD, other ITK formats and DICOM series go through
SimpleITK, which is imported only on those paths (training and inference on NIfTI need no SimpleITK). SimpleITK works in LPS
world coordinates; :class:`~medseg.data.volume.Volume` affines are RAS+ (nibabel), and arrays are indexed
(i, j, k) in both cases, so a file read and written back keeps its exact grid.

An :class:`ImageRef` names what to read: a file (or DICOM folder) and optionally one channel of a 4D file (the
Medical Segmentation Decathlon stores the four MRI contrasts of a case in one 4D NIfTI). Its text form, used in
manifests and accepted by :func:`read_volume`, is the path with ``[N]`` appended: ``imagesTr/BRATS_001.nii.gz[2]``.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import atomic_path
from medseg.data.images2d import IMAGE_2D_SUFFIXES, collapse_mask_channels, read_image_2d, write_image_2d
from medseg.data.volume import Volume
from medseg.errors import MedsegError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(?P<path>.*)\[(?P<index>\d+)\]$")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ImageRef:
    """An image to read: ``path`` (a file or a DICOM series folder) and ``channel``, an index into the last axis
    of a 4D file, or ``None`` for the whole image. ``str(ref)`` is the text form ``path`` or ``path[N]``.

    Example:
        >>> ref = ImageRef.parse("imagesTr/BRATS_001.nii.gz[2]", base="/data/Task01")
        >>> ref.path.as_posix(), ref.channel
        ('/data/Task01/imagesTr/BRATS_001.nii.gz', 2)
        >>> str(ImageRef.parse("BRATS_001.nii.gz[2]"))
        'BRATS_001.nii.gz[2]'
    """

    path: Path
    channel: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.channel is not None and (isinstance(self.channel, bool) or not isinstance(self.channel, int) or self.channel < 0):
            raise MedsegError(f"{self.path}: channel {self.channel!r} must be a non-negative integer, as in 'file.nii.gz[2]'")

    @classmethod
    def parse(cls, text: "str | Path | ImageRef", base: str | Path | None = None) -> "ImageRef":
        """``"file.nii.gz[N]"`` (channel N) or a plain path; ``~`` is expanded and a relative path is joined to
        ``base`` when given (manifests pass their folder). An :class:`ImageRef` is returned as is (joined to ``base``)."""
        if isinstance(text, ImageRef):
            path, channel = text.path, text.channel
        else:
            m = _CHANNEL.match(str(text).strip())
            path, channel = (Path(m["path"]), int(m["index"])) if m else (Path(str(text).strip()), None)
        path = path.expanduser()
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        return cls(path, channel)

    def __str__(self) -> str:
        return str(self.path) if self.channel is None else f"{self.path}[{self.channel}]"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(path: str | Path | ImageRef, *, dtype: np.dtype | None = None) -> Volume:
    """Read a NIfTI, NRRD, MHA or DICOM-series volume with its affine, or a 2D image (PNG, JPEG, BMP, TIFF, GIF).

    A 2D image is a volume one voxel thick with an identity affine: ``(W, H, 1)`` grey, ``(W, H, 1, 3)`` colour
    (see :func:`~medseg.data.images2d.read_image_2d`). A NIfTI, NRRD or MHA holding a 2D image is read as one slice
    ``(X, Y, 1)`` with its own affine and ``meta["plane"]``, and :func:`write_volume` writes a volume so marked back
    as 2D.

    Args:
        path: a file, a DICOM series folder, or an :class:`ImageRef` (text ``file[N]``) for channel N of a 4D file
            or of a colour image (a grey image gives itself for N in 0..2, as if replicated to RGB).
        dtype: cast the array to this type (the on-disk type is kept by default, as ``meta["dtype"]``).

    Raises:
        MedsegError: naming the file, what is wrong and how to fix it.

    Example:
        >>> vol = read_volume("../shared/data/brats18/Brats18_2013_11_1/Brats18_2013_11_1_t1.nii.gz")  # doctest: +SKIP
        >>> vol.orientation  # doctest: +SKIP
        ('L', 'P', 'S')
    """
    ref = ImageRef.parse(path)
    path = ref.path
    if not path.exists():
        raise MedsegError(f"{path}: file not found; check the path (relative paths in a manifest are relative to the manifest file)")
    if path.is_dir():
        masks = sorted(f for f in path.iterdir() if f.is_file() and _suffix(f) in IMAGE_2D_SUFFIXES and not f.name.startswith("."))
        vol = read_instance_masks(path, masks) if masks else _read_dicom_series(path)
    elif _suffix(path) in NIFTI_SUFFIXES:
        vol = _read_nifti(path)
    elif _suffix(path) in IMAGE_2D_SUFFIXES:
        vol = read_image_2d(path)
    elif _suffix(path) in ITK_SUFFIXES or _suffix(path) == ".dcm":
        vol = _read_itk(path)
    else:
        raise MedsegError(
            f"{path}: unknown image format '{_suffix(path) or path.name}'; medseg reads .nii/.nii.gz (NIfTI), "
            f".nrrd, .mha/.mhd, DICOM series folders and 2D images (.png, .jpg, .bmp, .tif, .gif); convert the file to one of these"
        )
    if ref.channel is not None:
        vol = _select_channel(vol, ref)
    if dtype is not None:
        vol = vol.with_array(vol.array.astype(dtype, copy=False))
    return vol


def _select_channel(vol: Volume, ref: ImageRef) -> Volume:
    channel = ref.channel
    if vol.array.ndim == 3 and vol.meta.get("image2d"):  # a grey photo in a colour dataset: R = G = B = grey
        if channel > 2:
            raise MedsegError(f"{ref}: the image is grey, read as 3 equal colour channels (0..2); use a valid index")
        return Volume(vol.array, vol.affine, {**vol.meta, "channel": channel})
    if vol.array.ndim != 4:
        raise MedsegError(f"{ref}: a channel index was given but the image is {vol.array.ndim}D, not 4D; remove '[{channel}]'")
    if channel >= vol.array.shape[3]:
        raise MedsegError(f"{ref}: the 4D image has {vol.array.shape[3]} channels (0..{vol.array.shape[3] - 1}); use a valid index")
    return Volume(np.ascontiguousarray(vol.array[..., channel]), vol.affine, {**vol.meta, "channel": channel})


def read_label(path: str | Path | ImageRef, scheme=None) -> Volume:
    """A reference label map as label values: :func:`read_mask`, then decoded by ``scheme`` (a
    :class:`~medseg.data.labels.LabelScheme`: 0/255 masks, thresholds, ignored values) and checked against it."""
    vol = read_mask(path)
    if scheme is None:
        return vol
    return vol.with_array(scheme.decode(vol.array, f"label {path}"))


def read_instance_masks(folder: Path, files: list[Path]) -> Volume:
    """A folder of binary 2D masks, one per object (``masks/<id>/*.png``), as one instance label map: object ``n``
    (files in name order) has value ``n`` (uint16). Where objects overlap the first keeps the pixel; the number of
    such pixels is ``meta["overlap_pixels"]``."""
    first = None
    out = None
    overlap = 0
    for n, f in enumerate(files, start=1):
        mask = collapse_mask_channels(read_image_2d(f), str(f))
        if first is None:
            first, out = mask, np.zeros(mask.array.shape, np.uint16 if len(files) < 65536 else np.uint32)
        elif mask.array.shape != out.shape:
            raise MedsegError(f"{f}: mask of shape {mask.array.shape[:2]} in a folder whose masks are {out.shape[:2]}; "
                              "every object mask of an image has the image's size")
        on = mask.array != 0
        overlap += int(np.count_nonzero(on & (out != 0)))
        out[on & (out == 0)] = n
    return Volume(out, first.affine, {**first.meta, "path": str(folder), "dtype": str(out.dtype), "objects": len(files),
                                      "overlap_pixels": overlap})


def read_mask(path: str | Path | ImageRef) -> Volume:
    """:func:`read_volume` for a label map or mask: a 2D mask stored as colour with three equal channels (as many
    PNG and BMP masks are) comes back as one channel ``(W, H, 1)``; other files are read as they are.

    Raises:
        MedsegError: naming the file when a 2D mask has different R, G, B values.
    """
    vol = read_volume(path)
    return collapse_mask_channels(vol, str(path)) if vol.meta.get("image2d") else vol


def _read_nifti(path: Path) -> Volume:
    try:
        img = nib.load(str(path))
        hdr = img.header
        slope, inter = hdr.get_slope_inter()
        if slope not in (None, 1.0) or inter not in (None, 0.0):
            array = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            array = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise MedsegError(
            f"{path}: cannot read as NIfTI ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "the file is truncated or not a NIfTI image: re-export or re-download it"
        ) from None
    if array.ndim == 5 and array.shape[3] == 1:  # some tools write (X, Y, Z, 1, C)
        array = array[:, :, :, 0, :]
    affine = img.affine if img.affine is not None else np.eye(4)
    meta = {"path": str(path), "dtype": str(array.dtype), "qform_code": int(hdr["qform_code"]), "sform_code": int(hdr["sform_code"])}
    if array.ndim == 2:  # a NIfTI of one plane (nnU-Net's 2D NIfTI datasets): one slice, written back as 2D
        array, meta["plane"] = array[:, :, None], True
    return Volume(array, affine, meta)


def _sitk():
    try:
        import SimpleITK as sitk  # noqa: N813  (imported lazily: only NRRD/MHA/DICOM need it)
    except ImportError:
        raise MedsegError(
            "reading or writing NRRD, MHA or DICOM needs SimpleITK: pip install SimpleITK (or pip install 'medseg[itk]')"
        ) from None
    return sitk


def _from_sitk(image, path: Path) -> Volume:
    sitk = _sitk()
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
    ndim = image.GetDimension()
    comps = image.GetNumberOfComponentsPerPixel()
    axes = tuple(range(ndim))[::-1] + ((ndim,) if comps > 1 else ())
    array = np.ascontiguousarray(np.transpose(array, axes))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:ndim, :ndim] = direction * spacing[None, :]
    lps[:ndim, 3] = origin
    affine = _LPS_TO_RAS @ lps
    meta = {"path": str(path), "dtype": str(array.dtype)}
    if ndim == 2:  # an image of one plane: one slice (1 mm thick, at z = 0), written back as 2D (meta["plane"])
        array, meta["plane"] = np.expand_dims(array, 2), True
    return Volume(array, affine, meta)


def _read_itk(path: Path) -> Volume:
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:120] if str(err).strip() else "unreadable"
        raise MedsegError(f"{path}: cannot read the image ({first}); the file is damaged or not an image: re-export it") from None
    return _from_sitk(image, path)


def _read_dicom_series(folder: Path) -> Volume:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise MedsegError(f"{folder}: a folder was given but it holds no DICOM series; give a DICOM folder or an image file")
    if len(series) > 1:
        raise MedsegError(
            f"{folder}: holds {len(series)} DICOM series ({', '.join(series[:3])}...); put each series in its own folder"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise MedsegError(f"{folder}: cannot read the DICOM series ({str(err).strip().splitlines()[-1][:120]})") from None
    return _from_sitk(image, folder)


def write_volume(volume: Volume, path: str | Path, *, dtype: np.dtype | str | None = None, compresslevel: int = 1) -> Path:
    """Write ``volume`` to ``path`` atomically (temporary file + rename), keeping its exact grid.

    The format follows the extension (.nii.gz/.nii via nibabel; .nrrd/.mha via SimpleITK; .png, .tif, .bmp, .jpg
    via :func:`~medseg.data.images2d.write_image_2d`, for volumes one voxel thick). ``dtype`` casts
    the array (e.g. ``np.uint8`` for label maps). gzip level 1 is the default: several times faster to write
    than level 6-9 for files under 2% larger.
    """
    path = Path(path)
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    if array.dtype == bool:  # neither NIfTI nor ITK stores booleans
        array = array.astype(np.uint8)
    suffix = _suffix(path)
    if suffix in IMAGE_2D_SUFFIXES:
        return write_image_2d(array, path)
    if volume.meta.get("plane") and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # read from a 2D NIfTI/NRRD/MHA (meta["plane"]): written back as 2D
    if suffix in (".mhd", ".nhdr"):
        return _write_two_files(Volume(array, volume.affine, volume.meta), path)
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            img = nib.Nifti1Image(array, volume.affine, dtype=array.dtype)  # explicit: int64 is refused otherwise
            code = int(volume.meta.get("sform_code") or 1)
            img.set_sform(volume.affine, code=code)
            img.set_qform(volume.affine, code=int(volume.meta.get("qform_code") or 1))
            img.header.set_data_dtype(array.dtype)
            if suffix == ".nii.gz":
                # no file name (it would be the temporary one) and no time stamp in the gzip header:
                # the same volume always gives the same bytes
                with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                             compresslevel=compresslevel, mtime=0) as fh:
                    fh.write(img.to_bytes())
            else:
                nib.save(img, str(tmp))
        elif suffix in ITK_SUFFIXES:
            _write_itk(Volume(array, volume.affine, volume.meta), tmp)
        else:
            raise MedsegError(f"{path}: cannot write format '{suffix}'; use .nii.gz, .nii, .nrrd or .mha (or .png for a 2D image)")
    return path


def _write_two_files(volume: Volume, path: Path) -> Path:
    """A header + data pair (.mhd/.raw, .nhdr/.raw.gz): written under their final names in a temporary folder
    beside the target, then moved, data file first, so the header never points to a missing or partial file."""
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_itk(volume, staging / path.name)
        header = staging / path.name
        for item in sorted(staging.iterdir(), key=lambda f: f == header):  # the header last
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_itk(volume: Volume, tmp: Path) -> None:
    sitk = _sitk()
    array = volume.array
    ndim = volume.spatial_ndim
    is_vector = array.ndim > ndim
    axes = tuple(range(ndim))[::-1] + ((ndim,) if is_vector else ())
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, axes)), isVector=is_vector)
    lps = _LPS_TO_RAS @ volume.affine
    spacing = np.sqrt((lps[:ndim, :ndim] ** 2).sum(axis=0))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (lps[:ndim, :ndim] / spacing[None, :]).ravel()])
    image.SetOrigin([float(o) for o in lps[:ndim, 3]])
    sitk.WriteImage(image, str(tmp), True)

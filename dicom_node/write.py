"""Write the derived thin-slice series: single-frame CT Image Storage instances that pass dciodvfy.

One entry point, :func:`write_derived_series`. It takes the source images (sorted in stacking
order: single-frame datasets, or :class:`SourceImage` frames of Enhanced CT datasets) and the
interpolated HU volume, and returns a :class:`DerivedSeries` (its datasets also written to disk
when an output folder is given). What it promises:

* Identity: CT Image Storage, Explicit VR Little Endian, our ImplementationClassUID. The series and
  SOP Instance UIDs depend only on (source series UID, sorted source SOP Instance UIDs, model id,
  model version, factor[, slice index]), so reprocessing the same input never adds a second series
  to a PACS.
* Copied from the source, as elements (character set kept): patient, study, frame of reference,
  General Series (Modality, PatientPosition, BodyPartExamined), equipment, acquisition, contrast,
  pixel description, rescale and VOI window; the lists are in ``write_attributes.py``.
  Acquisition and window attributes come from the nearest source slice. Every copied value is made
  valid for its VR first (right VR, cut to the VR's length, or left out); each repair is a note in
  :attr:`DerivedSeries.notes`. Laterality (Type 2C) is present only for body parts that can be
  paired: the source's value, or empty. Never copied: private tags,
  Smallest/LargestImagePixelValue, pixel padding, and anything not on the allow-lists.
* Derivation: ImageType DERIVED\\SECONDARY\\AXIAL, DerivationDescription, DerivationCodeSequence
  (113085, DCM, "Spatial resampling"), SourceImageSequence (the one or two source slices the
  derived slice lies on or between, purpose 121322, with the frame number for a multi-frame
  source), ReferencedSeriesSequence (the source series and those same instances: each file costs
  the same whatever the length of the series) and ContributingEquipmentSequence (109102).
* Geometry: ``IPP_k = IPP_0 + k * (step / factor)`` where ``step`` is the real mean slice-to-slice
  vector of the sources (the normal times the spacing, or the sheared vector under gantry tilt),
  the plan's when the caller has one. SliceThickness and SpacingBetweenSlices are the new plane
  spacing; SliceLocation is interpolated from the sources' when they all have one, omitted
  otherwise; InstanceNumber runs 1..N. ImageOrientationPatient is the source's.
* Pixels: stored = round((HU - intercept) / slope) with the source's rescale, clipped to the range
  of the source's BitsStored and PixelRepresentation, as uint16 or int16.
* Every DS value is formatted to at most 16 characters here (pydicom would write longer ones).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.geometry import check_spacing, orientations_equal, slice_normal
from dicom_node.slices import functional_group_item
from dicom_node.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    deterministic_uid,
    instances_hash,
)
from dicom_node.write_attributes import (
    IMAGE_CONSTANT,
    IMAGE_NEAREST,
    PATIENT,
    SERIES,
    STUDY,
    TYPE2_NEAREST,
    TYPE2_SERIES,
    copy_valid,
    format_ds,
    laterality,
)

__all__ = [
    "DerivedSeries",
    "DerivedSeriesError",
    "SourceImage",
    "derived_series_uid",
    "format_ds",
    "write_derived_series",
]

SOFTWARE_NAME = "ACVTT node"
# Part of every derived UID. Bump it whenever the same source instances, model and factor would
# give different pixels (DICOM forbids new content under an old UID). 2: the model gets head-down
# stacks reversed (docs/MODEL.md, "Slice order").
DERIVATION_REVISION = "2"
DEFAULT_DESCRIPTION_TEMPLATE = "{source_description} ACVTT {spacing:g}mm"

# Transfer syntaxes that are always lossy; for JPEG 2000 (.91) and others we trust the
# LossyImageCompression attribute of the source instead.
_LOSSY_TS_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
}
# Frame-level attributes of a multi-frame source live in these functional groups.
_FRAME_GROUPS = (
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
)
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


class DerivedSeriesError(ValueError):
    """The sources and volume cannot make a consistent derived series; the message says why."""


@dataclass(frozen=True)
class SourceImage:
    """One source plane: a single-frame dataset (``frame`` None), or frame ``frame`` (0-based) of
    a multi-frame dataset, whose functional groups then give its position, orientation, pixel
    spacing, rescale and window."""

    dataset: Dataset
    frame: int | None = None


@dataclass(frozen=True)
class DerivedSeries:
    """What :func:`write_derived_series` made: the datasets in slice order (each with
    ``filename`` when written), and one note per source value that was repaired or left out
    (attribute names only: no patient data), for the job to record."""

    series_uid: str
    datasets: list[Dataset]
    notes: list[str] = field(default_factory=list)


class _Source:
    """A source plane as the writer reads it: frame-level attributes first, then the dataset's."""

    def __init__(self, image: SourceImage | Dataset):
        image = image if isinstance(image, SourceImage) else SourceImage(image)
        self.ds, self.frame = image.dataset, image.frame
        self.frame_level = Dataset()
        if self.frame is not None:
            for group in _FRAME_GROUPS:
                item = functional_group_item(self.ds, self.frame, group)
                for elem in item or ():
                    self.frame_level.add(elem)

    def element(self, keyword: str) -> DataElement | None:
        if keyword in self.frame_level:
            return self.frame_level[keyword]
        # Not ds.get(keyword): that returns the value, and the copy needs the element (its VR).
        return self.ds[keyword] if keyword in self.ds else None  # noqa: SIM401

    def get(self, keyword: str, default: object = None) -> object:
        elem = self.element(keyword)
        return default if elem is None else elem.value

    @property
    def identity(self) -> str:
        """What the derived UIDs hash: the SOP Instance UID, or for a frame the stand-in UID that
        earlier versions gave it (so the derived UIDs of multi-frame input did not change)."""
        if self.frame is None:
            return str(self.ds.SOPInstanceUID)
        return deterministic_uid("acvtt-frame", str(self.ds.SOPInstanceUID), str(self.frame))

    def reference(self) -> Dataset:
        """An Image SOP Instance Reference item to this plane (with a frame's number)."""
        ref = Dataset()
        ref.ReferencedSOPClassUID = self.ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = self.ds.SOPInstanceUID
        if self.frame is not None:
            ref.ReferencedFrameNumber = self.frame + 1
        return ref


def derived_series_uid(
    source_series_uid: str,
    source_sop_uids: Sequence[str],
    *,
    model_id: str,
    model_version: str,
    factor: int,
) -> str:
    """The SeriesInstanceUID that :func:`write_derived_series` gives this input (deterministic)."""
    return deterministic_uid(
        "acvtt-derived-series",
        DERIVATION_REVISION,
        source_series_uid,
        instances_hash(source_sop_uids),
        model_id,
        model_version,
        str(factor),
    )


def _instance_uid(
    source_series_uid: str, sop_hash: str, model_id: str, model_version: str, factor: int, k: int
) -> str:
    return deterministic_uid(
        "acvtt-derived-instance",
        DERIVATION_REVISION,
        source_series_uid,
        sop_hash,
        model_id,
        model_version,
        str(factor),
        str(k),
    )


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds_list(values: Sequence[float]) -> list[str]:
    return [format_ds(v) for v in values]


def _lossy_attributes(sources: Sequence[_Source]) -> tuple[str | None, list[str], list[str]]:
    """LossyImageCompression value to propagate, with its methods and ratios."""
    methods: list[str] = []
    ratios: list[str] = []
    flag: str | None = None
    datasets = list({id(s.ds): s.ds for s in sources}.values())  # frames share their dataset
    for src in datasets:
        value = str(src.get("LossyImageCompression", "") or "")
        ts = str(getattr(getattr(src, "file_meta", None), "TransferSyntaxUID", "") or "")
        if value == "01" or ts in _LOSSY_TS_METHOD:
            flag = "01"
            for m in src.get("LossyImageCompressionMethod", None) or (
                [_LOSSY_TS_METHOD[ts]] if ts in _LOSSY_TS_METHOD else []
            ):
                if str(m) not in methods:
                    methods.append(str(m))
            for r in src.get("LossyImageCompressionRatio", None) or []:
                if str(r) not in ratios:
                    ratios.append(str(r))
        elif value == "00" and flag is None:
            flag = "00"
    return flag, methods, ratios


def _check_inputs(sources: Sequence[_Source], volume_hu: np.ndarray, factor: int) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise DerivedSeriesError(f"factor must be a positive integer, got {factor!r}")
    if len(sources) < 2:
        raise DerivedSeriesError(f"need at least two source slices, got {len(sources)}")
    for kw in (
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "BitsStored",
        "PixelRepresentation",
    ):
        missing = [i for i, s in enumerate(sources) if s.get(kw) in (None, "")]
        if missing:
            raise DerivedSeriesError(f"source slice {missing[0]} has no {kw}")
    first = sources[0]
    for i, s in enumerate(sources):
        if s.frame is None and int(s.ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DerivedSeriesError(
                f"source slice {i} is a multi-frame image: pass SourceImage(dataset, frame)"
            )
        if s.get("SeriesInstanceUID") != first.get("SeriesInstanceUID"):
            raise DerivedSeriesError(f"source slice {i} belongs to another series")
        if (s.get("Rows"), s.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise DerivedSeriesError(f"source slice {i} has a different matrix size")
        if not orientations_equal(
            s.get("ImageOrientationPatient"),  # type: ignore[arg-type]
            first.get("ImageOrientationPatient"),  # type: ignore[arg-type]
        ):
            raise DerivedSeriesError(f"source slice {i} has a different orientation")
    if len({s.identity for s in sources}) != len(sources):
        raise DerivedSeriesError("duplicate SOPInstanceUID among the sources")
    expected = ((len(sources) - 1) * factor + 1, int(first.get("Rows")), int(first.get("Columns")))  # type: ignore[arg-type]
    if volume_hu.shape != expected:
        raise DerivedSeriesError(
            f"volume shape {volume_hu.shape} does not match {len(sources)} sources at factor "
            f"{factor}: expected {expected}"
        )
    if not np.all(np.isfinite(volume_hu)):
        raise DerivedSeriesError("volume contains NaN or infinite values")


# --- geometry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Where the derived slices lie: ``positions[k]`` and the spacings between planes."""

    positions: np.ndarray  # (n_out, 3)
    source_spacing: float
    new_spacing: float
    slice_locations: list[float] | None


def _source_step(ipp: np.ndarray, normal: np.ndarray, rel_tol: float) -> tuple[np.ndarray, float]:
    """The mean slice-to-slice vector of sources in stacking order, and the plane spacing;
    raises unless they are evenly spaced in one direction."""
    dist = ipp @ normal
    sign = 1.0 if dist[-1] >= dist[0] else -1.0
    if np.any(np.diff(sign * dist) < 0):
        raise DerivedSeriesError("sources are not an evenly spaced stack in the given order")
    report = check_spacing(sign * dist, rel_tol=rel_tol, abs_tol_mm=0.01)
    if not report.uniform or report.spacing is None:
        raise DerivedSeriesError(
            f"sources are not an evenly spaced stack in the given order: {report.reason}"
        )
    step = (ipp[-1] - ipp[0]) / (len(ipp) - 1)
    return step, abs(float(step @ normal))


def _geometry(
    sources: Sequence[_Source],
    factor: int,
    n_out: int,
    plan_step: tuple[Sequence[float], float] | None,
    rel_tol: float,
) -> _Geometry:
    normal = slice_normal([float(v) for v in sources[0].get("ImageOrientationPatient")])  # type: ignore[union-attr]
    ipp = np.array([[float(v) for v in s.get("ImagePositionPatient")] for s in sources])  # type: ignore[union-attr]
    if plan_step is None:
        step, source_spacing = _source_step(ipp, normal, rel_tol)
    else:
        step, source_spacing = np.asarray(plan_step[0], dtype=np.float64), float(plan_step[1])
        # The plan was made from these sources; a mismatch means the caller mixed two inputs.
        miss = float(np.linalg.norm(ipp[0] + (len(ipp) - 1) * step - ipp[-1]))
        if miss > max(0.1, rel_tol * source_spacing):
            raise DerivedSeriesError(
                f"the given slice vector misses the last source slice by {miss:.3f} mm"
            )
    if not np.all(np.isfinite(ipp)) or not np.all(np.isfinite(step)) or source_spacing <= 0:
        raise DerivedSeriesError("source positions or slice vector are not finite and distinct")
    positions = ipp[0] + np.arange(n_out, dtype=np.float64)[:, None] * (step / factor)
    slice_locations: list[float] | None = None
    if all(s.get("SliceLocation") not in (None, "") for s in sources):
        sl0, sl1 = float(sources[0].get("SliceLocation")), float(sources[-1].get("SliceLocation"))  # type: ignore[arg-type]
        slice_locations = [sl0 + (sl1 - sl0) * k / (n_out - 1) for k in range(n_out)]
    return _Geometry(positions, source_spacing, source_spacing / factor, slice_locations)


# --- pixels -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelEncoding:
    """How HU become stored values: the first source's rescale, bit depth and sign."""

    bits_stored: int
    signed: bool
    slope: float
    intercept: float

    @classmethod
    def of(cls, src: _Source) -> _PixelEncoding:
        bits_stored = int(src.get("BitsStored"))  # type: ignore[arg-type]
        if not 1 <= bits_stored <= 16:
            raise DerivedSeriesError(f"unsupported BitsStored {bits_stored}")
        return cls(
            bits_stored=bits_stored,
            signed=int(src.get("PixelRepresentation")) == 1,  # type: ignore[arg-type]
            slope=float(src.get("RescaleSlope", 1) or 1),  # type: ignore[arg-type]
            intercept=float(src.get("RescaleIntercept", 0) or 0),  # type: ignore[arg-type]
        )

    def describe(self, ds: Dataset) -> None:
        ds.BitsAllocated = 16
        ds.BitsStored = self.bits_stored
        ds.HighBit = self.bits_stored - 1
        ds.PixelRepresentation = 1 if self.signed else 0

    def encode(self, hu: np.ndarray) -> bytes:
        b = self.bits_stored
        lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if self.signed else (0, 2**b - 1)
        stored = np.clip(np.rint((hu.astype(np.float64) - self.intercept) / self.slope), lo, hi)
        return stored.astype("<i2" if self.signed else "<u2").tobytes()


# --- series-level attributes ------------------------------------------------------------------


@dataclass(frozen=True)
class _Naming:
    """What the caller chose for the derived series' identity and description."""

    model_id: str
    model_version: str
    factor: int
    series_number_offset: int
    description_template: str
    software_version: str
    created: datetime


def _series_attributes(
    sources: Sequence[_Source], geo: _Geometry, naming: _Naming, notes: list[str]
) -> Dataset:
    """Everything that is the same on every derived instance, built and validated once."""
    first = sources[0]
    ds = Dataset()
    if "SpecificCharacterSet" in first.ds:
        ds.SpecificCharacterSet = copy.deepcopy(first.ds.SpecificCharacterSet)
    copy_valid(ds, (first.element(kw) for kw in PATIENT + STUDY + SERIES + IMAGE_CONSTANT), notes)
    lat = laterality(first.ds, ds.get("BodyPartExamined"), notes)
    if lat is not None:
        ds.add(lat)
    for kw in TYPE2_SERIES:
        if kw not in ds:
            setattr(ds, kw, None)

    date, time = naming.created.strftime("%Y%m%d"), naming.created.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.SOPClassUID = CTImageStorage
    ds.SeriesInstanceUID = derived_series_uid(
        str(first.get("SeriesInstanceUID")),
        [s.identity for s in sources],
        model_id=naming.model_id,
        model_version=naming.model_version,
        factor=naming.factor,
    )
    src_number = first.get("SeriesNumber")
    ds.SeriesNumber = (
        int(src_number) if src_number not in (None, "") else 0  # type: ignore[call-overload]
    ) + naming.series_number_offset
    ds.SeriesDescription = naming.description_template.format(
        source_description=str(first.get("SeriesDescription", "") or "").strip(),
        spacing=round(geo.new_spacing, 4),
        source_spacing=round(geo.source_spacing, 4),
        factor=naming.factor,
        model_id=naming.model_id,
        model_version=naming.model_version,
    ).strip()[:64]
    derivation = (
        f"Thin-slice interpolation by {naming.model_id} {naming.model_version}: slice spacing "
        f"{geo.source_spacing:.4g} mm -> {geo.new_spacing:.4g} mm (factor {naming.factor})"
    )
    ds.DerivationDescription = derivation
    ds.DerivationCodeSequence = DicomSequence([_code("113085", "DCM", "Spatial resampling")])
    ds.ContributingEquipmentSequence = DicomSequence([_equipment(naming, derivation)])
    ds.BurnedInAnnotation = "NO"
    lossy, lossy_methods, lossy_ratios = _lossy_attributes(sources)
    if lossy is not None:
        ds.LossyImageCompression = lossy
        if lossy == "01" and lossy_methods:
            ds.LossyImageCompressionMethod = lossy_methods
            if lossy_ratios and len(lossy_ratios) == len(lossy_methods):
                ds.LossyImageCompressionRatio = lossy_ratios
    ds.SliceThickness = format_ds(geo.new_spacing)
    ds.SpacingBetweenSlices = format_ds(geo.new_spacing)
    return ds


def _equipment(naming: _Naming, derivation: str) -> Dataset:
    equipment = Dataset()
    equipment.Manufacturer = SOFTWARE_NAME
    equipment.ManufacturerModelName = naming.model_id[:64]
    equipment.SoftwareVersions = [naming.software_version[:64], naming.model_version[:64]]
    equipment.ContributionDateTime = naming.created.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = derivation[:1024]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109102", "DCM", "Processing Equipment")]
    )
    return equipment


def _nearest_attributes(src: _Source, notes: list[str]) -> Dataset:
    """Acquisition, CT image and window attributes of one source slice, validated."""
    ds = Dataset()
    copy_valid(ds, (src.element(kw) for kw in IMAGE_NEAREST), notes)
    for kw in TYPE2_NEAREST:
        if kw not in ds:
            setattr(ds, kw, None)
    return ds


def _fresh(template: Dataset, into: Dataset) -> Dataset:
    """Add copies of ``template``'s elements to ``into`` that share no mutable value with it.
    Much cheaper than deepcopy, which dominated the per-file cost: strings, numbers and person
    names are immutable and stay shared, and the values are already converted and valid."""
    for elem in template:
        value, converted = elem.value, True
        if isinstance(value, DicomSequence):
            value = DicomSequence([_fresh(item, Dataset()) for item in value])
        elif isinstance(value, MultiValue):
            value, converted = list(value), False  # pydicom makes a new MultiValue of it
        into.add(
            DataElement(
                elem.tag, elem.VR, value, already_converted=converted, validation_mode=config.IGNORE
            )
        )
    return into


# --- one derived instance ---------------------------------------------------------------------


def _references(ds: Dataset, contributing: Sequence[_Source], series_uid: str) -> None:
    """SourceImageSequence: the contributing source planes; ReferencedSeriesSequence: their
    series and instances (a multi-frame instance once)."""
    ds.SourceImageSequence = DicomSequence()
    instances: dict[str, Dataset] = {}
    for src in contributing:
        ref = src.reference()
        ref.PurposeOfReferenceCodeSequence = DicomSequence([_code(*_SOURCE_PURPOSE)])
        ds.SourceImageSequence.append(ref)
        item = Dataset()
        item.ReferencedSOPClassUID = src.ds.SOPClassUID
        item.ReferencedSOPInstanceUID = src.ds.SOPInstanceUID
        instances.setdefault(str(src.ds.SOPInstanceUID), item)
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedInstanceSequence = DicomSequence(list(instances.values()))
    ds.ReferencedSeriesSequence = DicomSequence([series])


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _instance(
    k: int,
    series: Dataset,
    nearest: Dataset,
    contributing: Sequence[_Source],
    geo: _Geometry,
    sop_uid: str,
    pixels: bytes,
) -> Dataset:
    """Derived slice ``k``: the series attributes, its nearest source's, its place and pixels."""
    ds = _fresh(nearest, _fresh(series, Dataset()))
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    _references(ds, contributing, str(contributing[0].get("SeriesInstanceUID")))
    ds.ImagePositionPatient = _ds_list(geo.positions[k])
    if geo.slice_locations is not None:
        ds.SliceLocation = format_ds(geo.slice_locations[k])
    ds.PixelData = pixels
    ds.file_meta = _file_meta(sop_uid)
    return ds


def write_derived_series(
    sources: Sequence[Dataset | SourceImage],
    volume_hu: np.ndarray,
    *,
    factor: int,
    model_id: str,
    model_version: str,
    series_number_offset: int = 1000,
    description_template: str = DEFAULT_DESCRIPTION_TEMPLATE,
    software_version: str = "0.1.0",
    created: datetime | None = None,
    out_dir: Path | str | None = None,
    spacing_rel_tol: float = 0.05,
    slice_vector: Sequence[float] | None = None,
    spacing_mm: float | None = None,
) -> DerivedSeries:
    """Build (and optionally write) the derived thin-slice CT series.

    ``sources`` are the source planes in stacking order: single-frame CT datasets, or
    :class:`SourceImage` (dataset, frame) for frames of multi-frame images. Headers suffice (read
    with ``stop_before_pixels=True`` is fine). ``volume_hu`` is float HU of shape
    ``((n - 1) * factor + 1, Rows, Columns)`` with ``volume_hu[k * factor]`` at source ``k``.

    ``slice_vector`` and ``spacing_mm`` (both or neither) are the plan's mean slice-to-slice
    vector and plane spacing; without them they are measured from the sources, which must then be
    evenly spaced in one direction (within ``spacing_rel_tol``).

    ``description_template`` is formatted with ``source_description``, ``spacing`` (new, mm),
    ``source_spacing``, ``factor``, ``model_id`` and ``model_version``; keep PHI out of it. The
    result is cut to 64 characters. ``created`` stamps series/content/instance-creation date and
    time (default: now). With ``out_dir`` each dataset is written there as
    ``<SOPInstanceUID>.dcm`` (Explicit VR Little Endian) and ``ds.filename`` is set.

    Raises :class:`DerivedSeriesError` for inconsistent input: fewer than two sources, mixed
    series, orientation or matrix, a volume of the wrong shape, or uneven spacing.
    """
    volume_hu = np.asarray(volume_hu)
    srcs = [_Source(s) for s in sources]
    _check_inputs(srcs, volume_hu, factor)
    if (slice_vector is None) != (spacing_mm is None):
        raise DerivedSeriesError("give both slice_vector and spacing_mm, or neither")
    n_out = volume_hu.shape[0]
    plan_step = None if slice_vector is None else (slice_vector, float(spacing_mm))  # type: ignore[arg-type]
    geo = _geometry(srcs, factor, n_out, plan_step, spacing_rel_tol)
    naming = _Naming(
        model_id,
        model_version,
        factor,
        series_number_offset,
        description_template,
        software_version,
        created or datetime.now(),
    )
    notes: list[str] = []
    series = _series_attributes(srcs, geo, naming, notes)
    encoding = _PixelEncoding.of(srcs[0])
    encoding.describe(series)
    sop_hash = instances_hash([s.identity for s in srcs])
    src_series_uid = str(srcs[0].get("SeriesInstanceUID"))
    nearest_cache: dict[int, Dataset] = {}

    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    results: list[Dataset] = []
    for k in range(n_out):
        i, r = divmod(k, factor)
        j = min(len(srcs) - 1, int(round(k / factor)))
        if j not in nearest_cache:
            nearest_cache[j] = _nearest_attributes(srcs[j], notes)
        sop_uid = _instance_uid(src_series_uid, sop_hash, model_id, model_version, factor, k)
        contributing = [srcs[i]] if r == 0 else [srcs[i], srcs[i + 1]]
        ds = _instance(
            k, series, nearest_cache[j], contributing, geo, sop_uid, encoding.encode(volume_hu[k])
        )
        if out_path is not None:
            target = out_path / f"{sop_uid}.dcm"
            pydicom.dcmwrite(target, ds, enforce_file_format=True)
            ds.filename = str(target)
        results.append(ds)
    return DerivedSeries(str(series.SeriesInstanceUID), results, list(dict.fromkeys(notes)))

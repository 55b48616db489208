"""Write the derived thin-slice series: single-frame CT Image Storage instances that pass dciodvfy.

One entry point, :func:`write_derived_series`. It takes the source instances (sorted in stacking
order) and the interpolated HU volume, and returns the new datasets (also written to disk when an
output folder is given). What it promises:

* Identity: CT Image Storage, Explicit VR Little Endian, our ImplementationClassUID. The series and
  SOP Instance UIDs depend only on (source series UID, sorted source SOP Instance UIDs, model id,
  model version, factor[, slice index]), so reprocessing the same input never adds a second series
  to a PACS.
* Copied from the source, as elements (character set kept): patient, study, frame of reference,
  General Series (Modality, PatientPosition, Laterality even when empty, BodyPartExamined),
  equipment, acquisition, contrast, pixel description, rescale and VOI window. Acquisition and
  window attributes come from the nearest source slice. Never copied: private tags,
  Smallest/LargestImagePixelValue, pixel padding, and anything not on the allow-lists below.
* Derivation: ImageType DERIVED\\SECONDARY\\AXIAL, DerivationDescription, DerivationCodeSequence
  (113085, DCM, "Spatial resampling"), SourceImageSequence (the one or two bracketing source slices,
  purpose 121322), ReferencedSeriesSequence and ContributingEquipmentSequence (109102).
* Geometry: ``IPP_k = IPP_0 + k * (step / factor)`` where ``step`` is the real mean slice-to-slice
  vector of the sources (the normal times the spacing, or the sheared vector under gantry tilt).
  SliceThickness and SpacingBetweenSlices are the new plane spacing; SliceLocation is interpolated
  from the sources' when they all have one, omitted otherwise; InstanceNumber runs 1..N.
* Pixels: stored = round((HU - intercept) / slope) with the source's rescale, clipped to the range
  of the source's BitsStored and PixelRepresentation, as uint16 or int16.
* Every DS value is formatted to at most 16 characters here (pydicom would write longer ones).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.geometry import check_spacing, derived_positions, orientations_equal, slice_normal
from dicom_node.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    deterministic_uid,
)

__all__ = ["DerivedSeriesError", "derived_series_uid", "format_ds", "write_derived_series"]

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

# --- what is copied -------------------------------------------------------------------------------
# Series, study and patient level attributes come from the first source, so they are identical on
# every derived instance (dcentvfy checks that).
_PATIENT = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "EthnicGroup",
    "QualityControlSubject",
)
_STUDY = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "RequestingService",
    # Patient Study module
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "SmokingStatus",
    "PatientSexNeutered",
    "MedicalAlerts",
    "Allergies",
)
_SERIES = (
    "Modality",
    "PatientPosition",
    "Laterality",
    "BodyPartExamined",
    "ProtocolName",
    "RequestAttributesSequence",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    # General Equipment (series level): the scanner stays the equipment; we are contributing
    "Manufacturer",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "InstitutionalDepartmentName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "SpatialResolution",
    "DateOfLastCalibration",
    "TimeOfLastCalibration",
    "GantryID",
    # SOP Common
    "TimezoneOffsetFromUTC",
)
# Same on every derived image: pixel description, rescale, contrast.
_IMAGE_CONSTANT = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "PixelRepresentation",
    "PixelSpacing",
    "ImageOrientationPatient",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ContrastBolusAgent",
    "ContrastBolusAgentSequence",
    "ContrastBolusRoute",
    "ContrastBolusAdministrationRouteSequence",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusStopTime",
    "ContrastBolusTotalDose",
    "ContrastFlowRate",
    "ContrastFlowDuration",
    "ContrastBolusIngredient",
    "ContrastBolusIngredientConcentration",
)
# Per derived image, from the nearest source slice: acquisition, CT image and VOI attributes.
# Position-valued ones (DataCollectionCenterPatient, ReconstructionTargetCenterPatient) are left
# out on purpose: they would be wrong for an interpolated plane.
_IMAGE_NEAREST = (
    "AcquisitionNumber",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "IrradiationEventUID",
    "KVP",
    "ScanOptions",
    "DataCollectionDiameter",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "ExposureInuAs",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "ExposureModulationType",
    "CTDIvol",
    "CTDIPhantomTypeCodeSequence",
    "WaterEquivalentDiameter",
    "WaterEquivalentDiameterCalculationMethodCodeSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
)


class DerivedSeriesError(ValueError):
    """The sources and volume cannot make a consistent derived series; the message says why."""


def format_ds(value: float) -> str:
    """Format a number as a DICOM DS string of at most 16 characters (PS3.5 6.2).

    Uses the most significant digits that fit, in fixed or exponent notation.
    """
    v = float(value)
    if not math.isfinite(v):
        raise DerivedSeriesError(f"DS value must be finite, got {value!r}")
    if v == 0.0:
        return "0"
    for digits in range(16, 0, -1):
        s = f"{v:.{digits}g}"
        if "e" in s:
            mant, exp = s.split("e")
            s = f"{mant}e{int(exp)}"
        if len(s) <= 16:
            return s
    raise AssertionError("unreachable: 1 significant digit always fits")  # pragma: no cover


def _sop_hash(sop_uids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode("ascii")).hexdigest()


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
        _sop_hash(source_sop_uids),
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


def _copy(dst: Dataset, src: Dataset, keywords: Sequence[str]) -> None:
    for kw in keywords:
        if kw in src:
            dst[kw] = deepcopy(src[kw])


def _ds_list(values: Sequence[float]) -> list[str]:
    return [format_ds(v) for v in values]


def _fix_long_ds(ds: Dataset) -> None:
    """Reformat any DS value longer than 16 characters (copied from a non-conformant source)."""
    for elem in ds.iterall():
        if elem.VR != "DS" or elem.value is None or elem.VM == 0:
            continue
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        if any(len(str(v)) > 16 for v in values):
            fixed = [format_ds(float(v)) for v in values]
            elem.value = fixed if elem.VM > 1 else fixed[0]


def _lossy_attributes(sources: Sequence[Dataset]) -> tuple[str | None, list[str], list[str]]:
    """LossyImageCompression value to propagate, with its methods and ratios."""
    methods: list[str] = []
    ratios: list[str] = []
    flag: str | None = None
    for src in sources:
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


def _check_inputs(sources: Sequence[Dataset], volume_hu: np.ndarray, factor: int) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise DerivedSeriesError(f"factor must be a positive integer, got {factor!r}")
    if len(sources) < 2:
        raise DerivedSeriesError(f"need at least two source slices, got {len(sources)}")
    first = sources[0]
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
    if int(first.get("NumberOfFrames", 1) or 1) != 1:
        raise DerivedSeriesError("sources must be single-frame images")
    for i, s in enumerate(sources):
        if s.SeriesInstanceUID != first.SeriesInstanceUID:
            raise DerivedSeriesError(f"source slice {i} belongs to another series")
        if (s.Rows, s.Columns) != (first.Rows, first.Columns):
            raise DerivedSeriesError(f"source slice {i} has a different matrix size")
        if not orientations_equal(s.ImageOrientationPatient, first.ImageOrientationPatient):
            raise DerivedSeriesError(f"source slice {i} has a different orientation")
    if len({s.SOPInstanceUID for s in sources}) != len(sources):
        raise DerivedSeriesError("duplicate SOPInstanceUID among the sources")
    expected = ((len(sources) - 1) * factor + 1, int(first.Rows), int(first.Columns))
    if volume_hu.shape != expected:
        raise DerivedSeriesError(
            f"volume shape {volume_hu.shape} does not match {len(sources)} sources at factor "
            f"{factor}: expected {expected}"
        )
    if not np.all(np.isfinite(volume_hu)):
        raise DerivedSeriesError("volume contains NaN or infinite values")


def write_derived_series(
    sources: Sequence[Dataset],
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
) -> list[Dataset]:
    """Build (and optionally write) the derived thin-slice CT series.

    ``sources`` are the source single-frame CT datasets in stacking order (headers suffice: read
    with ``stop_before_pixels=True`` is fine). ``volume_hu`` is float HU of shape
    ``((n - 1) * factor + 1, Rows, Columns)`` with ``volume_hu[k * factor]`` at source ``k``.

    ``description_template`` is formatted with ``source_description``, ``spacing`` (new, mm),
    ``source_spacing``, ``factor``, ``model_id`` and ``model_version``; keep PHI out of it. The
    result is cut to 64 characters. ``created`` stamps series/content/instance-creation date and
    time (default: now). With ``out_dir`` each dataset is written there as
    ``<SOPInstanceUID>.dcm`` (Explicit VR Little Endian) and ``ds.filename`` is set.

    Raises :class:`DerivedSeriesError` for inconsistent input: fewer than two sources, mixed
    series, orientation or matrix, a volume of the wrong shape, or slices that are not evenly
    spaced in one direction (within ``spacing_rel_tol``).
    """
    volume_hu = np.asarray(volume_hu)
    _check_inputs(sources, volume_hu, factor)
    first = sources[0]
    n_src = len(sources)
    n_out = volume_hu.shape[0]

    # Geometry: the real mean slice-to-slice vector, in the given stacking order.
    normal = slice_normal([float(v) for v in first.ImageOrientationPatient])
    ipp = np.array([[float(v) for v in s.ImagePositionPatient] for s in sources])
    dist = ipp @ normal
    sign = 1.0 if dist[-1] >= dist[0] else -1.0
    if np.any(np.diff(sign * dist) < 0):
        raise DerivedSeriesError("sources are not an evenly spaced stack in the given order")
    report = check_spacing(sign * dist, rel_tol=spacing_rel_tol, abs_tol_mm=0.01)
    if not report.uniform or report.spacing is None:
        raise DerivedSeriesError(
            f"sources are not an evenly spaced stack in the given order: {report.reason}"
        )
    step = (ipp[-1] - ipp[0]) / (n_src - 1)
    source_spacing = abs(float(step @ normal))
    new_spacing = source_spacing / factor
    positions = derived_positions(ipp[0], step, float(np.linalg.norm(step)) / factor, n_out)

    slice_locations: list[float] | None = None
    if all("SliceLocation" in s and s.SliceLocation is not None for s in sources):
        sl0, sl1 = float(first.SliceLocation), float(sources[-1].SliceLocation)
        slice_locations = [sl0 + (sl1 - sl0) * k / (n_out - 1) for k in range(n_out)]

    # Pixel encoding from the first source (rescale is series-constant in what we write).
    bits_stored = int(first.BitsStored)
    if not 1 <= bits_stored <= 16:
        raise DerivedSeriesError(f"unsupported BitsStored {bits_stored}")
    signed = int(first.PixelRepresentation) == 1
    lo, hi = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
        if signed
        else (
            0,
            2**bits_stored - 1,
        )
    )
    slope = float(first.get("RescaleSlope", 1) or 1)
    intercept = float(first.get("RescaleIntercept", 0) or 0)
    dtype = np.dtype("<i2" if signed else "<u2")

    # Identity.
    sop_uids = [str(s.SOPInstanceUID) for s in sources]
    sop_hash = _sop_hash(sop_uids)
    src_series_uid = str(first.SeriesInstanceUID)
    series_uid = derived_series_uid(
        src_series_uid, sop_uids, model_id=model_id, model_version=model_version, factor=factor
    )
    created = created or datetime.now()
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    src_number = first.get("SeriesNumber")
    series_number = (int(src_number) if src_number not in (None, "") else 0) + series_number_offset
    description = description_template.format(
        source_description=str(first.get("SeriesDescription", "") or "").strip(),
        spacing=round(new_spacing, 4),
        source_spacing=round(source_spacing, 4),
        factor=factor,
        model_id=model_id,
        model_version=model_version,
    ).strip()[:64]
    derivation = (
        f"Thin-slice interpolation by {model_id} {model_version}: slice spacing "
        f"{source_spacing:.4g} mm -> {new_spacing:.4g} mm (factor {factor})"
    )
    lossy, lossy_methods, lossy_ratios = _lossy_attributes(sources)

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = src_series_uid
    referenced_series.ReferencedInstanceSequence = DicomSequence()
    for s in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = s.SOPClassUID
        ref.ReferencedSOPInstanceUID = s.SOPInstanceUID
        referenced_series.ReferencedInstanceSequence.append(ref)

    equipment = Dataset()
    equipment.Manufacturer = SOFTWARE_NAME
    equipment.ManufacturerModelName = model_id[:64]
    equipment.SoftwareVersions = [software_version[:64], model_version[:64]]
    equipment.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = derivation[:1024]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109102", "DCM", "Processing Equipment")]
    )

    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    results: list[Dataset] = []
    for k in range(n_out):
        i, r = divmod(k, factor)
        nearest = sources[min(n_src - 1, int(round(k / factor)))]
        sop_uid = _instance_uid(src_series_uid, sop_hash, model_id, model_version, factor, k)

        ds = Dataset()
        if "SpecificCharacterSet" in first:
            ds.SpecificCharacterSet = deepcopy(first.SpecificCharacterSet)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.SeriesDate = date
        ds.SeriesTime = time
        ds.ContentDate = date
        ds.ContentTime = time
        _copy(ds, first, _PATIENT + _STUDY + _SERIES + _IMAGE_CONSTANT)
        _copy(ds, nearest, _IMAGE_NEAREST)
        # Type 2 attributes that must be present even when the source lacks them.
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyID",
            "AccessionNumber",
            "Laterality",
            "PatientPosition",
            "PositionReferenceIndicator",
            "Manufacturer",
            "KVP",
            "AcquisitionNumber",
        ):
            if kw not in ds:
                setattr(ds, kw, None)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = DicomSequence([_code("113085", "DCM", "Spatial resampling")])
        ds.SourceImageSequence = DicomSequence()
        for j in (i,) if r == 0 else (i, i + 1):
            ref = Dataset()
            ref.ReferencedSOPClassUID = sources[j].SOPClassUID
            ref.ReferencedSOPInstanceUID = sources[j].SOPInstanceUID
            ref.PurposeOfReferenceCodeSequence = DicomSequence(
                [_code("121322", "DCM", "Source image for image processing operation")]
            )
            ds.SourceImageSequence.append(ref)
        ds.ReferencedSeriesSequence = DicomSequence([deepcopy(referenced_series)])
        ds.ContributingEquipmentSequence = DicomSequence([deepcopy(equipment)])
        ds.BurnedInAnnotation = "NO"
        if lossy is not None:
            ds.LossyImageCompression = lossy
            if lossy == "01" and lossy_methods:
                ds.LossyImageCompressionMethod = lossy_methods
                if lossy_ratios and len(lossy_ratios) == len(lossy_methods):
                    ds.LossyImageCompressionRatio = lossy_ratios

        ds.ImagePositionPatient = _ds_list(positions[k])
        ds.SliceThickness = format_ds(new_spacing)
        ds.SpacingBetweenSlices = format_ds(new_spacing)
        if slice_locations is not None:
            ds.SliceLocation = format_ds(slice_locations[k])

        stored = np.clip(np.rint((volume_hu[k].astype(np.float64) - intercept) / slope), lo, hi)
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = stored.astype(dtype).tobytes()

        ds.remove_private_tags()
        _fix_long_ds(ds)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta

        if out_path is not None:
            target = out_path / f"{sop_uid}.dcm"
            pydicom.dcmwrite(target, ds, enforce_file_format=True)
            ds.filename = str(target)
        results.append(ds)
    return results

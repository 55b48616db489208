"""What a derived series copies from its source, and how each copied value is made valid.

The writer (``write.py``) promises dciodvfy 0 errors even when a source breaks the standard, so
every element it copies goes through :func:`valid_copy` first:

* an element sent with a VR other than the dictionary's (Rows as UL) gets the dictionary's VR
  when its value fits that VR, and is left out otherwise;
* text longer than its VR allows is cut to the maximum (PN: 64 characters per component group),
  and control characters are removed from single-line text;
* a CS value in lower case is upper-cased, a DS value is reformatted to 16 characters, an IS value
  such as "3.0" becomes "3";
* a value that cannot be repaired (a date that is not a date, an age that is not an age) is left
  out. The writer then adds the Type 2 attributes empty, as it does when the source lacks them.

Identifiers (UI) are copied as they are, because changing one would break the link to the
source. Private elements inside copied sequences are dropped. Every repair adds a note that names
the attribute and what was done, never the value, which may be patient data.

Laterality (0020,0060) is Type 2C: required for paired body parts, forbidden otherwise.
:func:`laterality` decides it from BodyPartExamined.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import VALIDATORS, PersonName

__all__ = [
    "IMAGE_CONSTANT",
    "IMAGE_NEAREST",
    "PATIENT",
    "SERIES",
    "STUDY",
    "TYPE2_NEAREST",
    "TYPE2_SERIES",
    "UNPAIRED_BODY_PARTS",
    "copy_valid",
    "format_ds",
    "laterality",
    "valid_copy",
]

# --- what is copied -------------------------------------------------------------------------------
# Series, study and patient level attributes come from the first source, so they are identical on
# every derived instance (dcentvfy checks that). Laterality is not listed: see laterality().
PATIENT = (
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
STUDY = (
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
SERIES = (
    "Modality",
    "PatientPosition",
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
IMAGE_CONSTANT = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
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
IMAGE_NEAREST = (
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
# Type 2 attributes that must be present (empty when unknown) even when the source lacks them.
TYPE2_SERIES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PatientPosition",
    "PositionReferenceIndicator",
    "Manufacturer",
)
TYPE2_NEAREST = ("KVP", "AcquisitionNumber")

# BodyPartExamined terms of PS3.16 Annex L that are not paired structures: Laterality must be
# absent for these. Checked one by one against dciodvfy, which reports "present when condition
# unsatisfied" for each; for every other term, and for an absent BodyPartExamined, dciodvfy
# wants Laterality present, so an empty one is added when the source has none.
_UNPAIRED_TERMS = """
    ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN
    CHESTABDPELVIS CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS
    FACE GALLBLADDER HEAD HEADNECK HEART ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE
    MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS
    PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE SPLEEN SSPINE STERNUM STOMACH THYMUS
    THYROID TLSPINE TONGUE TRACHEA TSPINE URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY"""
UNPAIRED_BODY_PARTS = frozenset(_UNPAIRED_TERMS.split())

# --- value repair ---------------------------------------------------------------------------------
# Maximum length in characters (PS3.5 table 6.2-1); PN is checked per component group.
_MAX_CHARS = {"AE": 16, "CS": 16, "LO": 64, "LT": 10240, "SH": 16, "ST": 1024, "UC": None}
_INT_RANGE = {
    "US": (0, 2**16 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1),
}
_TEXT = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM"})
# Control characters: none in single-line text; ESC (character sets) everywhere; TAB, LF, FF, CR
# only in ST/LT.
_CONTROL_SINGLE = re.compile("[\x00-\x1a\x1c-\x1f\x7f]")
_CONTROL_MULTI = re.compile("[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


class _Unrepairable(ValueError):
    """The value cannot be made valid for its VR; the element is left out."""


def format_ds(value: float) -> str:
    """Format a number as a DICOM DS string of at most 16 characters (PS3.5 6.2).

    Uses the most significant digits that fit, in fixed or exponent notation. Raises
    ``ValueError`` for NaN and infinity, which DS cannot hold.
    """
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"DS value must be finite, got {value!r}")
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


def _dictionary_vr(elem: DataElement) -> str:
    """The VR the standard gives this tag; the element's own VR for ambiguous or unknown tags."""
    try:
        vr = dictionary_VR(elem.tag)
    except KeyError:
        return elem.VR
    return elem.VR if " or " in vr else vr


def _as_int(value: object) -> int:
    number = float(value) if isinstance(value, int | float) else float(str(value).strip())
    if not math.isfinite(number) or number != int(number):
        raise _Unrepairable("not an integer")
    return int(number)


def _convert(value: object, vr: str) -> object:
    """``value`` (read under another VR) as a value of ``vr``."""
    if vr in _INT_RANGE:
        lo, hi = _INT_RANGE[vr]
        number = _as_int(value)
        if not lo <= number <= hi:
            raise _Unrepairable("out of range")
        return number
    if vr in ("FL", "FD"):
        return float(value)  # type: ignore[arg-type]
    if vr == "IS":
        return str(_as_int(value))
    if vr == "DS":
        return format_ds(float(str(value).strip()))
    if vr in _TEXT or vr in ("UC", "UT", "UI", "UR"):
        if isinstance(value, bytes | bytearray):
            raise _Unrepairable("binary value")
        return str(value)
    raise _Unrepairable(f"cannot convert to {vr}")


def _valid(vr: str, value: object) -> bool:
    if vr in _TEXT:
        # pydicom validates text as str (values read from a file may be DSfloat, IS or
        # PersonName) and does not look for control characters, which dciodvfy rejects.
        value = str(value)
        control = _CONTROL_MULTI if vr in ("ST", "LT") else _CONTROL_SINGLE
        if control.search(value):
            return False
    validator = VALIDATORS.get(vr)
    return True if validator is None else validator(vr, value)[0]


def _repair_text(vr: str, value: str) -> tuple[str, list[str]]:
    """Remove control characters, cut to the VR's length; returns the value and what was done."""
    what: list[str] = []
    pattern = _CONTROL_MULTI if vr in ("ST", "LT") else _CONTROL_SINGLE
    cleaned = pattern.sub("", value)
    if cleaned != value:
        what.append("control characters removed")
    if vr == "PN":
        groups = cleaned.split("=")
        if any(len(g) > 64 for g in groups):
            cleaned = "=".join(g[:64] for g in groups)
            what.append("cut to 64 characters per component group")
    elif vr == "CS" and cleaned != cleaned.upper():
        cleaned = cleaned.upper()
        what.append("upper-cased")
    limit = _MAX_CHARS.get(vr)
    if vr != "PN" and limit is not None and len(cleaned) > limit:
        cleaned = cleaned[:limit].rstrip() if vr != "CS" else cleaned[:limit]
        what.append(f"cut to {limit} characters")
    return cleaned, what


def _repair(vr: str, value: object) -> tuple[object, list[str]]:
    """A valid ``vr`` value for ``value``, with what was done (empty when it was valid)."""
    if value is None or value == "" or vr == "UI" or _valid(vr, value):
        return value, []
    if vr == "DS":
        try:
            return format_ds(float(str(value).strip())), ["reformatted to 16 characters"]
        except ValueError as exc:
            raise _Unrepairable("not a number") from exc
    if vr == "IS":
        return str(_as_int(value)), ["written as an integer"]
    if vr in ("PN", "LO", "SH", "ST", "LT", "CS", "AE"):
        fixed, what = _repair_text(vr, str(value))
        if _valid(vr, fixed):
            return (PersonName(fixed) if vr == "PN" else fixed), what
    raise _Unrepairable(f"not a valid {vr} value")


def _values(elem: DataElement) -> list[object]:
    value = elem.value
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def valid_copy(elem: DataElement, notes: list[str], path: str = "") -> DataElement | None:
    """A copy of ``elem`` whose value is valid for the dictionary VR, or ``None`` to leave it out.

    Appends one note per repair or omission to ``notes`` (attribute names only, no values).
    Sequences are repaired item by item; private elements in them are dropped.
    """
    name = f"{path}{elem.keyword or elem.tag}"
    if elem.tag.is_private:
        return None
    vr = _dictionary_vr(elem)
    if vr == "SQ" or elem.VR == "SQ":
        if elem.VR != "SQ" or vr != "SQ":
            notes.append(f"{name}: sent with VR {elem.VR} instead of {vr}; left out")
            return None
        items = []
        for item in elem.value or []:
            new = Dataset()
            for sub in item:
                fixed = valid_copy(sub, notes, f"{name} > ")
                if fixed is not None:
                    new.add(fixed)
            items.append(new)
        return DataElement(elem.tag, "SQ", DicomSequence(items))
    if elem.VM == 0 or elem.value is None:
        return DataElement(elem.tag, vr, None)
    done: list[str] = []
    try:
        values = _values(elem)
        if vr != elem.VR:
            values = [_convert(v, vr) for v in values]
            done.append(f"sent with VR {elem.VR}, written as {vr}")
        fixed = []
        for v in values:
            new, what = _repair(vr, v)
            fixed.append(new)
            done.extend(w for w in what if w not in done)
    except (_Unrepairable, ValueError, TypeError, OverflowError) as exc:
        notes.append(f"{name}: value not valid for VR {vr} ({exc}); left out")
        return None
    if not done:
        return DataElement(elem.tag, vr, _copy_value(elem.value))
    notes.append(f"{name}: {', '.join(done)}")
    return DataElement(elem.tag, vr, fixed if len(fixed) > 1 else fixed[0])


def _copy_value(value: object) -> object:
    """Values of copied elements are immutable apart from multi-values: copy those."""
    return list(value) if isinstance(value, MultiValue) else value


def copy_valid(dst: Dataset, elements: Iterable[DataElement | None], notes: list[str]) -> None:
    """Add each of ``elements`` (``None``: absent in the source) to ``dst`` through
    :func:`valid_copy`."""
    for elem in elements:
        if elem is not None:
            fixed = valid_copy(elem, notes)
            if fixed is not None:
                dst.add(fixed)


def laterality(source: Dataset, body_part: str | None, notes: list[str]) -> DataElement | None:
    """The Laterality element of the derived series, or ``None`` when it must be absent.

    Absent for a body part that is not a paired structure (CHEST, ABDOMEN, HEAD...), whatever the
    source says; otherwise the source's value when it is R or L, else empty (unknown).
    """
    tag = 0x00200060
    value = str(source.get("Laterality", "") or "").strip().upper()
    part = (body_part or "").strip().upper()
    if part in UNPAIRED_BODY_PARTS:
        if value:
            notes.append(f"Laterality: left out, BodyPartExamined {part} is not a paired structure")
        return None
    if value and value not in ("R", "L"):
        notes.append("Laterality: not R or L; written empty")
        value = ""
    return DataElement(tag, "CS", value or None)

"""What a derived series copies from its source, and how copied values are written.

The allow-lists below name every attribute the writer (``write.py``) copies; anything else,
private elements included, is never copied. :func:`copy_elements` copies them with the two fixes
the writer has always made: private elements inside copied sequences are dropped, and DS values
longer than 16 characters are reformatted (:func:`format_ds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

__all__ = [
    "IMAGE_CONSTANT",
    "IMAGE_NEAREST",
    "PATIENT",
    "SERIES",
    "STUDY",
    "TYPE2_NEAREST",
    "TYPE2_SERIES",
    "copy_elements",
    "format_ds",
]

# --- what is copied -------------------------------------------------------------------------------
# Series, study and patient level attributes come from the first source, so they are identical on
# every derived instance (dcentvfy checks that).
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
    "Laterality",
    "PatientPosition",
    "PositionReferenceIndicator",
    "Manufacturer",
)
TYPE2_NEAREST = ("KVP", "AcquisitionNumber")


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


def _copy(elem: DataElement) -> DataElement | None:
    if elem.tag.is_private:
        return None
    value = elem.value
    if elem.VR == "SQ":
        items = []
        for item in value or []:
            new = Dataset()
            for sub in item:
                fixed = _copy(sub)
                if fixed is not None:
                    new.add(fixed)
            items.append(new)
        return DataElement(elem.tag, "SQ", DicomSequence(items))
    if elem.VR == "DS" and elem.VM:
        values = list(value) if elem.VM > 1 else [value]
        if any(len(str(v)) > 16 for v in values):
            fixed_ds = [format_ds(float(v)) for v in values]
            return DataElement(elem.tag, "DS", fixed_ds if elem.VM > 1 else fixed_ds[0])
    return DataElement(elem.tag, elem.VR, list(value) if isinstance(value, MultiValue) else value)


def copy_elements(dst: Dataset, elements: Iterable[DataElement | None]) -> None:
    """Add a copy of each of ``elements`` (``None``: absent in the source) to ``dst``."""
    for elem in elements:
        if elem is not None:
            fixed = _copy(elem)
            if fixed is not None:
                dst.add(fixed)

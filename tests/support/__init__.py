"""Reusable test helpers that start real DICOM peers (dcmtk storescp, Debian Orthanc).

See :mod:`tests.support.dcmtk` and :mod:`tests.support.orthanc`.
"""

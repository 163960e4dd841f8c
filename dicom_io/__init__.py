"""Imaging I/O: DICOMweb retrieval, DICOM decoding, and assembly into an analyzer's input.

``dicom_io.dicomweb`` fetches a series over WADO-RS; ``dicom_io.volume`` turns cross-sectional instances into a
checked, sorted volume; ``dicom_io.projection`` turns a radiograph into presentation intensities. The output is a
:class:`models.base.ImageInput`; nothing here knows about FHIR or the EHR.
"""

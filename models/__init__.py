"""Pure image analyzers: arrays and spacing in, findings out.

Nothing in this package knows about FHIR, DICOM files or HTTP. ``models.base`` holds the small interface
every analyzer implements; ``models.registry`` finds an analyzer by name.
"""

"""imaging-cds: medical-imaging AI brought into the EHR through FHIR R4, DICOMweb, SMART and CDS Hooks.

This package is the top of the layering: the ``imaging-cds`` command line (``imaging_cds.cli``), which wires the
layers below it together. See the README's layout section for which package owns which step.
"""

__version__ = "0.1.0"

"""imaging-cds: medical-imaging AI brought into the EHR through FHIR R4, DICOMweb, SMART and CDS Hooks.

The package holds the pipeline that ties the front doors (``cds``, ``smart_launch``) to the adapters
(``fhir_adapters``) and the pure analyzers (``models``).
"""

__version__ = "0.1.0"

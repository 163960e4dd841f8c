"""Identifiers and code systems the project writes, defined once so writers and readers agree.

``CANONICAL_BASE`` is the project's canonical URL for its own naming systems and CodeSystems. The CDS
service and the SMART app recognise AI results by these systems, never by free text.
"""

from __future__ import annotations

from typing import Final

CANONICAL_BASE: Final = "http://imaging-cds.org/fhir"

# Identifier.system of a DiagnosticReport / Observation / Media produced by one analysis. The value is
# deterministic: study UID + series UID + analyzer + version (see fhir_adapters.builders).
ANALYSIS_IDENTIFIER_SYSTEM: Final = f"{CANONICAL_BASE}/sid/analysis"
# Identifier.system of the Device that stands for one analyzer version; value "<name>@<version>".
DEVICE_IDENTIFIER_SYSTEM: Final = f"{CANONICAL_BASE}/sid/analyzer"
# CodeSystem for measured values that have no standard code; code = models.base.Measurement.key.
MEASUREMENT_CODESYSTEM: Final = f"{CANONICAL_BASE}/CodeSystem/measurement"
# CodeSystem for categorical conclusions; code = "<analyzer name>/<Category.code>".
CATEGORY_CODESYSTEM: Final = f"{CANONICAL_BASE}/CodeSystem/finding-category"
# CodeSystem for what a finding is and what is said about it when no standard code fits: finding kinds
# (models.base.Finding.kind, e.g. "lung_nodule") and coded attributes (models.base.CodedValue.key, e.g. "lung_rads").
FINDING_CODESYSTEM: Final = f"{CANONICAL_BASE}/CodeSystem/finding"
# CodeSystem for the values of coded attributes; code = "<CodedValue.key>/<CodedValue.code>" (e.g. "lung_rads/4A").
FINDING_VALUE_CODESYSTEM: Final = f"{CANONICAL_BASE}/CodeSystem/finding-value"

# CodeSystem of the Observations comparing a measurement with the prior study (components and verdicts).
COMPARISON_CODESYSTEM: Final = f"{CANONICAL_BASE}/CodeSystem/comparison"
# Extension on a results DiagnosticReport: how the analysed images were acquired (slice thickness, kernel, contrast,
# tube voltage, scanner), so that a later comparison can name what differs between two scans.
ACQUISITION_EXTENSION: Final = f"{CANONICAL_BASE}/StructureDefinition/image-acquisition"
# Extension on a results DiagnosticReport: the extent of the lungs in DICOM patient coordinates (mm), with which a
# later scan's lung lesions are aligned before they are matched (sub-extensions lowX, lowY, lowZ, highX, highY, highZ).
LUNG_EXTENT_EXTENSION: Final = f"{CANONICAL_BASE}/StructureDefinition/lung-extent"

# HL7 AI Transparency: security label marking content asserted by artificial intelligence.
AI_ASSERTED_SECURITY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AI_ASSERTED_SECURITY_CODE: Final = "AIAST"

# DiagnosticReport.conclusionCode carries the analyzer's verdict as an HL7 v3 ObservationInterpretation
# code: A (abnormal: a finding) or N (no finding, including "could not be assessed").
ABNORMAL_INTERPRETATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

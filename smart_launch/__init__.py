"""SMART App Launch 2.x: the clinician-facing app launched from the EHR."""

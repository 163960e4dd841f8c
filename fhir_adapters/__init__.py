"""Adapters between the EHR (FHIR R4) and the pipeline: a typed client, study reading, resource builders."""

"""The pipeline and job layer: one study analysed end to end, and the jobs that run such analyses.

``pipeline.analysis`` strings the steps together (FHIR study -> DICOMweb -> analyzer -> FHIR write-back);
``pipeline.jobs`` runs analyses as durable jobs; ``pipeline.memory`` keeps built analyzers for a server process.
The front doors (``cds``, ``smart_launch``) and the CLI use this layer; it never imports them.
"""

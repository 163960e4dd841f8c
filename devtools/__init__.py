"""Development and evaluation tools, never part of a deployment: the demo, the real sample studies, local
servers (sekmet-fhir, Orthanc), the sandbox EHR, and the assessment of an analyzer on a labelled dataset.
"""

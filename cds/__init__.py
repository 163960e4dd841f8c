"""CDS Hooks 2.0 service: AI findings as cards where clinicians decide (a Flask blueprint)."""

"""Training scripts for the shipped models (run as modules; never imported by the service)."""

"""``imaging-cds serve`` wiring: the deployment settings and the one WSGI application over both front doors.

``service.settings`` reads the deployment file; ``service.web`` builds the application (CDS Hooks service,
clinician app, model cards) from it; ``service.model_cards`` serves the analyzers' cards.
"""

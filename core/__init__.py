"""What every layer shares: the error hierarchy with remedies, the outbound URL allow-list and the session that
enforces it (``core.outbound``), the input limits (``core.limits``), the DICOM UID check, option look-up.

The bottom of the import graph: nothing here imports any other package of the project (an import-linter
contract in ``pyproject.toml`` checks it), so every layer can use it without a cycle.
"""

"""Find an analyzer by name. Analyzer modules are imported lazily so that importing the registry (as the
CDS Hooks service does) never pulls in torch."""

from __future__ import annotations

import difflib
import importlib

from imaging_cds.errors import ConfigurationError
from models.base import Analyzer

# name -> "module:factory"; the factory takes no arguments and returns an Analyzer.
_BUILTIN: dict[str, str] = {
    "ct-emphysema": "models.emphysema:EmphysemaAnalyzer",
    "ct-bone": "models.bone:BoneAnalyzer",
    "cxr-pneumonia": "models.cxr_pneumonia:PneumoniaAnalyzer",
    "us-breast": "models.breast_us:BreastUltrasoundAnalyzer",
}


def analyzer_names() -> tuple[str, ...]:
    return tuple(sorted(_BUILTIN))


def get_analyzer(name: str) -> Analyzer:
    """Build the analyzer called ``name``; an unknown name fails with a "did you mean" hint."""
    target = _BUILTIN.get(name)
    if target is None:
        close = difflib.get_close_matches(name, _BUILTIN, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(
            f"Unknown analyzer {name!r}.{hint}", remedy=f"Available analyzers: {', '.join(analyzer_names())}."
        )
    module_name, _, factory_name = target.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    analyzer: Analyzer = factory()
    return analyzer

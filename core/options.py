"""Looking up a named option (an analyzer, a job kind, a settings key) with a "did you mean" hint.

One helper for every place a user or an administrator types a name the project must recognise, in the manner of
MONAI's ``look_up_option``: an unknown name fails with the closest known one and the list to choose from, so a
typo costs one read of the message instead of a search through the documentation.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar, overload

from core.errors import ConfigurationError, ImagingCdsError

T = TypeVar("T")


def closest_option(name: str, options: Iterable[str]) -> str | None:
    """The known option most like ``name`` (``difflib``'s default cut-off), or ``None`` when none is close."""
    close = difflib.get_close_matches(str(name), list(options), n=1)
    return close[0] if close else None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest known option, or ``""``: the tail of an error message."""
    close = closest_option(name, options)
    return f" Did you mean {close!r}?" if close is not None else ""


@overload
def look_up_option(  # type: ignore[overload-overlap]  # a Mapping is also an Iterable of its keys: checked first
    name: str,
    options: Mapping[str, T],
    *,
    what: str,
    remedy: str | None = ...,
    error: type[ImagingCdsError] = ...,
) -> T: ...


@overload
def look_up_option(
    name: str,
    options: Iterable[str],
    *,
    what: str,
    remedy: str | None = ...,
    error: type[ImagingCdsError] = ...,
) -> str: ...


def look_up_option(
    name: str,
    options: Mapping[str, T] | Iterable[str],
    *,
    what: str,
    remedy: str | None = None,
    error: type[ImagingCdsError] = ConfigurationError,
) -> T | str:
    """The option called ``name``: its value for a mapping, the name itself for a collection of names.

    An unknown name raises ``error`` reading "Unknown <what> 'name'. Did you mean 'x'?", with ``remedy`` (default:
    the sorted list of known names) saying what to choose from.
    """
    if isinstance(options, Mapping):
        if name in options:
            return options[name]
        known = sorted(str(k) for k in options)
    else:
        known = sorted(str(o) for o in options)
        if name in known:
            return name
    raise error(
        f"Unknown {what} {name!r}.{did_you_mean(name, known)}",
        remedy=remedy if remedy is not None else f"Choose one of: {', '.join(known) or '(none)'}.",
    )

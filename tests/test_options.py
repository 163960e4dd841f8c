"""The one "did you mean" look-up used wherever a user or an administrator types a name."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError, StudyError
from core.options import closest_option, did_you_mean, look_up_option

ANALYZERS = ("ct-bone", "ct-emphysema", "cxr-pneumonia", "us-breast")


def test_a_known_name_is_returned_and_a_mapping_gives_its_value() -> None:
    assert look_up_option("ct-bone", ANALYZERS, what="analyzer") == "ct-bone"
    assert look_up_option("b", {"a": 1, "b": 2}, what="job kind") == 2


def test_a_typo_names_the_closest_option_and_lists_the_choices() -> None:
    typo = r"Unknown analyzer 'cxr-pneumona'\. Did you mean 'cxr-pneumonia'\?"
    with pytest.raises(ConfigurationError, match=typo) as e:
        look_up_option("cxr-pneumona", ANALYZERS, what="analyzer")
    assert e.value.remedy == "Choose one of: ct-bone, ct-emphysema, cxr-pneumonia, us-breast."


def test_a_name_like_nothing_gives_no_hint_and_the_caller_chooses_error_and_remedy() -> None:
    with pytest.raises(StudyError) as e:
        look_up_option("mammography", ANALYZERS, what="analyzer", error=StudyError, remedy="Pick another study.")
    assert str(e.value) == "Unknown analyzer 'mammography'. Pick another study."
    assert did_you_mean("mammography", ANALYZERS) == "" and closest_option("zzz", ANALYZERS) is None

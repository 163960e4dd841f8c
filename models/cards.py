"""Model cards: what an analyzer is for, what it was validated on, how well it did, and where it fails.

A clinician decides whether to trust a finding by reading its card, and a regulator asks for the same facts,
so every analyzer the registry will run must have a card that passes :data:`CARD_SCHEMA` (JSON Schema
2020-12). The loader is strict - a card with a missing field refuses to load - but its error names every
missing or malformed field at once and, when a field is only misnamed (``known_limits`` for ``limits``),
says which name to use.

This module reads JSON and renders HTML only; it never imports torch, so the CDS service and the web front
door can list and show cards without loading a model.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema

from core.errors import ConfigurationError

CARDS_DIR = Path(__file__).resolve().parent / "cards"
REPO_ROOT = Path(__file__).resolve().parent.parent

Status = Literal["validated", "experimental"]
RULE_BASED = "none: rule-based"
"""The value of ``training_data`` for an analyzer that learned nothing from data (published rules only)."""

_ESTIMATE = {
    "type": "object",
    "required": ["value", "ci95_low", "ci95_high"],
    "properties": {"value": {"type": "number"}, "ci95_low": {"type": "number"}, "ci95_high": {"type": "number"}},
}
_TEXT = {"type": "string", "minLength": 1}
_TEXT_LIST = {"type": "array", "minItems": 1, "items": _TEXT}
_REPEATABILITY = {
    "type": ["object", "null"],  # null: no published repeatability (then the measurement says why)
    "required": ["kind", "basis", "source"],
    "properties": {
        "kind": {"enum": ["absolute", "relative", "square-root"]},
        "basis": _TEXT,
        "source": _TEXT,
        "lower": {"type": "number", "maximum": 0},
        "upper": {"type": "number", "minimum": 0},
        "percent": {"type": "number", "exclusiveMinimum": 0},
        "coefficient": {"type": "number", "exclusiveMinimum": 0},
        "zero_prior_limit": {"type": "number", "minimum": 0},
        "slice_thickness_mm": {"type": "number", "exclusiveMinimum": 0},
        "verdict_up_to_slice_mm": {"type": "number", "exclusiveMinimum": 0},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "absolute"}}}, "then": {"required": ["lower", "upper"]}},
        {"if": {"properties": {"kind": {"const": "relative"}}}, "then": {"required": ["percent"]}},
        {
            "if": {"properties": {"kind": {"const": "square-root"}}},
            "then": {"required": ["coefficient", "zero_prior_limit"]},
        },
    ],
}
_FOLLOWED_MEASUREMENT = {
    "type": "object",
    "required": ["repeatability"],
    "properties": {
        "repeatability": _REPEATABILITY,
        "worse": {"enum": ["increase", "decrease", None]},
        "same_site": {"type": "boolean"},
        "no_verdict_because": _TEXT,
        "comparable_versions": {"type": "array", "items": _TEXT},
    },
    # A change shown without a verdict must say why there is none.
    "if": {"properties": {"repeatability": {"type": "null"}}},
    "then": {"required": ["repeatability", "no_verdict_because"]},
}
_FOLLOWUP = {
    "type": "object",
    "required": ["measurements", "comparable_versions", "validation"],
    "properties": {
        "measurements": {"type": "object", "additionalProperties": _FOLLOWED_MEASUREMENT},
        "comparable_versions": {"type": "array", "items": _TEXT},
        "validation": _TEXT,
        "not_followed": _TEXT,
        "lesions": {
            "type": "object",
            "required": ["kind", "rules", "sources"],
            "properties": {"kind": _TEXT, "rules": _TEXT, "sources": _TEXT_LIST},
        },
    },
}

CARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "imaging-cds model card",
    "type": "object",
    "required": [
        "name",
        "version",
        "title",
        "status",
        "intended_use",
        "not_for",
        "inputs_accepted",
        "training_data",
        "method",
        "validation",
        "limits",
        "references",
    ],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9.-]*$"},
        "version": _TEXT,
        "title": _TEXT,
        "status": {"enum": ["validated", "experimental"]},
        "intended_use": _TEXT,
        "not_for": _TEXT_LIST,
        "inputs_accepted": {"type": ["object", "string"], "minProperties": 1, "minLength": 1},
        "training_data": {
            "oneOf": [
                {"const": RULE_BASED},
                {
                    "type": "object",
                    "required": ["source", "licence", "citation"],
                    "properties": {"source": _TEXT, "licence": _TEXT, "citation": _TEXT},
                },
            ]
        },
        "method": {"type": ["object", "string", "array"], "minProperties": 1, "minLength": 1, "minItems": 1},
        "validation": {
            "type": "object",
            "required": ["summary"],
            "properties": {
                "summary": _TEXT,
                "figures": {"type": "object", "minProperties": 1, "additionalProperties": _ESTIMATE},
                "operating_threshold": {"type": "number"},
                "decision_rule": _TEXT,
                "dataset": _TEXT,
            },
        },
        "limits": _TEXT_LIST,
        "references": _TEXT_LIST,
        "followup": _FOLLOWUP,
        "weights": {
            "type": ["object", "null"],
            "required": ["file", "sha256"],
            "properties": {"file": _TEXT, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        },
    },
    # A trained model must publish its figures with confidence intervals, say what it was tested on, and say how
    # its output becomes a call: the probability threshold of a classifier, the rule of a segmentation.
    "if": {"required": ["weights"], "properties": {"weights": {"type": "object"}}},
    "then": {
        "properties": {
            "validation": {
                "required": ["summary", "dataset", "figures"],
                "anyOf": [{"required": ["operating_threshold"]}, {"required": ["decision_rule"]}],
            }
        }
    },
}

RENAME_HINTS: dict[str, tuple[str, str]] = {
    "known_limits": ("limits", "rename 'known_limits' to 'limits'"),
    "limitations": ("limits", "rename 'limitations' to 'limits'"),
    "inputs": ("inputs_accepted", "rename 'inputs' to 'inputs_accepted'"),
    "test_performance": ("validation", "move 'test_performance' to 'validation.figures'"),
    "thresholds": ("references", "list the citations of 'thresholds' in 'references'"),
    "rules": ("references", "list the citations of 'rules' in 'references'"),
}
"""Fields analyzers have used under another name: the loader's error says how to fix them."""

_FIELD_HELP: dict[str, str] = {
    "status": "'validated' or 'experimental'",
    "training_data": f"an object with source, licence, citation, or the string {RULE_BASED!r}",
    "references": "a list of citations of the published thresholds and datasets used",
    "summary": "one sentence naming what the analyzer was validated on",
    "figures": "metric -> {value, ci95_low, ci95_high}, as models.metrics.Estimate.as_dict() writes",
    "dataset": "the data set (and split) the figures were measured on",
    "operating_threshold": "the probability threshold the figures were measured at",
    "decision_rule": "how a segmentation model's output becomes labels (argmax...), when it has no threshold",
    "no_verdict_because": "why a change of this measurement gets no stable/increased/decreased verdict",
    "comparable_versions": "earlier analyzer versions whose results measure the same thing (may be empty)",
}


@dataclass(frozen=True)
class WeightsPin:
    """A weights file (relative to the repository, or to a bundle directory) and its SHA-256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ModelCard:
    """A validated model card. ``extra`` keeps any further fields the card's author added (shown as-is)."""

    name: str
    version: str
    title: str
    status: Status
    intended_use: str
    not_for: tuple[str, ...]
    inputs_accepted: Any
    training_data: Any
    method: Any
    validation: Mapping[str, Any]
    limits: tuple[str, ...]
    references: tuple[str, ...]
    weights: WeightsPin | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    followup: Mapping[str, Any] | None = None
    """Which measurements are followed over time, their published repeatability, which earlier analyzer versions
    measure the same thing (read by :func:`models.followup.followup_spec`); ``None`` when the card has no section."""

    @property
    def rule_based(self) -> bool:
        return self.training_data == RULE_BASED

    @property
    def figures(self) -> dict[str, dict[str, float]]:
        """Published validation figures, metric -> ``{value, ci95_low, ci95_high}`` (empty when none)."""
        return {k: dict(v) for k, v in (self.validation.get("figures") or {}).items()}

    @property
    def operating_threshold(self) -> float | None:
        value = self.validation.get("operating_threshold")
        return float(value) if value is not None else None

    def as_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data, in the schema's field order, extra fields last."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "title": self.title,
            "status": self.status,
            "intended_use": self.intended_use,
            "not_for": list(self.not_for),
            "inputs_accepted": self.inputs_accepted,
            "training_data": self.training_data,
            "method": self.method,
            "validation": dict(self.validation),
            "limits": list(self.limits),
            "references": list(self.references),
        }
        if self.followup is not None:
            data["followup"] = dict(self.followup)
        if self.weights is not None:
            data["weights"] = {"file": self.weights.file, "sha256": self.weights.sha256}
        data.update(self.extra)
        return data


def _describe_error(error: jsonschema.ValidationError, data: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        missing = str(error.message).split("'")[1] if "'" in str(error.message) else str(error.message)
        name = f"{where}.{missing}" if where else missing
        hints = [hint for old, (new, hint) in RENAME_HINTS.items() if new == missing and not where and old in data]
        detail = "; ".join(hints) if hints else _FIELD_HELP.get(missing, "")
        return f"missing field {name!r}" + (f" ({detail})" if detail else "")
    if error.validator == "anyOf" and where == "validation":
        return (
            f"missing field 'validation.operating_threshold' ({_FIELD_HELP['operating_threshold']}) or "
            f"'validation.decision_rule' ({_FIELD_HELP['decision_rule']})"
        )
    if error.validator == "oneOf" and where == "training_data":
        return f"field 'training_data' must be {_FIELD_HELP['training_data']}"
    return f"field {where or '(card)'!r}: {error.message}"


def card_errors(data: Any) -> list[str]:
    """Every schema violation in ``data`` as a short sentence naming the field (empty when valid)."""
    if not isinstance(data, Mapping):
        return ["a model card must be a JSON object"]
    validator = jsonschema.Draft202012Validator(CARD_SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), str(e.message)))
    return [_describe_error(e, data) for e in errors]


def card_from_dict(data: Any, *, source: str = "model card") -> ModelCard:
    """Validate ``data`` against :data:`CARD_SCHEMA`; a violation raises a ConfigurationError naming the fields."""
    problems = card_errors(data)
    if problems:
        raise ConfigurationError(
            f"{source} is not a valid model card: " + "; ".join(problems) + ".",
            remedy="Fix the card (schema: models.cards.CARD_SCHEMA); the analyzer will not run without a valid card.",
        )
    known = set(CARD_SCHEMA["properties"])
    weights = data.get("weights")  # null or absent: no trained weights
    return ModelCard(
        name=data["name"],
        version=data["version"],
        title=data["title"],
        status=data["status"],
        intended_use=data["intended_use"],
        not_for=tuple(data["not_for"]),
        inputs_accepted=data["inputs_accepted"],
        training_data=data["training_data"],
        method=data["method"],
        validation=dict(data["validation"]),
        limits=tuple(data["limits"]),
        references=tuple(data["references"]),
        weights=WeightsPin(weights["file"], weights["sha256"]) if weights else None,
        extra={k: v for k, v in data.items() if k not in known},
        source=source,
        followup=data.get("followup"),
    )


def read_card_file(path: Path) -> ModelCard:
    """Load and validate one card file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"Model card {path.name} does not exist.",
            remedy="Every analyzer needs a card; write it next to the others in models/cards/.",
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"Model card {path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}).",
            remedy="Fix the JSON syntax.",
        ) from None
    return card_from_dict(data, source=f"Model card {path.name}")


def load_card(name: str, cards_dir: Path = CARDS_DIR) -> ModelCard:
    """The validated card of the built-in analyzer ``name`` (``models/cards/<name>.json``)."""
    card = read_card_file(cards_dir / f"{name}.json")
    if card.name != name:
        raise ConfigurationError(
            f"Model card {name}.json describes {card.name!r}, not {name!r}.",
            remedy="Make the card's 'name' equal its file name and the analyzer's name.",
        )
    return card


# ---------------------------------------------------------------------------------------------------------------
# HTML rendering: server-side, semantic, readable without colour or scripts.

_FIGURE_LABELS = {
    "sensitivity": "Sensitivity (recognition rate)",
    "specificity": "Specificity",
    "false_positive_rate": "False-positive rate (misdiagnosis rate)",
    "false_negative_rate": "False-negative rate (missed-diagnosis rate)",
    "auc": "Area under the ROC curve (AUC)",
    "accuracy": "Accuracy",
    "expected_calibration_error": "Expected calibration error",
}

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;line-height:1.5;max-width:60rem;margin:0 auto;
padding:1rem;color:#111;background:#fff}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #555;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #555;padding:.3rem .6rem;text-align:left;
vertical-align:top}caption{text-align:left;font-weight:bold;padding:.3rem 0}
code{font-size:.9em;word-break:break-all}dt{font-weight:bold}dd{margin:0 0 .5rem 1.5rem}
.status{font-weight:bold;border:2px solid #111;padding:.1rem .4rem}
a{color:#0645ad}a:focus{outline:3px solid #111}
""".strip()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def render_value(value: Any) -> str:
    """Any JSON value as nested HTML lists (dicts become definition lists); every string is escaped."""
    if isinstance(value, Mapping):
        items = "".join(f"<dt>{_e(_label(str(k)))}</dt><dd>{render_value(v)}</dd>" for k, v in value.items())
        return f"<dl>{items}</dl>"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "<ul>" + "".join(f"<li>{render_value(v)}</li>" for v in value) + "</ul>"
    if value is None:
        return "<p>none</p>"
    return _e(value)


def figures_table(figures: Mapping[str, Mapping[str, float]], caption: str) -> str:
    """The validation figures as a table: metric, value, 95% confidence interval (text, no colour coding)."""
    rows = "".join(
        f'<tr><th scope="row">{_e(_FIGURE_LABELS.get(key, _label(key)))}</th>'
        f"<td>{_number(float(f['value']))}</td>"
        f"<td>{_number(float(f['ci95_low']))} to {_number(float(f['ci95_high']))}</td></tr>"
        for key, f in figures.items()
    )
    return (
        f"<table><caption>{_e(caption)}</caption>"
        '<thead><tr><th scope="col">Figure</th><th scope="col">Value</th>'
        '<th scope="col">95% confidence interval</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def _lesions_paragraphs(lesions: Mapping[str, Any] | None) -> str:
    """The card's lesion follow-up rules (matching, growth, doubling time) and their sources."""
    if not lesions:
        return ""
    sources = "".join(f"<li>{_e(source)}</li>" for source in lesions.get("sources") or ())
    return f"<p>Lesions ({_e(lesions.get('kind'))}): {_e(lesions.get('rules'))}</p><ul>{sources}</ul>"


def followup_section(followup: Mapping[str, Any]) -> str:
    """How results are compared with the patient's earlier ones: per measurement, the repeatability a change must
    exceed to be called a change, its source, and the direction that means progression."""
    rows = []
    for key, item in (followup.get("measurements") or {}).items():
        limit = item.get("repeatability")
        if limit is None:
            rule, source = f"no verdict: {item.get('no_verdict_because', '')}", ""
        else:
            rule = {
                "absolute": f"{limit.get('lower')} to +{limit.get('upper')} (unit of the measurement)",
                "relative": f"+/-{limit.get('percent')} % of the prior value",
                "square-root": f"+/-{limit.get('coefficient')} x square root of the prior; "
                f"above {limit.get('zero_prior_limit')} from a prior of 0",
            }[str(limit.get("kind"))]
            rule = f"{rule}. {limit.get('basis')}"
            source = str(limit.get("source"))
        if item.get("comparable_versions") is not None:
            earlier = ", ".join(item["comparable_versions"]) or "none"
            rule = f"{rule} Earlier versions compared for this measurement: {earlier}."
        rows.append(
            f'<tr><th scope="row"><code>{_e(key)}</code></th><td>{_e(rule)}</td><td>{_e(source)}</td>'
            f"<td>{_e(item.get('worse') or 'not stated')}</td></tr>"
        )
    versions = ", ".join(followup.get("comparable_versions") or ()) or "none"
    return (
        "<h2>Follow-up: comparison with earlier results</h2>"
        f"<p>{_e(followup.get('validation', ''))}</p>"
        f"<p>Earlier analyzer versions whose results are compared with this version's: {_e(versions)}.</p>"
        + (f"<p>{_e(followup['not_followed'])}</p>" if followup.get("not_followed") else "")
        + _lesions_paragraphs(followup.get("lesions"))
        + (
            "<table><caption>A change is called increased or decreased only beyond these limits</caption>"
            '<thead><tr><th scope="col">Measurement</th><th scope="col">Repeatability (95 %)</th>'
            '<th scope="col">Source</th><th scope="col">Worse direction</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            if rows
            else ""
        )
    )


def page(title: str, body: str) -> str:
    """A complete, accessible HTML page (language, viewport, one h1, a main landmark)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def render_card_html(card: ModelCard, *, json_url: str | None = None, index_url: str | None = None) -> str:
    """The model card as a stand-alone HTML page a clinician can open from a report's Device link."""
    sections: list[str] = []
    nav = []
    if index_url:
        nav.append(f'<a href="{_e(index_url)}">All models</a>')
    if json_url:
        nav.append(f'<a href="{_e(json_url)}" type="application/json">This card as JSON</a>')
    if nav:
        sections.append(f'<nav aria-label="Model cards">{" | ".join(nav)}</nav>')
    sections.append(f"<h1>{_e(card.title)}</h1>")
    sections.append(
        f"<p>Analyzer <code>{_e(card.name)}</code>, version {_e(card.version)}. "
        f'Status: <span class="status">{_e(card.status)}</span>'
        + (" (not validated for clinical use)." if card.status != "validated" else ".")
        + "</p>"
    )
    sections.append(f"<h2>Intended use</h2><p>{_e(card.intended_use)}</p>")
    sections.append(f"<h2>Not for</h2>{render_value(list(card.not_for))}")
    sections.append(f"<h2>Inputs accepted</h2>{render_value(card.inputs_accepted)}")
    training = (
        "<p>None: the analyzer applies published rules and learned nothing from data.</p>"
        if card.rule_based
        else render_value(card.training_data)
    )
    sections.append(f"<h2>Training data</h2>{training}")
    sections.append(f"<h2>Method</h2>{render_value(card.method)}")
    validation = dict(card.validation)
    parts = [f"<p>{_e(validation.pop('summary'))}</p>"]
    figures = validation.pop("figures", None)
    threshold = validation.pop("operating_threshold", None)
    dataset = validation.pop("dataset", None)
    if figures:
        at = f" at operating threshold {_number(float(threshold))}" if threshold is not None else ""
        on = f" on {dataset}" if dataset else ""
        parts.append(figures_table(figures, f"Measured performance{on}{at}"))
    if validation:
        parts.append(render_value(validation))
    sections.append("<h2>Validation</h2>" + "".join(parts))
    sections.append(f"<h2>Known limits</h2>{render_value(list(card.limits))}")
    if card.followup:
        sections.append(followup_section(card.followup))
    sections.append(f"<h2>References</h2><ol>{''.join(f'<li>{_e(r)}</li>' for r in card.references)}</ol>")
    if card.weights is not None:
        sections.append(
            f"<h2>Weights</h2><p>File <code>{_e(card.weights.file)}</code>, SHA-256 "
            f"<code>{_e(card.weights.sha256)}</code>. The analyzer refuses to run if the file's hash differs.</p>"
        )
    if card.extra:
        sections.append(f"<h2>Further details</h2>{render_value(dict(card.extra))}")
    return page(f"Model card: {card.title}", "".join(sections))

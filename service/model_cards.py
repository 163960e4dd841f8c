"""Model cards on the web: ``/models/`` lists the analyzers, ``/models/<name>`` shows one card.

The FHIR ``Device`` behind every AI result links here (``<card_base_url>/models/<name>``), so a clinician who
clicks it from the EHR sees what the model is for, what it was validated on, how well it did and where it
fails. Pages are server-rendered HTML that reads without scripts or colour; the same data is served as JSON
to ``Accept: application/json`` or at ``/models/<name>.json``. Only cards are read - never a model - so this
blueprint never imports torch.
"""

from __future__ import annotations

import html

from flask import Blueprint, Response, jsonify, request, url_for

from core.errors import ConfigurationError
from core.options import closest_option, did_you_mean
from models.cards import page
from models.registry import analyzer_names, get_card, registered_analyzers

models_blueprint = Blueprint("models", __name__)


def _wants_json() -> bool:
    """JSON only when the client prefers it to HTML (a browser's ``*/*`` gets HTML)."""
    return request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


def _not_found(name: str, as_json: bool) -> Response:
    names = analyzer_names()
    message = f"No model card for analyzer {name!r}.{did_you_mean(name, names)}"
    if as_json:
        response = jsonify({"error": message, "did_you_mean": closest_option(name, names), "analyzers": list(names)})
    else:
        links = "".join(
            f'<li><a href="{html.escape(url_for("models.card", name=n))}">{html.escape(n)}</a></li>' for n in names
        )
        body = (
            f"<h1>Model card not found</h1><p>{html.escape(message)}</p><p>Available model cards:</p><ul>{links}</ul>"
        )
        response = Response(page("Model card not found", body), mimetype="text/html")
    response.status_code = 404
    return response


def _card_error(exc: ConfigurationError, as_json: bool) -> Response:
    """A card that fails the schema is an operator problem: say so (500), never show a half card."""
    if as_json:
        response = jsonify({"error": str(exc)})
    else:
        body = f"<h1>Model card unavailable</h1><p>{html.escape(str(exc))}</p>"
        response = Response(page("Model card unavailable", body), mimetype="text/html")
    response.status_code = 500
    return response


@models_blueprint.get("/models/")
def index() -> Response:
    """All analyzers with version, title and status, linked to their cards."""
    rows = registered_analyzers(strict=False)
    if _wants_json():
        return jsonify(
            {
                "analyzers": [
                    {
                        "name": r.name,
                        "version": r.version,
                        "title": r.title,
                        "status": r.status,
                        "kind": r.kind,
                        "card_problem": r.problem,
                        "card": url_for("models.card", name=r.name, _external=True),
                    }
                    for r in rows
                ]
            }
        )
    body_rows = "".join(
        f'<tr><th scope="row"><a href="{html.escape(url_for("models.card", name=r.name))}">{html.escape(r.title)}</a>'
        f"</th><td><code>{html.escape(r.name)}</code></td><td>{html.escape(r.version)}</td>"
        f"<td>{html.escape(r.status if r.problem is None else 'card invalid: ' + r.problem)}</td>"
        f"<td>{html.escape(r.kind)}</td></tr>"
        for r in rows
    )
    body = (
        "<h1>Imaging analyzers and their model cards</h1>"
        "<p>Each card states the intended use, the data the analyzer was validated on, its measured performance "
        "with 95% confidence intervals, and its known limits.</p>"
        '<table><caption>Registered analyzers</caption><thead><tr><th scope="col">Analyzer</th>'
        '<th scope="col">Name</th><th scope="col">Version</th><th scope="col">Status</th>'
        f'<th scope="col">Kind</th></tr></thead><tbody>{body_rows}</tbody></table>'
    )
    return Response(page("Model cards", body), mimetype="text/html")


@models_blueprint.get("/models/<name>.json")
def card_json(name: str) -> Response:
    return _card_response(name, as_json=True)


@models_blueprint.get("/models/<name>")
def card(name: str) -> Response:
    return _card_response(name, as_json=_wants_json())


def _card_response(name: str, *, as_json: bool) -> Response:
    from models.cards import render_card_html

    if name not in analyzer_names():
        return _not_found(name, as_json)
    try:
        model_card = get_card(name)
    except ConfigurationError as exc:
        return _card_error(exc, as_json)
    if as_json:
        return jsonify(model_card.as_dict())
    html_page = render_card_html(
        model_card,
        json_url=url_for("models.card_json", name=name),
        index_url=url_for("models.index"),
    )
    return Response(html_page, mimetype="text/html")

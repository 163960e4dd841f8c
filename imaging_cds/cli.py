"""The ``imaging-cds`` command line: ``analyze``, ``demo``, ``serve``, ``worker``, ``analyzers``, ``evaluate``,
``deidentify``.

Every failure the project anticipates ends with one line on stderr naming what was wrong and what to do,
and a non-zero exit status; never a stack trace (``--debug`` shows one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError, ImagingCdsError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = logging.getLogger("imaging_cds")


def _add_fhir_options(parser: argparse.ArgumentParser) -> None:
    fhir = parser.add_argument_group("EHR (FHIR R4) connection")
    fhir.add_argument("--fhir-base", required=True, help="FHIR base URL, e.g. https://ehr.example.org/fhir")
    fhir.add_argument(
        "--token-url", help="OAuth token endpoint (default: discovered from the server's SMART configuration)"
    )
    fhir.add_argument("--client-id", help="SMART Backend Services client id")
    fhir.add_argument(
        "--client-secret-env",
        metavar="VAR",
        help="name of the environment variable holding the client secret (never pass secrets on the command line)",
    )
    fhir.add_argument("--private-key", type=Path, help="PEM or JWK file: private_key_jwt client authentication")
    fhir.add_argument("--key-id", help="kid of the private key as registered with the EHR")
    fhir.add_argument(
        "--algorithm", default="RS384", choices=("RS384", "ES384"), help="signing algorithm (default RS384)"
    )
    fhir.add_argument(
        "--scope",
        default="system/ImagingStudy.rs system/Endpoint.rs system/Patient.r "
        "system/DiagnosticReport.cru system/Observation.cr system/Media.c system/Device.cr "
        "system/Provenance.cu",
        help="scopes to request",
    )
    fhir.add_argument(
        "--allow-dicomweb",
        action="append",
        default=[],
        metavar="URL",
        help="DICOMweb base URL the study's Endpoint may point at "
        "(repeatable; also IMAGING_CDS_DICOMWEB_ALLOW, comma-separated)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imaging-cds", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show stack traces and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="analyse one ImagingStudy and write the findings back to the EHR")
    analyze.add_argument("imaging_study", help="ImagingStudy/<id>")
    analyze.add_argument("--analyzer", default="ct-emphysema", help="analyzer name (see 'imaging-cds analyzers')")
    analyze.add_argument("--card-base-url", help="public base URL where model cards are served (/models/<name>)")
    analyze.add_argument("--json", action="store_true", help="print the outcome as JSON")
    analyze.add_argument(
        "--write-strategy",
        choices=("auto", "transaction", "ordered"),
        default="auto",
        help="how to file the results: one transaction, ordered writes, or decided from the server (default)",
    )
    analyze.add_argument(
        "--max-transaction-entries", type=int, help="most entries the FHIR server takes in one transaction"
    )
    analyze.add_argument(
        "--max-request-bytes", type=int, help="largest request body the FHIR server (and any proxy) accepts"
    )
    _add_fhir_options(analyze)

    demo = sub.add_parser("demo", help="local FHIR server + Orthanc + real sample studies, analysed end to end")
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="where to write the report files")
    demo.add_argument(
        "--engine",
        choices=("embedded", "celery"),
        default="embedded",
        help="run the analyses in this process (default) or on a Celery worker with a local Redis broker",
    )
    demo.add_argument(
        "--keep-running",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the servers up until Ctrl-C so you can browse them (default: when run from a terminal)",
    )

    serve = sub.add_parser("serve", help="serve the CDS Hooks service, the clinician app and the model cards")
    serve.add_argument(
        "--config",
        type=Path,
        required=True,
        help="deployment settings file (YAML or JSON; see service/settings.py)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--threads", type=int, default=8, help="request threads (one process; default 8)")

    worker = sub.add_parser("worker", help="run a Celery worker for the analyses serve queues (settings: jobs)")
    worker.add_argument(
        "--config", type=Path, required=True, help="the deployment settings file serve uses (with jobs.broker_url)"
    )
    worker.add_argument("--concurrency", type=int, help="analyses at once (child processes; default jobs.concurrency)")
    worker.add_argument("--name", help="worker node name (default imaging-cds-<pid>@<host>)")
    worker.add_argument(
        "--metrics-port", type=int, help="serve this node's Prometheus metrics on 127.0.0.1:PORT/metrics"
    )

    sub.add_parser("analyzers", help="list the available analyzers")

    evaluate = sub.add_parser(
        "evaluate",
        help="assess an analyzer on a labelled dataset: sensitivity, specificity, AUC... or Dice and volume "
        "agreement, with 95%% CIs",
    )
    evaluate.add_argument("analyzer", help="analyzer name (see 'imaging-cds analyzers')")
    evaluate.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="MedMNIST-style .npz, a folder of DICOM cases with labels.csv, a segmentation set (images/, labels/), "
        "a QRM calcium phantom scan folder (reference_agatston_mass.csv beside it), or a lesion dataset (LIDC "
        "nodule crops with metadata.csv; whole CTs as <name>_image.nrrd + <name>_label.nrrd)",
    )
    evaluate.add_argument(
        "--split",
        default=None,
        help="split of an .npz dataset (default: test) or of a segmentation set (validation, training, all; "
        "default: validation)",
    )
    evaluate.add_argument(
        "--positive-label",
        type=int,
        help="label value meaning 'finding present' (default: known MedMNIST sets, else 1)",
    )
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="also write the assessment as JSON (for the card)")
    evaluate.add_argument(
        "--feedback-db", type=Path, help="CDS Hooks feedback SQLite file: live accept/override figures"
    )
    evaluate.add_argument("--review-db", type=Path, help="SMART app review SQLite file: clinician review acceptance")
    evaluate.add_argument("--limit", type=int, help="assess only the first N cases (a quick look, not for the card)")
    evaluate.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: one study at a time)",
    )

    deidentify = sub.add_parser(
        "deidentify",
        help="export DICOM de-identified (PS3.15 Annex E Basic Profile, longitudinal dates modified), checked",
    )
    deidentify.add_argument("inputs", nargs="+", type=Path, help="DICOM files, or folders holding them")
    deidentify.add_argument("--output", type=Path, required=True, help="new folder for the export (must not exist)")
    key = deidentify.add_mutually_exclusive_group()
    key.add_argument(
        "--key-file", type=Path, help="256-bit key (base64, mode 0600): same key, same pseudonyms, dates and UIDs"
    )
    key.add_argument("--key-env", help="environment variable holding the key (instead of --key-file)")
    deidentify.add_argument("--json", action="store_true", help="print the export's report as JSON")
    return parser


def _auth_from_args(args: argparse.Namespace, session: Any) -> Any:
    """A TokenProvider for the chosen client authentication, or None for an open server."""
    if not args.client_id:
        if args.private_key or args.client_secret_env:
            raise ConfigurationError("--client-id is required with --private-key or --client-secret-env.")
        return None
    from fhir_adapters.auth import backend_services_auth

    credential: dict[str, Any]
    if args.private_key:
        if not args.key_id:
            raise ConfigurationError(
                "--key-id is required with --private-key.", remedy="Give the kid registered with the EHR."
            )
        key_text = args.private_key.read_text()
        key: Any = json.loads(key_text) if key_text.lstrip().startswith("{") else key_text
        credential = {"private_key": key, "kid": args.key_id, "algorithm": args.algorithm}
    elif args.client_secret_env:
        secret = os.environ.get(args.client_secret_env)
        if not secret:
            raise ConfigurationError(
                f"Environment variable {args.client_secret_env} is not set.", remedy="Export the client secret in it."
            )
        credential = {"client_secret": secret}
    else:
        raise ConfigurationError(
            "--client-id needs a credential.", remedy="Add --private-key (private_key_jwt) or --client-secret-env."
        )
    return backend_services_auth(
        args.fhir_base, args.client_id, scope=args.scope, session=session, token_url=args.token_url, **credential
    )


def _dicomweb_allow_list(args: argparse.Namespace) -> Any:
    from core.allowlist import AllowList

    from_env = [p for p in os.environ.get("IMAGING_CDS_DICOMWEB_ALLOW", "").split(",") if p.strip()]
    prefixes = [*args.allow_dicomweb, *from_env]
    if not prefixes:
        raise ConfigurationError(
            "No DICOMweb server is allowed.",
            remedy="Name the PACS the EHR's Endpoints point at with --allow-dicomweb URL "
            "(or IMAGING_CDS_DICOMWEB_ALLOW).",
        )
    return AllowList.of(prefixes)


def _print_outcome(summary: dict[str, Any]) -> None:
    from fhir_adapters.terminology import unit_label

    print(f"{summary['imagingStudy']}: {summary['analyzer']['name']} {summary['analyzer']['version']}")
    series = summary["series"]
    print(f"  series   {series['uid']} ({series['modality']}, {series['instances']} images)")
    print(f"           {series['reason']}")
    for m in summary["measurements"]:
        flag = f" [{m['interpretation']}]" if m.get("interpretation") else ""
        print(f"  {m['display']:<48} {m['value']:.4g} {unit_label(m['unit'])}{flag}")
    print(f"  category {summary['category']['display']}")
    print(f"  {summary['conclusion']}")
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")
    for correction in summary["corrections"]:
        print(f"  corrected: {correction}")
    state = "already in the EHR (nothing new written)" if summary["alreadyPresent"] else "written to the EHR"
    print(f"  {summary['diagnosticReport']} {state} (preliminary: awaits clinician review)")
    print(f"  how: {summary['write']['reason']}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from core.outbound import outbound_session
    from fhir_adapters.client import FhirClient
    from fhir_adapters.writer import ServerWriteSettings, WriteSettings
    from pipeline.handler import StudyAnalysisHandler, analysis_params
    from pipeline.memory import LoadedAnalyzers

    if not args.imaging_study.startswith("ImagingStudy/"):
        raise ConfigurationError(
            f"Expected a reference like ImagingStudy/<id>, got {args.imaging_study!r}.",
            remedy="Pass the ImagingStudy's logical id as ImagingStudy/<id>.",
        )
    loaded = LoadedAnalyzers(freeze=False)  # one analysis, then the process ends: nothing to keep from the collector
    loaded.get(args.analyzer)  # an unknown name or a failed weights check fails here, before any request to the EHR
    session = outbound_session()
    client = FhirClient(args.fhir_base, auth=_auth_from_args(args, session), session=session)
    write = WriteSettings(args.write_strategy, args.max_transaction_entries, args.max_request_bytes)
    handler = StudyAnalysisHandler(
        client_for=lambda params: client,
        dicomweb_allow_list=_dicomweb_allow_list(args),
        card_base_url=args.card_base_url,
        loaded=loaded,
        write_settings=ServerWriteSettings(default=write),
    )
    [outcome], _ = handler.analyses(analysis_params(args.imaging_study, [args.analyzer]), lambda p, s: None)
    summary = outcome.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_outcome(summary)
    return EXIT_OK


def cmd_analyzers(args: argparse.Namespace) -> int:
    from models.registry import analyzer_names

    for name in analyzer_names():
        print(name)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from devtools.demo import run_demo

    keep_running = sys.stdin.isatty() if args.keep_running is None else args.keep_running
    return run_demo(args.output, keep_running=keep_running, engine=args.engine)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from devtools.calcium_phantom import evaluate_phantom, format_phantom_table, is_calcium_phantom
    from devtools.evaluate import evaluate, evaluate_lesions, format_lesion_table, format_table, is_lesion_dataset

    if is_calcium_phantom(args.dataset):
        phantom = evaluate_phantom(args.analyzer, args.dataset, json_out=args.json)
        print(format_phantom_table(phantom))
        if args.json:
            print(f"\nWrote {args.json}")
        return EXIT_OK
    if is_lesion_dataset(args.dataset):
        lesions = evaluate_lesions(args.analyzer, args.dataset, json_out=args.json, torch_threads=args.torch_threads)
        print(format_lesion_table(lesions))
        if args.json:
            print(f"\nWrote {args.json}")
        return EXIT_OK
    assessment = evaluate(
        args.analyzer,
        args.dataset,
        split=args.split,
        positive_label=args.positive_label,
        feedback_db=args.feedback_db,
        review_db=args.review_db,
        json_out=args.json,
        limit=args.limit,
        torch_threads=args.torch_threads,
    )
    print(format_table(assessment))
    if args.json:
        print(f"\nWrote {args.json}")
    return EXIT_OK


def cmd_deidentify(args: argparse.Namespace) -> int:
    from core.sealing import KeySource
    from dicom_io.deidentify import DeidentificationKey, deidentify_export

    key = None
    if args.key_file or args.key_env:
        key = DeidentificationKey(KeySource(file=args.key_file, env=args.key_env).read())
    report = deidentify_export(args.inputs, args.output, key=key)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    print(
        f"De-identified {report.instances} instance(s) of {report.patients} patient(s), {report.studies} "
        f"stud{'y' if report.studies == 1 else 'ies'}, {report.series} series into {report.output}"
    )
    print("Residual-identifier check: clean (names, identifiers, dates and instance UIDs of the source)")
    if report.unscannable:
        print(f"Not searchable (equal to equipment attributes the profile keeps): {', '.join(report.unscannable)}")
    if report.skipped_not_dicom:
        print(f"Skipped {report.skipped_not_dicom} file(s) that are not DICOM")
    print(f"Key: {'id ' + report.key_id if report.key_given else 'random for this export (not linkable)'}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import load_settings
    from service.web import serve

    serve(load_settings(args.config), host=args.host, port=args.port, threads=args.threads)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    if args.metrics_port:
        # Metrics of a prefork node's children are gathered through files; the folder must be named before
        # prometheus_client is first imported (by the settings' imports below).
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imaging-cds-worker-metrics-")
    from service.settings import load_settings
    from service.worker import run_worker

    run_worker(
        load_settings(args.config), concurrency=args.concurrency, node_name=args.name, metrics_port=args.metrics_port
    )
    return EXIT_OK


COMMANDS = {
    "analyze": cmd_analyze,
    "analyzers": cmd_analyzers,
    "demo": cmd_demo,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "evaluate": cmd_evaluate,
    "deidentify": cmd_deidentify,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except ImagingCdsError as exc:
        if args.debug:
            raise
        print(f"imaging-cds: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

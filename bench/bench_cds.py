"""Benchmark: CDS hook latency under concurrent load, next to a trivial Flask endpoint on the same stack.

Run: ``.venv/bin/python bench/bench_cds.py [--duration 6] [--rounds 3] [--alg RS384]``

What it does, in one run:

1. Starts a real sekmet-fhir server, writes AI results for one patient with the project's builders, and reads
   the prefetch an EHR would send (the discovery templates), then stops the server: hooks are answered from
   prefetch, so the service never calls back during the measurement.
2. Starts ONE gunicorn (2 sync workers, ``--preload``, ``gc.freeze()`` after imports) serving both the CDS
   app and a trivial Flask JSON endpoint (the floor) on loopback.
3. Drives the floor with ``wrk`` at 1, 2, 4, ... connections and picks the highest count at which the
   floor's p99 stays <= 25 ms; then drives patient-view (full prefetch) and order-select (a draft chest CT
   order) at that count. Every hook request carries its own freshly signed CDS client JWT (unique ``jti``),
   pre-generated because wrk's Lua cannot sign; tokens are valid for five minutes, so they are made per run.
   If the floor misses 25 ms even at one connection (or in the measured rounds), the machine is too busy for
   the target's load to exist in this run: the figures are printed, the verdict is "NOT JUDGED".
4. Repeats, ``--rounds`` times, patient-view, order-select and the floor in turn at that count, and prints the
   median p50/p95/p99, throughput and the workers' CPU milliseconds per request of each, the errors, and the
   ratios to the floor.
5. For context (not judged), also measures in each round ``POST /floor-checked``: the floor plus the two steps
   every hook takes before any card work, verifying the CDS client's JWT and parsing the JSON body. Its ratio
   to the floor is the part of the 2x budget those steps take; what remains is the budget for the findings,
   the cards and recording them.
6. The cost of trust, in the same rounds: the same two hooks served by the same code configured as deployed,
   each next to the hooks above (whose replay cache is the in-process one and which record no audit):
   ``+jti SQLite`` (the replay cache shared by the workers in a SQLite file, the default), ``+jti Redis`` (shared
   through a real redis-server), ``+audit`` (SQLite replay cache plus an AuditEvent per hook committed to the
   outbox: the request path's cost; this driver sends the outbox to the FHIR server after the run) and
   ``+audit sent`` (the same, with the drainer thread of each worker sending to a real FHIR server during the
   run, as ``serve`` does; on this 2-core machine that server's CPU competes too, so this row overstates a
   deployment whose audit repository runs elsewhere). The next run starts once the outbox is empty. Printed
   as p99 and CPU ratios to the same hook without them (goal: p99 within 1.1x).

On a shared 2-core machine the load generator competes with the server: compare the ratios, not the
absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

ROOT = Path(__file__).resolve().parent.parent
SETUP_ENV = "IMAGING_CDS_BENCH_SETUP"
CDS_BASE = "https://cds.bench.example.org"
EHR_ISS = "https://ehr.bench.example.org"
FLOOR_P99_LIMIT_MS = 25.0
FLOOR_CHECKED = "/floor-checked"
CHECKED = "floor+JWT+parse"  # the context row's name: the floor plus the JWT check and the body parse

# ---------------------------------------------------------------- WSGI side (imported by gunicorn workers)


TRUST_VARIANTS = {"+jti SQLite": "/sqlite", "+jti Redis": "/redis", "+audit": "/audited", "+audit sent": "/sent"}
"""Mount points of the same CDS app configured as deployed (see step 6 of the module docstring)."""


def bench_app() -> Any:
    """The app gunicorn serves: the CDS blueprint plus ``POST /floor``, a trivial JSON endpoint, and
    ``POST /floor-checked``, the same after verifying a CDS client JWT and parsing the body as the hooks do; and
    under each of :data:`TRUST_VARIANTS` the CDS app with that replay cache and auditing."""
    from flask import jsonify, request
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from cds.app import EXTENSION_KEY, create_app
    from cds.config import CdsConfig, TrustedClient
    from cds.security import JtiCache, JwtVerifier
    from core.allowlist import AllowList
    from fhir_adapters.client import FhirClient
    from pipeline.audit import audit_recorder

    setup = json.loads(Path(os.environ[SETUP_ENV]).read_text())
    work = Path(setup["workdir"])

    def config(name: str, **trust: Any) -> CdsConfig:
        # One public base for all: a token's aud names the hook, so one token file serves every variant, and each
        # variant's own replay cache sees each token once.
        (work / name).mkdir(exist_ok=True)
        return CdsConfig(
            public_base_url=CDS_BASE,
            trusted_clients=(TrustedClient(iss=EHR_ISS, jwks=setup["jwks"]),),
            fhir_allow_list=AllowList.of(["http://127.0.0.1:9/fhir"]),
            app_launch_url="https://app.bench.example.org/launch",
            model_card_base_url="https://imaging-cds.bench.example.org",
            feedback_db=work / name / "fb.db",
            require_jwt_for_discovery=False,
            **trust,
        )

    plain = config("plain")
    app = create_app(plain, verifier=JwtVerifier(plain, replay_cache=JtiCache()))
    recorded = audit_recorder(work / "audited", site="bench", destination=None)
    sent = audit_recorder(work / "sent", site="bench", destination=FhirClient(setup["audit_fhir"], retries=1))
    mounts: dict[str, WSGIApplication] = {
        TRUST_VARIANTS["+jti SQLite"]: create_app(config("sqlite")),
        TRUST_VARIANTS["+jti Redis"]: create_app(config("redis", replay_cache=setup["redis"])),
        TRUST_VARIANTS["+audit"]: create_app(config("audited", audit=recorded)),
        TRUST_VARIANTS["+audit sent"]: create_app(config("sent", audit=sent)),
    }

    @app.post("/floor")
    def floor() -> Any:
        request.get_data()  # read the same body the hook gets, answer without work
        return jsonify({"cards": []})

    verifier = app.extensions[EXTENSION_KEY].verifier

    @app.post(FLOOR_CHECKED)
    def floor_checked() -> Any:
        # What every hook does before any card work, with the service's own verifier and JSON provider.
        verifier.verify(request.headers.get("Authorization"), [CDS_BASE + FLOOR_CHECKED])
        request.get_json()
        return jsonify({"cards": []})

    gc.collect()
    gc.freeze()  # objects from start-up stay out of the collector's generations: fewer p99 GC pauses
    return DispatcherMiddleware(app, mounts)


# ---------------------------------------------------------------- driver side


def _prepare_data(base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Real AI results in a real FHIR server -> the hook bodies an EHR would send."""
    sys.path.insert(0, str(ROOT))
    from cds.services import ORDER_SELECT, PATIENT_VIEW
    from tests.cds_support import (
        bone_result,
        create_patient,
        create_study,
        emphysema_result,
        post_result,
        prefetch_for,
        sign_off,
    )

    patient = create_patient(base)
    for started in ("2025-06-01T09:30:00Z", "2024-05-02T10:00:00Z"):
        study = create_study(base, patient, started=started)
        post_result(base, patient, study, emphysema_result(12.4), started=started)
        sign_off(base, post_result(base, patient, study, bone_result(86.0), started=started))
    patient_view = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"patientId": patient, "userId": "Practitioner/bench"},
        "prefetch": prefetch_for(base, PATIENT_VIEW, patient),
    }
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-chest-ct",
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    order_select = {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "patientId": patient,
            "userId": "Practitioner/bench",
            "selections": ["ServiceRequest/draft-chest-ct"],
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
        },
        "prefetch": prefetch_for(base, ORDER_SELECT, patient),
    }
    return patient_view, order_select


_LUA = r"""
local tokens = {}
local body = ""
local counter = 0
local threads = {}
local thread_id = 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local f = io.open(args[1], "r"); body = f:read("*a"); f:close()
  if args[2] ~= "-" then
    for line in io.lines(args[2]) do tokens[#tokens + 1] = line end
  end
  thread_id = id
  nthreads = tonumber(args[3])
end

function request()
  local headers = {["Content-Type"] = "application/json"}
  if #tokens > 0 then
    local index = thread_id + counter * nthreads + 1
    counter = counter + 1
    if index > #tokens then index = ((index - 1) % #tokens) + 1 end  -- exhausted: a replay, counted as an error
    headers["Authorization"] = "Bearer " .. tokens[index]
  end
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _tokens(path: Path, count: int, key: Any, alg: str, aud: str) -> None:
    from joserfc import jwt

    now = int(time.time())
    header = {"alg": alg, "typ": "JWT", "kid": key.kid}
    with path.open("w") as out:
        for _ in range(count):
            claims = {"iss": EHR_ISS, "sub": "bench", "aud": aud, "iat": now, "exp": now + 290, "jti": uuid.uuid4().hex}
            out.write(jwt.encode(header, claims, key, algorithms=[alg]) + "\n")


def _wrk(url: str, body: Path, tokens: Path | None, connections: int, duration: float, script: Path) -> dict[str, Any]:
    threads = min(2, connections)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "5s",
        "-s", str(script), url, "--", str(body), str(tokens) if tokens else "-", str(threads),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["error_count"] = sum(result["errors"].values())
    for p in ("p50", "p95", "p99"):
        result[f"{p}_ms"] = result.pop(f"{p}_us") / 1000.0
    return result


def _server_cpu_s(master_pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by gunicorn's workers (children of ``master_pid``).

    Read from ``/proc`` (Linux); on a shared machine latency moves with other people's load, while the
    server's CPU per request moves only with the code, so it is printed next to the latencies.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master_pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _measured(master_pid: int, *args: Any) -> dict[str, Any]:
    """:func:`_wrk`, plus the server's CPU milliseconds per request during the run."""
    before = _server_cpu_s(master_pid)
    result = _wrk(*args)
    result["cpu_ms"] = (_server_cpu_s(master_pid) - before) * 1000.0 / max(result["requests"], 1)
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs (errors: the total)."""
    keys = ("p50_ms", "p95_ms", "p99_ms", "rps", "cpu_ms")
    merged: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    merged["error_count"] = sum(r["error_count"] for r in runs)
    return merged


def _wait_for_empty(outbox: Any, timeout_s: float = 120.0) -> None:
    """Wait until the drainers have sent every AuditEvent of the last run (or give up after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while outbox.pending() and time.monotonic() < deadline:
        time.sleep(0.5)


def _row(name: str, r: dict[str, Any]) -> str:
    latency = f"{r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f}"
    return f"{name:<26} {latency} {r['rps']:>9.0f} {r['error_count']:>7d} {r.get('cpu_ms', float('nan')):>11.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measured wrk run")
    parser.add_argument("--alg", default="RS384", choices=["RS384", "ES384"], help="the CDS client's JWT algorithm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", default="1,2,4,8,16,32,64", help="floor sweep")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of floor and hooks (medians)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk).")
    from joserfc.jwk import ECKey, RSAKey

    from devtools.servers import fhir_server, free_port, redis_server
    from fhir_adapters.client import FhirClient
    from pipeline.audit import OUTBOX_FILE, AuditDrainer, AuditOutbox, FhirAuditDelivery

    workdir = Path(tempfile.mkdtemp(prefix="bench-cds-"))
    servers = contextlib.ExitStack()
    try:
        fhir = servers.enter_context(fhir_server(workdir / "fhir"))
        redis = servers.enter_context(redis_server())
    except BaseException:
        servers.close()
        raise
    key = (
        RSAKey.generate_key(2048, parameters={"kid": "bench"})
        if args.alg == "RS384"
        else ECKey.generate_key("P-384", parameters={"kid": "bench"})
    )
    print("preparing data in a real FHIR server ...", flush=True)
    try:
        patient_view, order_select = _prepare_data(fhir.base_url)
    except BaseException:
        servers.close()
        raise
    bodies = {"patient-view": workdir / "patient_view.json", "order-select": workdir / "order_select.json"}
    bodies[CHECKED] = bodies["patient-view"]
    bodies["patient-view"].write_text(json.dumps(patient_view))
    bodies["order-select"].write_text(json.dumps(order_select))
    setup = workdir / "setup.json"
    setup.write_text(
        json.dumps(
            {
                "jwks": {"keys": [key.as_dict(private=False)]},
                "workdir": str(workdir),
                "audit_fhir": fhir.base_url,
                "redis": redis.url,
            }
        )
    )
    script = workdir / "post.lua"
    script.write_text(_LUA)

    port = free_port()
    env = {**os.environ, SETUP_ENV: str(setup), "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}"}
    gunicorn = [
        sys.executable, "-m", "gunicorn", "--preload", "--workers", str(args.workers), "--worker-class", "sync",
        "--bind", f"127.0.0.1:{port}", "--backlog", "2048", "--log-level", "warning", "bench_cds:bench_app()",
    ]  # fmt: skip
    server = subprocess.Popen(gunicorn, env=env, cwd=workdir, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/cds-services", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("gunicorn did not start")
            time.sleep(0.2)

        print(f"floor sweep ({args.duration:g} s per point):", flush=True)
        chosen = 1
        floor_held = False  # the floor kept p99 <= 25 ms at some connection count: there is a load to measure at
        floor_rps = 0.0
        for connections in (int(c) for c in args.connections.split(",")):
            r = _wrk(f"{base}/floor", bodies["patient-view"], None, connections, args.duration, script)
            if r["p99_ms"] > FLOOR_P99_LIMIT_MS:  # one retry: on a shared machine a neighbour's burst can spoil a point
                r = _wrk(f"{base}/floor", bodies["patient-view"], None, connections, args.duration, script)
            print(f"  c={connections:<3d} p99 {r['p99_ms']:.2f} ms, {r['rps']:.0f} req/s, errors {r['error_count']}")
            floor_rps = max(floor_rps, r["rps"])
            if r["p99_ms"] > FLOOR_P99_LIMIT_MS:
                if connections == 1:
                    print("  WARNING: the floor's p99 exceeds 25 ms even at one connection (machine busy?)")
                break
            chosen, floor_held = connections, True

        # Floor and hooks alternate, round after round, and each figure is the median over the rounds: on a shared
        # machine a neighbour's burst then spoils one run of one kind, not the comparison.
        signed = (  # the endpoints called with a CDS client JWT
            ("patient-view", "/cds-services/imaging-ai-patient-view"),
            ("order-select", "/cds-services/imaging-ai-order-select"),
            (CHECKED, FLOOR_CHECKED),  # context, not judged
        )
        hooks = [name for name, _ in signed if name != CHECKED]
        trust = {f"{hook} {variant}": (hook, mount) for hook in hooks for variant, mount in TRUST_VARIANTS.items()}
        runs: dict[str, list[dict[str, Any]]] = {"floor": [], **{name: [] for name, _ in signed}}
        runs.update({name: [] for name in trust})
        recorded = AuditOutbox(workdir / "audited" / OUTBOX_FILE)
        sender = AuditDrainer(recorded, FhirAuditDelivery(FhirClient(fhir.base_url)))
        sent = AuditOutbox(workdir / "sent" / OUTBOX_FILE)
        for round_number in range(1, args.rounds + 1):
            for name, path in signed:
                # One token per request, and a hook cannot outrun the floor (the same stack and body, plus work), so
                # the floor's best rate bounds the tokens a run can use: too few would turn the run's tail into
                # replays, refused with 401 and counted as the service's errors. Made per round: they expire.
                # Each trust variant has its own replay cache, so it takes the same tokens once more.
                tokens = workdir / f"{name}.tokens"
                _tokens(tokens, int(floor_rps * args.duration * 1.1) + 500, key, args.alg, CDS_BASE + path)
                runs[name].append(
                    _measured(server.pid, f"{base}{path}", bodies[name], tokens, chosen, args.duration, script)
                )
                for variant, (hook, mount) in trust.items():
                    if hook != name:
                        continue
                    runs[variant].append(
                        _measured(
                            server.pid, f"{base}{mount}{path}", bodies[name], tokens, chosen, args.duration, script
                        )
                    )
                    sender.drain_once()  # +audit: sent by this driver between runs, off the measurement
                    _wait_for_empty(sent)  # +audit sent: what the drainers still send must not load the next run
            runs["floor"].append(
                _measured(server.pid, f"{base}/floor", bodies["patient-view"], None, chosen, args.duration, script)
            )
            floor_rps = max(floor_rps, runs["floor"][-1]["rps"])
            print(
                f"  round {round_number}: p99 "
                + ", ".join(f"{name} {r[-1]['p99_ms']:.1f} ms" for name, r in runs.items())
                + "; srv CPU ms/req "
                + ", ".join(f"{name} {r[-1]['cpu_ms']:.2f}" for name, r in runs.items()),
                flush=True,
            )

        medians = {name: _median_run(r) for name, r in runs.items()}
        floor = medians.pop("floor")
        print(
            f"\nat {chosen} connections (floor p99 <= {FLOOR_P99_LIMIT_MS:g} ms), "
            f"{args.workers} gunicorn sync workers, JWT {args.alg}; "
            f"medians of {args.rounds} rounds of {args.duration:g} s each"
        )
        print(f"{'':<26} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>9} {'errors':>7} {'srv CPU ms':>11}")
        print(_row("floor (trivial Flask)", floor))
        for name, r in medians.items():
            if name not in trust:
                print(_row(name, r))
        for variant, (hook, _) in trust.items():
            r, without = medians.pop(variant), medians[hook]
            print(_row(variant, r))
            met = r["p99_ms"] <= 1.1 * without["p99_ms"] and r["error_count"] == 0
            print(
                f"  {variant}: p99 {r['p99_ms'] / without['p99_ms']:.2f}x, p50 {r['p50_ms'] / without['p50_ms']:.2f}x, "
                f"CPU per request {r['cpu_ms'] / without['cpu_ms']:.2f}x the same hook without; "
                f"goal p99 <= 1.1x: {'met' if met else 'NOT met'}"
            )
        stored = requests.get(f"{fhir.base_url}/AuditEvent", params={"_summary": "count"}, timeout=30).json()
        left = recorded.pending() + sent.pending()
        print(f"AuditEvents stored in the FHIR server: {stored.get('total')} (left in the outboxes: {left})")
        checked = medians.pop(CHECKED)
        print(
            f"{CHECKED} (context, not judged): p99 {checked['p99_ms'] / floor['p99_ms']:.2f}x floor, "
            f"CPU per request {checked['cpu_ms'] / floor['cpu_ms']:.2f}x: what any hook costs before its own work"
        )
        # The target holds at a load the floor sustains at p99 <= 25 ms. When the floor did not (even at one
        # connection, or in the measured rounds), a busy machine set the tail, and the run can judge nothing.
        judged = floor_held and floor["p99_ms"] <= FLOOR_P99_LIMIT_MS
        for name, r in medians.items():
            met = r["p99_ms"] <= min(2 * floor["p99_ms"], 50.0) and r["error_count"] == 0
            verdict = ("met" if met else "NOT met") if judged else "NOT JUDGED, the floor missed 25 ms; rerun"
            print(
                f"{name}: p99 {r['p99_ms'] / floor['p99_ms']:.2f}x floor, "
                f"throughput {r['rps'] / floor['rps']:.2f}x, CPU per request {r['cpu_ms'] / floor['cpu_ms']:.2f}x; "
                f"target p99 <= 2x floor and <= 50 ms, zero errors: {verdict}"
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
        servers.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

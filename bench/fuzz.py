"""The long hostile fuzz of the HTTP API (the short one is tests/api/hostile): schemathesis + our generator.

Starts its own ``stylequeue api`` (tests/support/live.py: PostgreSQL database and Redis DB index of
its own, folder storage, ``STYLEQUEUE_AUTH=on``, tenants A and B, no worker) on 127.0.0.1 only, then

1. runs ``st run`` (schemathesis) against ``/openapi.json`` with A's key, in rounds of
   ``--st-examples`` examples per operation (phases examples, coverage, fuzzing, stateful; checks
   not_a_server_error, response_schema_conformance, status_code_conformance,
   content_type_conformance; NUL bytes allowed), one seed per round, until it has sent
   ``--st-share`` of the requests (or of the time);
2. sends the scale-factor probes of the security review (finding 1) with a /healthz watchdog, and
   one JSON batch naming 70,000 ids (finding 6g);
3. sends hostile requests from tests/api/hostile/hostile.py (hypothesis, seeded) until ``--requests``
   requests were sent in all, or ``--max-seconds`` passed.

Prints the requests sent, the number of 5xx and every distinct failure (operation, status, the
exception class the API logged, one example). Exit status 1 on any failure (every 5xx is one).

    .venv/bin/python bench/fuzz.py [--requests 10000] [--seed 0] [--max-seconds 1200]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.api.hostile.hostile import (  # noqa: E402
    Fuzzer,
    HealthWatch,
    Ids,
    Probe,
    all_probes,
    huge_list_probes,
    scale_factor_probes,
)
from tests.support.live import HOST, LiveApi, standalone_api  # noqa: E402

ST = str(Path(sys.executable).with_name("st"))
ST_CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
_LOGGED = re.compile(r"event=(?:unhandled_error|db_unavailable) path=(?P<path>.*?) error=(?P<error>\w+)")


@dataclass
class StFailure:
    operation: str
    status: str
    problem: str
    count: int = 0
    example: str = ""


@dataclass
class StResult:
    requests: int = 0
    server_errors: int = 0
    rounds: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: dict[tuple[str, str, str], StFailure] = field(default_factory=dict)

    def add(self, operation: str, status: str, problem: str, example: str, count: int = 1) -> None:
        f = self.failures.setdefault((operation, status, problem), StFailure(operation, status, problem))
        f.count += count
        if not f.example or len(example) < len(f.example):
            f.example = example


def templates(api: LiveApi) -> list[tuple[str, re.Pattern[str]]]:
    import httpx

    paths = httpx.get(f"{api.base_url}/openapi.json", timeout=10).json()["paths"]
    out = []
    for template in sorted(paths, key=len, reverse=True):
        pattern = re.escape(template)
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]*", pattern)
        out.append((template, re.compile(f"^{pattern}$")))
    return out


def operation_of(method: str, raw_path: str, table: list[tuple[str, re.Pattern[str]]]) -> str:
    for template, pattern in table:
        if pattern.match(raw_path):
            return f"{method} {template}"
    return f"{method} {raw_path[:60]}"


def run_schemathesis(
    api: LiveApi, out: Path, *, seed: int, examples: int, want: int, seconds: float
) -> StResult:
    """``st run`` rounds (one seed each) until ``want`` requests or ``seconds`` are spent."""
    result = StResult()
    table = templates(api)
    start = time.monotonic()
    n = max(5, min(examples, want // 30))  # a round sends roughly 30 requests per example
    while result.requests < want:
        left = seconds - (time.monotonic() - start)
        if left < 5:
            break
        report = out / f"st-round-{result.rounds}"
        mark = api.log_size()
        before = result.requests
        cmd = [
            ST,
            "run",
            f"{api.base_url}/openapi.json",
            "-H",
            f"Authorization: Bearer {api.key_a}",
            "--checks",
            ST_CHECKS,
            "-n",
            str(n),
            "--seed",
            str(seed + result.rounds),
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--generation-allow-x00",
            "true",
            "--generation-database",
            "none",
            "--continue-on-failure",
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "10",
            "--no-color",
            "--warnings",
            "off",
            "--report",
            "har,json",
            "--report-dir",
            str(report),
        ]
        try:
            proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=left)
            (report / "st-output.txt").write_text(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired:
            result.add("schemathesis", "-", "round cut at the time budget", " ".join(cmd[:3]))
        result.rounds += 1
        _read_round(api, report, mark, table, result)
        api.ensure_alive()
        per_example = max(1.0, (result.requests - before) / n)
        n = max(5, min(examples, int((want - result.requests) / per_example) + 1))
    result.seconds = time.monotonic() - start
    return result


def _read_round(
    api: LiveApi, report: Path, mark: int, table: list[tuple[str, re.Pattern[str]]], result: StResult
) -> None:
    logged = [(m["path"], m["error"]) for m in _LOGGED.finditer(api.log_since(mark))]
    for har in report.glob("har-*.json"):
        entries = json.loads(har.read_text())["log"]["entries"]
        for e in entries:
            method, url, status = e["request"]["method"], e["request"]["url"], e["response"]["status"]
            result.requests += 1
            result.statuses[status] += 1
            if status < 500:
                continue
            result.server_errors += 1
            raw_path = urlsplit(url).path
            error = _take_logged(logged, unquote(raw_path))  # uvicorn decodes the path the same way
            result.add(operation_of(method, raw_path, table), str(status), error, f"{method} {url[:300]}")
    for js in report.glob("json-*.json"):
        for f in json.loads(js.read_text()).get("failures", []):
            if f.get("code") == "ST101":
                continue  # server errors: counted per request from the HAR above
            for op in f.get("operations") or ["?"]:
                result.add(op, str(f.get("code")), str(f.get("title")), f"see {js}", int(f.get("count", 1)))


def _take_logged(logged: list[tuple[str, str]], path: str) -> str:
    """The exception class of the first not yet matched logged error on ``path``."""
    for i, (p, error) in enumerate(logged):
        if p == path:
            del logged[i]
            return error
    return "(nothing logged)"


def run_hostile(
    api: LiveApi, fuzzer: Fuzzer, *, seed: int, want: int, deadline: float, chunk: int = 500
) -> None:
    """Hypothesis-drawn probes, ``chunk`` examples per seeded run, until ``want`` more were sent."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as with_seed

    goal = fuzzer.sent + want
    strategy = all_probes(Ids.of(api))
    round_no = 0
    while fuzzer.sent < goal and time.monotonic() < deadline:
        n = min(chunk, goal - fuzzer.sent)

        @with_seed(seed * 100_003 + round_no)
        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @given(strategy)
        def send(probe: Probe) -> None:
            if fuzzer.sent < goal and time.monotonic() < deadline:
                fuzzer.send(probe)

        send()
        round_no += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="requests to send in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=1200.0, help="stop after this long anyway")
    ap.add_argument(
        "--st-share", type=float, default=0.3, help="share of the requests (and of the time) for schemathesis"
    )
    ap.add_argument("--st-examples", type=int, default=50, help="schemathesis examples per operation")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per hostile request")
    ap.add_argument(
        "--app-dir", type=Path, default=None, help="source tree whose API runs (default: this checkout)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (API log, reports)")
    args = ap.parse_args(argv)

    started = time.monotonic()
    deadline = started + args.max_seconds
    work = Path(tempfile.mkdtemp(prefix="sq-fuzz-"))
    failed = True
    try:
        with standalone_api(work / "api", app_dir=args.app_dir) as api:
            assert urlsplit(api.base_url).hostname == HOST
            print(f"API {api.base_url} (code: {api.app_dir}); log {api.log_path}", flush=True)
            st_result = run_schemathesis(
                api,
                work,
                seed=args.seed,
                examples=args.st_examples,
                want=int(args.requests * args.st_share),
                seconds=args.max_seconds * args.st_share,
            )
            print(
                f"schemathesis: {st_result.requests} requests in {st_result.seconds:.0f}s "
                f"({st_result.rounds} rounds), {st_result.server_errors} x 5xx",
                flush=True,
            )

            fuzzer = Fuzzer(api, timeout=args.timeout)
            t0 = time.monotonic()
            for probe in scale_factor_probes(Ids.of(api)):
                with HealthWatch(api, timeout=5.0) as watch:
                    fuzzer.send(probe)
                if watch.worst > 1.0:
                    fuzzer.record(
                        probe,
                        "healthz",
                        f"blocked the event loop ({probe.what})",
                        f"/healthz waited {watch.worst:.1f}s",
                    )
                api.ensure_alive()
            for probe in huge_list_probes(Ids.of(api)):
                fuzzer.send(probe)
            run_hostile(
                api,
                fuzzer,
                seed=args.seed,
                want=max(
                    int(args.requests * (1 - args.st_share)),  # its share at least
                    args.requests - st_result.requests - fuzzer.sent,
                ),
                deadline=deadline,
            )
            fuzzer.close()
            print(
                f"hostile generator: {fuzzer.sent} requests in {time.monotonic() - t0:.0f}s, "
                f"{fuzzer.server_errors} x 5xx, {fuzzer.accepted} accepted, "
                f"{fuzzer.restarts} API restarts",
                flush=True,
            )
            failed = _print_summary(st_result, fuzzer, time.monotonic() - started)
    finally:
        if failed or args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _print_summary(st_result: StResult, fuzzer: Fuzzer, seconds: float) -> bool:
    total = st_result.requests + fuzzer.sent
    five = st_result.server_errors + fuzzer.server_errors
    distinct = len(st_result.failures) + len(fuzzer.failures)
    print()
    print(
        f"requests sent: {total} in {seconds:.0f}s (schemathesis {st_result.requests}, hostile {fuzzer.sent})"
    )
    print(f"5xx: {five}")
    print(f"distinct failures: {distinct}")
    for f in sorted(st_result.failures.values(), key=lambda f: (f.operation, f.status, f.problem)):
        print(f"  [schemathesis] {f.operation} -> {f.status}: {f.problem} (x{f.count})")
        print(f"      e.g. {f.example}")
    for h in sorted(fuzzer.failures.values(), key=lambda h: (h.operation, h.status, h.problem)):
        print(f"  [hostile] {h.operation} -> {h.status}: {h.problem} (x{h.count})")
        if h.probe is not None:
            print("      e.g. " + h.probe.describe(240).replace("\n", "\n      "))
        if h.detail:
            print(f"      {h.detail[:300]}")
    if fuzzer.slowest:
        print("slowest hostile answers: " + "; ".join(f"{s:.2f}s {w}" for s, w in fuzzer.slowest[:3]))
    return five > 0 or distinct > 0


if __name__ == "__main__":
    sys.exit(main())

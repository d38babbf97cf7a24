"""``stylequeue submit --wait``: one progress bar per job, from the batch's live events (the command
is ``api.client_cli``, which then saves the results).

tqdm is imported when a wait starts, so ``stylequeue --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.jobs import TERMINAL, JobStatus

if TYPE_CHECKING:
    from api.client import StyleQueueClient

MAX_JOB_BARS = 16  # beyond this many jobs, one overall bar
JOB_EVENTS = frozenset({"status", "progress", "checkpoint"})  # a batch stream's events about one job


def wait(client: StyleQueueClient, batch_id: str, names: dict[str, str]) -> list[dict[str, Any]]:
    """Follow the batch's live events until every job is finished, with tqdm bars (one per job for
    small batches); then the jobs as listed once (what ``download`` needs)."""
    from tqdm import tqdm

    per_job = len(names) <= MAX_JOB_BARS
    bars = (
        {
            jid: tqdm(
                total=100, desc=names[jid][:30], position=i, leave=True, bar_format=_bar_format("queued")
            )
            for i, jid in enumerate(names)
        }
        if per_job
        else {"all": tqdm(total=len(names), desc="jobs finished")}
    )
    try:
        for event in client.batch_events(batch_id):
            if event.event in ("batch", "completed"):
                if not per_job:
                    counts = event.json()["counts"]
                    bars["all"].n = sum(counts.get(str(s), 0) for s in TERMINAL)
                    bars["all"].refresh()
            elif per_job and event.event in JOB_EVENTS:
                _show(bars, event.json())
        return client.list_jobs(batch_id=batch_id)
    finally:
        for bar in bars.values():
            bar.close()


def _bar_format(state: str) -> str:
    """A job's bar: name, percentage, bar, then its state as is (tqdm's ``{postfix}`` would
    prepend ", " to it)."""
    return "{desc:<30} {percentage:3.0f}%|{bar}| " + state.replace("{", "{{").replace("}", "}}")


def job_state(job: dict[str, Any]) -> str:
    """``running eta 29s``, ``queued``, ``failed out_of_memory``: what a job's bar ends with."""
    state = str(job["status"])
    eta = job["progress"].get("eta_seconds")
    if state == JobStatus.RUNNING and isinstance(eta, (int, float)) and eta > 0:
        state += f" eta {eta:.0f}s"
    code = (job.get("error") or {}).get("code")
    return f"{state} {code}" if code and state != JobStatus.SUCCEEDED else state


def _show(bars: dict[str, Any], job: dict[str, Any]) -> None:
    bar = bars.get(job["id"])
    if bar is None:
        return
    bar.n = round(100 * float(job["progress"].get("fraction") or 0))
    bar.bar_format = _bar_format(job_state(job))
    bar.refresh()


__all__ = ["MAX_JOB_BARS", "job_state", "wait"]

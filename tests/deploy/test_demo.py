"""``make demo`` (deploy/demo.py) without its processes: no deadline while the batch moves, partial
results and a contact sheet when it stalls, random weights said on the sheet, and a description of
the batch computed from the params it submits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deploy.demo import Demo, build_parser
from deploy.demo_report import RANDOM_WEIGHTS, DemoError, Stalled, Watchdog, describe, sheet_caption
from tests.support.images import image_bytes

NAMES = {
    "c1": "content_astronaut.png",
    "c2": "content_chelsea_cat.png",
    "s1": "style_hokusai_great_wave.jpg",
}


class Clock:
    """Fake time: ``sleep`` moves it on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _job(job_id: str, content: str, status: str, fraction: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": status,
        "content_id": content,
        "style_ids": ["s1"],
        "attempts": 1 if status != "queued" else 0,
        "progress": {"fraction": fraction},
        "checkpoints": [],
        "error": None,
        **extra,
    }


class FakeClient:
    """``list_jobs`` answers each scripted state in turn, then the last one for ever."""

    def __init__(self, states: list[list[dict[str, Any]]]) -> None:
        self.states = states
        self.downloaded: list[str] = []

    def list_jobs(self, **filters: Any) -> list[dict[str, Any]]:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def download_result(self, job_id: str, dest: Path) -> Path:
        dest.write_bytes(image_bytes(96, 64))
        self.downloaded.append(job_id)
        return dest


def _demo(tmp_path: Path, *argv: str) -> tuple[Demo, Clock]:
    demo = Demo(build_parser().parse_args(["--out", str(tmp_path), *argv]))
    clock = Clock()
    demo.clock, demo.sleep = clock, clock.sleep
    return demo, clock


def _red_pixels(path: Path) -> int:
    img = Image.open(path).convert("RGB")
    band = img.crop((0, 0, img.width, 24)).tobytes()  # the caption's first line
    return sum(1 for i in range(0, len(band), 3) if band[i] > 150 and band[i + 1] < 80 and band[i + 2] < 80)


RANDOM = {"execution": {"random_weights": True, "weights": "random"}}


def test_the_watchdog_has_no_deadline_while_progress_moves() -> None:
    clock = Clock()
    dog = Watchdog(stall_s=300, clock=clock)
    for step in range(60):  # 50 minutes, far past the old fixed 900 s, moving every 50 s
        clock.sleep(50)
        assert dog.observe(("job", step)) == 0
    clock.sleep(299)
    assert dog.observe(("job", 59)) == 299
    clock.sleep(2)
    with pytest.raises(Stalled, match="no job made progress for 301s"):
        dog.observe(("job", 59))
    capped = Watchdog(stall_s=300, total_s=600, clock=clock)
    clock.sleep(601)
    with pytest.raises(Stalled, match="did not finish within 600s"):
        capped.observe("moved")


def test_a_stalled_batch_keeps_what_finished_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo, clock = _demo(tmp_path, "--stall-timeout", "30")
    stuck = [_job("a", "c1", "succeeded", 1.0, **RANDOM), _job("b", "c2", "running", 0.4)]
    client = FakeClient([[_job("a", "c1", "running", 0.5), _job("b", "c2", "queued")], stuck])
    with pytest.raises(Stalled):
        demo.finish(client, "batch", NAMES)  # type: ignore[arg-type]
    assert 30 < clock.now - 1000 < 40
    assert client.downloaded == ["a"]
    assert (tmp_path / "content_astronaut__style_hokusai_great_wave.png").is_file()
    sheet = tmp_path / "contact_sheet.png"
    assert Image.open(sheet).height > 200 and _red_pixels(sheet) > 20  # the random-weights caption
    out = capsys.readouterr().out
    assert "no progress for 16s; still waiting" in out and out.count("still waiting") == 1
    assert "downloaded 1 results (of 2 jobs) and contact_sheet.png" in out


def test_a_finished_batch_delivers_every_result_and_failures_after_them(tmp_path: Path) -> None:
    demo, _ = _demo(tmp_path)
    real = {"execution": {"random_weights": False}}
    client = FakeClient(
        [[_job("a", "c1", "succeeded", 1.0, **real), _job("b", "c2", "succeeded", 1.0, **real)]]
    )
    demo.finish(client, "batch", NAMES)  # type: ignore[arg-type]
    assert sorted(client.downloaded) == ["a", "b"]
    assert _red_pixels(tmp_path / "contact_sheet.png") == 0  # real weights: no warning
    failed = _job("b", "c2", "failed", error={"code": "diverged", "message": "the loss stayed NaN"})
    client = FakeClient([[_job("a", "c1", "succeeded", 1.0, **RANDOM), failed]])
    with pytest.raises(DemoError, match="1 job\\(s\\) did not succeed.*diverged"):
        demo.finish(client, "batch", NAMES)  # type: ignore[arg-type]
    assert client.downloaded == ["a"] and _red_pixels(tmp_path / "contact_sheet.png") > 20


def test_the_caption_reads_the_jobs() -> None:
    done = [_job("a", "c1", "succeeded", 1.0, **RANDOM)]
    assert sheet_caption(done, 1) == [RANDOM_WEIGHTS]
    assert sheet_caption(done, 8) == [RANDOM_WEIGHTS, "partial: 1 of 8 jobs finished"]
    assert sheet_caption([_job("a", "c1", "succeeded", 1.0)], 1) == []


def test_the_printed_description_is_what_runs(tmp_path: Path) -> None:
    demo, _ = _demo(tmp_path)  # make demo's defaults
    assert describe(4, 2, demo.params()) == (
        "4 contents x 2 styles = 8 jobs at 192 px: 2 scales (96, 192 px), 50 iterations each"
    )
    bigger, _ = _demo(tmp_path, "--size", "256", "--iterations", "100")
    assert "2 scales (128, 256 px), 100 iterations each" in describe(4, 2, bigger.params())

"""Helpers the tests share, with no fixtures: ``servers`` (ports, processes, PostgreSQL databases,
``require``), ``waiting`` (polling), ``stacks`` (worker + API processes), ``live`` (one API process
to attack), ``apps`` (the in-process API), ``images`` (small test images) and ``jobs`` (job rows)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

"""The submit page's parameters (read from ``JobParams``: defaults, bounds, descriptions; the maxima the
settings add) and its estimate of the work, computed by the submission's own checks
(``api.plans.plan_jobs``, ``api.job_creation.validate_params``): what the page says is what a submit
would be told."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from sqlalchemy.orm import Session

from api.forms import json_field
from api.job_creation import parse_params_json, validate_params
from api.plans import plan_jobs
from shared import quotas
from shared.models import Tenant
from shared.params import JobParams
from shared.settings import Settings

# The parameters the page offers (JobParams has more: the JSON API and the CLI take them all).
COMMON = (
    "size",
    "min_size",
    "scale_factor",
    "iterations",
    "style_weight",
    "content_weight",
    "tv_weight",
    "optimizer",
    "style_loss",
    "init",
    "preserve_color",
    "seed",
    "output_format",
)


@dataclass(frozen=True)
class ParamField:
    name: str
    kind: str  # int | float | bool | choice
    default: Any  # None: the engine's default (the help says which)
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...]
    help: str

    @property
    def step(self) -> str:
        return "1" if self.kind == "int" else "any"

    @property
    def shown_default(self) -> str:
        """The default as the page shows it ("" when the engine picks: the help says what)."""
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return f"{self.default:.4g}" if isinstance(self.default, float) else str(self.default)

    def number(self, value: float | None, *, words: bool = False) -> str:
        """A bound as an input's ``min``/``max`` attribute (exact), or for people (``words``)."""
        if value is None:
            return ""
        if self.kind == "int":
            return f"{int(value):,}" if words else str(int(value))
        return f"{value:g}" if words else f"{value:.12g}"

    @property
    def shown_range(self) -> str:
        if self.kind in ("bool", "choice") or self.minimum is None or self.maximum is None:
            return ""
        return f"{self.number(self.minimum, words=True)} to {self.number(self.maximum, words=True)}"

    @property
    def note(self) -> str:
        """The input's help line: its default, its range on this server, what it does."""
        default = f"default {self.shown_default}" if self.shown_default else ""
        return "; ".join(part for part in (default, self.shown_range, self.help) if part)


def _metadata(field: FieldInfo) -> list[Any]:
    """The constraints of a field, also those inside ``Optional[Annotated[...]]``."""
    found = list(field.metadata)
    for arg in typing.get_args(field.annotation):
        for extra in typing.get_args(arg)[1:]:
            if isinstance(extra, FieldInfo):
                found += extra.metadata
    return found


def _bounds(field: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for item in _metadata(field):
        if isinstance(item, annotated_types.Ge | annotated_types.Gt):
            low = float(item.ge if isinstance(item, annotated_types.Ge) else item.gt)  # type: ignore[arg-type]
        if isinstance(item, annotated_types.Le | annotated_types.Lt):
            high = float(item.le if isinstance(item, annotated_types.Le) else item.lt)  # type: ignore[arg-type]
    return low, high


def _kind(name: str, field: FieldInfo) -> tuple[str, tuple[str, ...]]:
    if name == "iterations":
        return "int", ()
    choices = tuple(str(c) for c in typing.get_args(field.annotation) if isinstance(c, str))
    if choices:
        return "choice", choices
    if field.annotation is bool:
        return "bool", ()
    if field.annotation is int:
        return "int", ()
    return "float", ()


def param_fields(settings: Settings) -> list[ParamField]:
    """The page's parameter inputs, with the limits this server applies."""
    caps: dict[str, tuple[float, str]] = {
        "size": (settings.max_size, f"at most {settings.max_size} px on this server"),
        "min_size": (settings.max_size, ""),
        "iterations": (
            min(settings.max_iterations, 100_000),
            f"per scale; empty: the engine's schedule; at most {settings.max_iterations} over all scales",
        ),
    }
    out = []
    for name in COMMON:
        field = JobParams.model_fields[name]
        kind, choices = _kind(name, field)
        low, high = _bounds(field)
        cap, note = caps.get(name, (None, ""))
        if name == "iterations":
            low = 1
        if cap is not None:
            high = min(high, cap) if high is not None else cap
        words = [w for w in (field.description, note) if w]
        out.append(ParamField(name, kind, field.default, low, high, choices, "; ".join(words)))
    return out


def estimate(
    session: Session,
    tenant_id: str,
    settings: Settings,
    *,
    contents: int,
    styles: int,
    mode: str,
    pairs: str | None,
    params: str | None,
) -> dict[str, Any]:
    """The jobs, scales and work a submission of this shape would create, or the error it would get."""
    plan = plan_jobs(contents, styles, mode, json_field(pairs, "pairs"), settings.max_batch_jobs)
    checked = validate_params(parse_params_json(params), settings, [len(ss) for _, ss, _ in plan])
    costs = [checked.work() for _ in plan]  # the page sends no masks: one style region per job
    tenant = session.get(Tenant, tenant_id)
    budget = quotas.effective_limits(tenant, settings).daily_budget_mpi if tenant else 0
    used = quotas.usage_on(session, tenant_id, quotas.today())
    session.rollback()
    return {
        "jobs": len(plan),
        "scales": checked.long_edges(),
        "iterations": checked.iterations_per_scale(),
        "work_per_job": checked.work(),
        "max_job_work": settings.max_job_work,
        "charge_mpi": quotas.charge_of(costs),
        "budget_mpi": budget,
        "used_mpi": used,
    }


__all__ = ["COMMON", "ParamField", "estimate", "param_fields"]

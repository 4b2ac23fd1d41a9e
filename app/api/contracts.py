"""Tables under contract at the edge: refuse, quarantine or trim before anything is published.

`EdgeContracts.check` takes the validated request (activities, or runs for larger ones)
and returns what to publish plus what the answer says (`quarantined`, `dropped_columns`),
or raises a 422 naming each cell and rule. Without a tables file it returns the request
as it came, after one `stat`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from app import metrics
from app.api.errors import ApiError
from app.contracts.check import KEEP_VERDICT, QUARANTINE, REFUSE, TRIM, Verdict, Violation, verdict
from app.contracts.file import TablesConfig
from app.contracts.pii import PiiPolicies, delete_problem, parse_hmac_keys
from app.contracts.quarantine import quarantine_row, received_at_now
from app.contracts.reload import TablesFile
from app.schema.activity import Activity
from app.schema.columnar import ActivityRun, record_batch, runs_of
from app.schema.validation import MAX_DETAILS
from app.settings import Settings

UNDECLARED_LABEL = "_undeclared"  # metrics label of tables not in the file: names from clients are unbounded


@dataclass(slots=True)
class EdgeOutcome:
    validated: list[Activity] | list[ActivityRun]
    quarantined: list[tuple[int, Activity, Violation]] = field(default_factory=list)
    dropped: Counter[tuple[str, str]] | None = None  # (table, column) -> activities; made when needed

    def to_publish(self, batch_id: str, key_id: str | None = None) -> list[Activity] | list[ActivityRun]:
        """The kept activities, then one quarantine row per quarantined activity (naming the key that sent it)."""
        if not self.quarantined:
            return self.validated
        received_at = received_at_now()
        rows = [quarantine_row(a, i, v, batch_id, received_at, key_id) for i, a, v in self.quarantined]
        if self.validated and self.validated[0].__class__ is ActivityRun:
            return [*self.validated, *runs_of(rows)]  # type: ignore[list-item]
        return [*self.validated, *rows]  # type: ignore[list-item]

    def quarantined_by_table(self) -> tuple[tuple[str, int], ...]:
        """(table, activities quarantined), for the batch's receipt."""
        if not self.quarantined:
            return ()
        return tuple(Counter(activity.table for _, activity, _ in self.quarantined).items())

    def answer_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.quarantined:
            fields["quarantined"] = len(self.quarantined)
            fields["quarantine"] = [
                {"index": i, "table": a.table, "rule": v.rule, "column": v.column, "reason": v.reason}
                for i, a, v in self.quarantined
            ]
        if self.dropped:
            fields["dropped_columns"] = [
                {"table": t, "column": c, "activities": n} for (t, c), n in self.dropped.items()
            ]
        return fields


class EdgeContracts:
    def __init__(self, tables_file: TablesFile, settings: Settings) -> None:
        self.tables_file = tables_file
        self.pii = PiiPolicies(parse_hmac_keys(settings.pii_hmac_keys))

    def check(self, body: Any, validated: list[Activity] | list[ActivityRun]) -> EdgeOutcome:
        config = self.tables_file.current()
        if config is None or not validated:
            return EdgeOutcome(validated)
        if validated[0].__class__ is ActivityRun:
            outcome = _check_runs(config, body, validated)  # type: ignore[arg-type]
        else:
            outcome = _check_activities(config, validated)  # type: ignore[arg-type]
        if config.has_pii:
            self._apply_pii(config, outcome)
        for _, activity, violation in outcome.quarantined:
            table = activity.table if config.settings_for(activity.table).declared else UNDECLARED_LABEL
            metrics.ACTIVITIES_QUARANTINED.labels(table, violation.rule).inc()
        for (table, _), count in (outcome.dropped or {}).items():
            metrics.COLUMNS_DROPPED.labels(table).inc(count)
        return outcome


    def _apply_pii(self, config: TablesConfig, outcome: EdgeOutcome) -> None:
        """PII policies on everything that leaves the edge: kept activities and quarantined ones."""
        refused = [
            {"loc": "user_activities", "message": problem}
            for item in outcome.validated
            if (problem := delete_problem(config, item.table, item.operation, item.col_names, item.key)) is not None
        ]
        if refused:
            metrics.ACTIVITIES_REJECTED.inc(sum(1 if a.__class__ is Activity else len(a) for a in outcome.validated))
            raise ApiError(422, "batch refused by the table PII policies; nothing was published", refused[:MAX_DETAILS])
        if not outcome.validated:
            pass
        elif outcome.validated[0].__class__ is ActivityRun:
            outcome.validated = [self.pii.run(config, r) for r in outcome.validated]  # type: ignore[arg-type]
        else:
            outcome.validated = [self.pii.activity(config, a) for a in outcome.validated]  # type: ignore[arg-type]
        outcome.quarantined = [(i, self.pii.activity(config, a), v) for i, a, v in outcome.quarantined]


def _refuse(refusals: list[tuple[int, Verdict]], activities: int) -> ApiError:
    details: list[dict[str, str]] = []
    for index, found in refusals:
        for v in found.violations:
            cell = "table" if v.position is None else f"{'col_names' if v.rule == 'columns' else 'col_types'}[{v.position}]"
            details.append({"loc": f"user_activities[{index}].{cell}", "message": v.describe(found.where)})
    if len(details) > MAX_DETAILS:
        details = details[:MAX_DETAILS] + [{"loc": "body", "message": f"too many problems; only the first {MAX_DETAILS} are reported"}]
    metrics.ACTIVITIES_REJECTED.inc(activities)
    return ApiError(422, f"batch refused by the table contracts: {len(refusals)} activit{'y' if len(refusals) == 1 else 'ies'}; nothing was published", details)


def _trimmed(activity: Activity, keep: tuple[int, ...]) -> Activity:
    names, types, values = activity.col_names, activity.col_types, activity.col_values
    return Activity(activity.operation, activity.table, [names[p] for p in keep], [types[p] for p in keep], [values[p] for p in keep], activity.key)


def _check_activities(config: TablesConfig, activities: list[Activity]) -> EdgeOutcome:
    verdicts = [verdict(config, a.table, a.operation, a.col_names, a.col_types) for a in activities]
    if all(v is KEEP_VERDICT for v in verdicts):  # the common case: nothing to copy
        return EdgeOutcome(activities)
    refusals = [(i, v) for i, v in enumerate(verdicts) if v.action == REFUSE]
    if refusals:
        raise _refuse(refusals, len(activities))
    outcome = EdgeOutcome([])
    kept: list[Activity] = outcome.validated  # type: ignore[assignment]
    for index, (activity, found) in enumerate(zip(activities, verdicts)):
        if found.action == QUARANTINE:
            outcome.quarantined.append((index, activity, found.violations[0]))
        elif found.action == TRIM:
            kept.append(_trimmed(activity, found.keep))
            outcome.dropped = outcome.dropped or Counter()
            outcome.dropped.update((activity.table, v.column) for v in found.violations)  # type: ignore[misc]
        else:
            kept.append(activity)
    return outcome


def _indexes_by_table(body: Any) -> dict[str, list[int]]:
    # Runs group a request by table; the request's own order gives each activity's index back.
    indexes: dict[str, list[int]] = {}
    for i, activity in enumerate(body["user_activities"]):
        indexes.setdefault(activity["table"], []).append(i)
    return indexes


def _check_runs(config: TablesConfig, body: Any, runs: list[ActivityRun]) -> EdgeOutcome:
    verdicts = [verdict(config, r.table, r.operation, r.col_names, r.col_types) for r in runs]
    if all(v is KEEP_VERDICT for v in verdicts):
        return EdgeOutcome(runs)
    indexes = _indexes_by_table(body)
    offsets: dict[str, int] = {}
    spans: list[list[int]] = []  # each run's request indexes
    for run in runs:
        start = offsets.get(run.table, 0)
        spans.append(indexes[run.table][start : start + len(run)])
        offsets[run.table] = start + len(run)
    refusals = [(i, v) for span, v in zip(spans, verdicts) if v.action == REFUSE for i in span]
    if refusals:
        raise _refuse(sorted(refusals, key=lambda item: item[0]), sum(map(len, runs)))
    outcome = EdgeOutcome([])
    kept: list[ActivityRun] = outcome.validated  # type: ignore[assignment]
    for run, span, found in zip(runs, spans, verdicts):
        if found.action == QUARANTINE:
            outcome.quarantined.extend(zip(span, run.activities(), [found.violations[0]] * len(run)))
        elif found.action == TRIM:
            types = [run.col_types[p] for p in found.keep]  # batch fields are named by position: rebuilt
            columns = [run.batch.column(p) for p in found.keep]
            kept.append(ActivityRun(run.table, run.operation, [run.col_names[p] for p in found.keep], types, record_batch(types, columns), run.key))
            outcome.dropped = outcome.dropped or Counter()
            outcome.dropped.update({(run.table, v.column): len(run) for v in found.violations})  # type: ignore[misc]
        else:
            kept.append(run)
    outcome.quarantined.sort(key=lambda item: item[0])
    return outcome

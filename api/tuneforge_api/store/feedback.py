"""Feedback sessions, their items and answers, and the labels on them.

Assignment (``next_item``): an item goes to at most ``labels_per_item`` labelers. A slot is
held by a label that ranks (a skip frees it) or by an item a labeler opened in the last
``LEASE_S`` seconds; an opened item that is abandoned longer goes to someone else. A labeler
gets back first the item they opened and did not label, then the first item (by index) they
never saw that still has a free slot. Asked to ``resume`` (the ranking page on load), a labeler
with no opened item gets back the item they labelled last, with their label, so a reload can
revise it instead of jumping on; the plain call moves on.

Assignment and labelling both hold the session row's lock (``lock_session``), so two labelers
cannot both take an item's last slot.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy import insert as sql_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge.types import (
    ErrorInfo,
    FeedbackAgreement,
    FeedbackLabel,
    FeedbackProgress,
    FeedbackSession,
    LabelerProgress,
    LabelerStats,
    Page,
    SampleRecord,
    SamplingParams,
)
from tuneforge_api.db.tables import (
    FeedbackAnswerRow,
    FeedbackItemRow,
    FeedbackLabelRow,
    FeedbackSessionRow,
    JobEventRow,
)
from tuneforge_api.feedback.agreement import session_agreement
from tuneforge_api.store import files, projects
from tuneforge_api.store.ids import new_id, now
from tuneforge_api.store.pages import newest_first

LEASE_S = 30 * 60
OPEN, LABELLED, SKIPPED = "open", "labelled", "skipped"


# -- sessions ---------------------------------------------------------------------------


async def insert_session(session: AsyncSession, values: dict[str, Any]) -> FeedbackSessionRow:
    row = FeedbackSessionRow(**values)
    session.add(row)
    await session.flush()
    return row


async def get_row(session: AsyncSession, project_id: str, session_id: str) -> FeedbackSessionRow | None:
    return await session.scalar(
        select(FeedbackSessionRow).where(
            FeedbackSessionRow.project_id == project_id, FeedbackSessionRow.id == session_id
        )
    )


async def get_row_by_job(session: AsyncSession, job_id: str) -> FeedbackSessionRow | None:
    return await session.scalar(select(FeedbackSessionRow).where(FeedbackSessionRow.job_id == job_id))


async def rows_page(
    session: AsyncSession, project_id: str, *, after: str | None, limit: int
) -> Page[FeedbackSessionRow]:
    return await newest_first(
        session,
        FeedbackSessionRow,
        [FeedbackSessionRow.project_id == project_id],
        lambda r: r,
        after=after,
        limit=limit,
    )


async def transition(
    session: AsyncSession,
    session_id: str,
    to: str,
    *,
    from_: tuple[str, ...] = ("generating",),
    **values: Any,
) -> bool:
    """Compare-and-set on the status; True if this call moved it."""
    result = await session.execute(
        update(FeedbackSessionRow)
        .where(FeedbackSessionRow.id == session_id, FeedbackSessionRow.status.in_(from_))
        .values(status=to, updated_at=now(), **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


async def insert_items(session: AsyncSession, session_id: str, records: list[SampleRecord]) -> None:
    items, answers = [], []
    for record in records:
        item_id = new_id("fbi")
        items.append(
            {"id": item_id, "session_id": session_id, "index": record.index, "prompt": record.prompt}
        )
        answers += [
            {"id": new_id("fba"), "item_id": item_id, "index": i, "text": text}
            for i, text in enumerate(record.answers)
        ]
    if items:
        await session.execute(sql_insert(FeedbackItemRow), items)
    if answers:
        await session.execute(sql_insert(FeedbackAnswerRow), answers)


async def _count_items(session: AsyncSession, session_id: str) -> int:
    return await session.scalar(
        select(func.count()).select_from(FeedbackItemRow).where(FeedbackItemRow.session_id == session_id)
    )


async def _prompts_generated(session: AsyncSession, job_id: str) -> int:
    """From the sample job's newest progress event."""
    data = await session.scalar(
        select(JobEventRow.data)
        .where(JobEventRow.job_id == job_id, JobEventRow.type == "metrics")
        .order_by(JobEventRow.seq.desc())
        .limit(1)
    )
    return int((data or {}).get("prompts_generated", 0))


async def to_model(session: AsyncSession, row: FeedbackSessionRow) -> FeedbackSession:
    items_total = await _count_items(session, row.id)
    if row.status == "ready" or items_total:
        prompts_total = generated = items_total
    else:
        facts = await files.facts(session, row.project_id, row.prompts_file)
        prompts_total = facts.n_examples if facts else 0
        generated = min(prompts_total, await _prompts_generated(session, row.job_id))
    labels = list(
        await session.execute(
            select(
                FeedbackLabelRow.item_id,
                FeedbackLabelRow.labeler,
                FeedbackLabelRow.state,
                FeedbackLabelRow.ranking,
            )
            .where(FeedbackLabelRow.session_id == row.id, FeedbackLabelRow.state != OPEN)
            .order_by(FeedbackLabelRow.seq)
        )
    )
    rankings: dict[str, list[Any]] = defaultdict(list)
    per_labeler: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item_id, labeler, state, ranking in labels:
        per_labeler[labeler][0 if state == LABELLED else 1] += 1
        if state == LABELLED:
            rankings[item_id].append(ranking)
    tau, multiple = session_agreement(rankings)
    names = await projects.key_names(session, row.project_id, list(per_labeler))
    return FeedbackSession(
        id=row.id,
        status=row.status,  # type: ignore[arg-type]
        model=row.model,
        prompts_file=row.prompts_file,
        k=row.k,
        labels_per_item=row.labels_per_item,
        sampling=SamplingParams.model_validate(row.sampling),
        job_id=row.job_id,
        error=ErrorInfo(**row.error) if row.error else None,
        progress=FeedbackProgress(
            prompts_total=prompts_total,
            prompts_generated=generated,
            items_total=items_total,
            labels_needed=items_total * row.labels_per_item,
            labels_done=sum(min(len(r), row.labels_per_item) for r in rankings.values()),
        ),
        agreement=FeedbackAgreement(mean_kendall_tau=tau, items_with_multiple_labels=multiple),
        labelers=[
            LabelerStats(labeler=k, name=names.get(k), labels=v[0], skips=v[1])
            for k, v in per_labeler.items()
        ],
        created_at=row.created_at,
    )


# -- items and assignment ----------------------------------------------------------------


async def get_item(session: AsyncSession, session_id: str, item_id: str) -> FeedbackItemRow | None:
    return await session.scalar(
        select(FeedbackItemRow).where(FeedbackItemRow.session_id == session_id, FeedbackItemRow.id == item_id)
    )


async def answers_of(session: AsyncSession, item_id: str) -> list[FeedbackAnswerRow]:
    return list(
        await session.scalars(
            select(FeedbackAnswerRow)
            .where(FeedbackAnswerRow.item_id == item_id)
            .order_by(FeedbackAnswerRow.index)
        )
    )


def _holds_slot(cutoff: int) -> Any:
    return or_(
        FeedbackLabelRow.state == LABELLED,
        and_(FeedbackLabelRow.state == OPEN, FeedbackLabelRow.opened_at > cutoff),
    )


def _slots_taken(item_id: Any, cutoff: int, *, besides: str) -> Any:
    """How many labelers other than ``besides`` hold a slot of the item (a scalar subquery)."""
    return (
        select(func.count())
        .select_from(FeedbackLabelRow)
        .where(FeedbackLabelRow.item_id == item_id, FeedbackLabelRow.labeler != besides, _holds_slot(cutoff))
        .scalar_subquery()
    )


async def item_is_full(session: AsyncSession, row: FeedbackSessionRow, item_id: str, labeler: str) -> bool:
    taken = await session.scalar(select(_slots_taken(item_id, now() - LEASE_S, besides=labeler)))
    return taken >= row.labels_per_item


async def lock_session(session: AsyncSession, row: FeedbackSessionRow) -> None:
    """Serialises assignment and labelling within a session on PostgreSQL, until the commit
    (SQLite has one writer anyway)."""
    await session.execute(
        select(FeedbackSessionRow.seq).where(FeedbackSessionRow.id == row.id).with_for_update()
    )


async def next_item(
    session: AsyncSession, row: FeedbackSessionRow, labeler: str, *, resume: bool = False
) -> FeedbackItemRow | None:
    """The item for this labeler now, opening it for them (see the module's docstring)."""
    await lock_session(session, row)
    ts = now()
    mine = await session.scalars(
        select(FeedbackLabelRow)
        .where(
            FeedbackLabelRow.session_id == row.id,
            FeedbackLabelRow.labeler == labeler,
            FeedbackLabelRow.state == OPEN,
        )
        .order_by(FeedbackLabelRow.opened_at, FeedbackLabelRow.seq)
    )
    for opened in list(mine):
        if await item_is_full(session, row, opened.item_id, labeler):
            await session.delete(opened)  # others filled it while this one lay abandoned
            continue
        opened.opened_at = ts  # renew the lease
        return await session.scalar(select(FeedbackItemRow).where(FeedbackItemRow.id == opened.item_id))
    if resume:
        last = await session.scalar(
            select(FeedbackLabelRow.item_id)
            .where(FeedbackLabelRow.session_id == row.id, FeedbackLabelRow.labeler == labeler)
            .order_by(FeedbackLabelRow.updated_at.desc(), FeedbackLabelRow.seq.desc())
            .limit(1)
        )
        if last is not None:
            return await session.scalar(select(FeedbackItemRow).where(FeedbackItemRow.id == last))
    seen = exists().where(FeedbackLabelRow.item_id == FeedbackItemRow.id, FeedbackLabelRow.labeler == labeler)
    item = await session.scalar(
        select(FeedbackItemRow)
        .where(
            FeedbackItemRow.session_id == row.id,
            ~seen,
            _slots_taken(FeedbackItemRow.id, ts - LEASE_S, besides=labeler) < row.labels_per_item,
        )
        .order_by(FeedbackItemRow.index)
        .limit(1)
    )
    if item is not None:
        session.add(
            FeedbackLabelRow(
                session_id=row.id,
                item_id=item.id,
                labeler=labeler,
                state=OPEN,
                note="",
                opened_at=ts,
                updated_at=ts,
            )
        )
        await session.flush()
    return item


async def labeler_progress(session: AsyncSession, row: FeedbackSessionRow, labeler: str) -> LabelerProgress:
    done = await session.scalar(
        select(func.count())
        .select_from(FeedbackLabelRow)
        .where(
            FeedbackLabelRow.session_id == row.id,
            FeedbackLabelRow.labeler == labeler,
            FeedbackLabelRow.state != OPEN,
        )
    )
    finished = exists().where(
        FeedbackLabelRow.item_id == FeedbackItemRow.id,
        FeedbackLabelRow.labeler == labeler,
        FeedbackLabelRow.state != OPEN,
    )
    opened = exists().where(
        FeedbackLabelRow.item_id == FeedbackItemRow.id,
        FeedbackLabelRow.labeler == labeler,
        FeedbackLabelRow.state == OPEN,
    )
    remaining = await session.scalar(
        select(func.count())
        .select_from(FeedbackItemRow)
        .where(
            FeedbackItemRow.session_id == row.id,
            ~finished,
            or_(
                opened,
                _slots_taken(FeedbackItemRow.id, now() - LEASE_S, besides=labeler) < row.labels_per_item,
            ),
        )
    )
    return LabelerProgress(
        done_by_me=done, remaining_for_me=remaining, items_total=await _count_items(session, row.id)
    )


# -- labels ------------------------------------------------------------------------------


def label_model(row: FeedbackLabelRow) -> FeedbackLabel:
    return FeedbackLabel(
        item_id=row.item_id,
        labeler=row.labeler,
        ranking=row.ranking or [],
        skipped=row.state == SKIPPED,
        unsafe=row.unsafe or [],
        note=row.note or "",
        updated_at=row.updated_at,
    )


async def get_label(session: AsyncSession, item_id: str, labeler: str) -> FeedbackLabelRow | None:
    return await session.scalar(
        select(FeedbackLabelRow).where(
            FeedbackLabelRow.item_id == item_id, FeedbackLabelRow.labeler == labeler
        )
    )


async def save_label(
    session: AsyncSession,
    row: FeedbackSessionRow,
    item_id: str,
    labeler: str,
    *,
    ranking: list[list[str]],
    skipped: bool,
    unsafe: list[str],
    note: str,
) -> FeedbackLabelRow:
    """Insert or replace this labeler's label on the item (the caller checked the slot)."""
    ts = now()
    values = {
        "state": SKIPPED if skipped else LABELLED,
        "ranking": ranking,
        "unsafe": unsafe,
        "note": note,
        "updated_at": ts,
    }
    label = await get_label(session, item_id, labeler)
    if label is None:
        try:
            async with session.begin_nested():
                label = FeedbackLabelRow(
                    session_id=row.id, item_id=item_id, labeler=labeler, opened_at=ts, **values
                )
                session.add(label)
        except IntegrityError:  # the same labeler's concurrent request inserted first
            label = await get_label(session, item_id, labeler)
    assert label is not None
    for name, value in values.items():
        setattr(label, name, value)
    await session.flush()
    return label


async def labelled_items(
    session: AsyncSession, session_id: str
) -> list[tuple[FeedbackItemRow, list[FeedbackAnswerRow], list[FeedbackLabelRow]]]:
    """Every item with its answers and its labels (skips included), by index."""
    items = list(
        await session.scalars(
            select(FeedbackItemRow)
            .where(FeedbackItemRow.session_id == session_id)
            .order_by(FeedbackItemRow.index)
        )
    )
    answers: dict[str, list[FeedbackAnswerRow]] = defaultdict(list)
    for answer in await session.scalars(
        select(FeedbackAnswerRow)
        .join(FeedbackItemRow, FeedbackItemRow.id == FeedbackAnswerRow.item_id)
        .where(FeedbackItemRow.session_id == session_id)
        .order_by(FeedbackAnswerRow.index)
    ):
        answers[answer.item_id].append(answer)
    labels: dict[str, list[FeedbackLabelRow]] = defaultdict(list)
    for label in await session.scalars(
        select(FeedbackLabelRow)
        .where(FeedbackLabelRow.session_id == session_id, FeedbackLabelRow.state != OPEN)
        .order_by(FeedbackLabelRow.seq)
    ):
        labels[label.item_id].append(label)
    return [(item, answers[item.id], labels[item.id]) for item in items]

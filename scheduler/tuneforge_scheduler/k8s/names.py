"""Object names, labels and label selectors shared by the builders, the executor and the chart."""

from __future__ import annotations

import hashlib
import re

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
JOB_ID = "tuneforge.io/job-id"
ATTEMPT = "tuneforge.io/attempt"
RUN = "tuneforge.io/run"
# The project of the job. Project ids are random, so a project known to this database proves a Job
# was made by this installation: the orphan sweep never deletes a Job whose project it does not know.
PROJECT = "tuneforge.io/project-id"
# Set once the scheduler has recorded how the attempt ended; the per-pass list excludes it.
RECORDED = "tuneforge.io/recorded"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# An object that answers 409 on create is this attempt's own when it carries these same labels.
IDENTITY_LABELS = (MANAGED_BY, INSTANCE, JOB_ID, ATTEMPT, RUN)
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

MANAGER = "tuneforge"
TRAINER_CONTAINER = "trainer"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
# An Indexed Job's pods are named "<job>-<index>" and use it as their hostname (a DNS label,
# at most 63 characters), so the Job name leaves room for "-" and up to three digits.
MAX_NAME = 59


def object_name(run: str) -> str:
    """The Kubernetes name of a run (``ft-{job}-a{attempt}``): the run name itself when it is a
    valid DNS-1123 label short enough for pod hostnames, else a deterministic, hashed form."""
    if len(run) <= MAX_NAME and _DNS_LABEL.match(run):
        return run
    digest = hashlib.sha256(run.encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")[: MAX_NAME - len(digest) - 1].rstrip("-")
    return f"{stem}-{digest}" if stem else f"ft-{digest}"


def label_value(value: str) -> str:
    """A valid label value (at most 63 characters) for ``value``; hashed when it is not one already."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[: 63 - len(digest) - 1].strip("-_.")
    return f"{stem}-{digest}" if stem else digest


def release_labels(release: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, INSTANCE: release}


def run_labels(
    release: str, job_id: str, attempt: int, name: str, project_id: str | None = None
) -> dict[str, str]:
    labels = {
        **release_labels(release),
        COMPONENT: "trainer",
        JOB_ID: label_value(job_id),
        ATTEMPT: str(attempt),
        RUN: name,
    }
    if project_id is not None:
        labels[PROJECT] = label_value(project_id)
    return labels


def active_selector(release: str) -> str:
    """Jobs of this release whose end is not recorded yet: what one reconcile pass lists.
    ``!=`` also matches Jobs without the label, i.e. every Job not yet recorded."""
    return f"{MANAGED_BY}={MANAGER},{INSTANCE}={release},{RECORDED}!=true"


def release_selector(release: str) -> str:
    return f"{MANAGED_BY}={MANAGER},{INSTANCE}={release}"

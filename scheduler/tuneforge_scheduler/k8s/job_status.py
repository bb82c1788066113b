"""Job and pod status (plain dicts from the API) to the executor's ``RunStatus``. Pure.

- condition Complete: exited 0.
- condition Failed, reason PodFailurePolicy (the trainer exited 42): exited 42.
- condition Failed, reason DeadlineExceeded: exited 42 (no retry) with a detail that names the
  max duration.
- condition Failed for another reason (BackoffLimitExceeded): exited with the trainer's exit
  code from the failed pod, else lost; either way a new attempt follows.
- spec.suspend (Kueue has not admitted the Job): running, detail "Waiting for quota ...".
- a Pending pod (Unschedulable, ImagePullBackOff, ErrImagePull, ...): running, detail names it.
- anything else, FailureTarget included (the pods are still stopping): running.
- no Job: missing.

A running state's ``detail`` is stable text (no timestamps), so the scheduler can post it as
an event whenever it changes.
"""

from __future__ import annotations

import re
from typing import Any

from tuneforge_scheduler.executors.base import RunState, RunStatus
from tuneforge_scheduler.k8s.names import KUEUE_QUEUE, TRAINER_CONTAINER

EXIT_NON_RETRIABLE = 42
# Container waiting reasons that will not fix themselves quickly; worth telling the user.
STUCK_REASONS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
_EXIT_CODE = re.compile(r"exit code (\d+)")

Obj = dict[str, Any]


def true_conditions(obj: Obj) -> dict[str, Obj]:
    return {
        c.get("type", ""): c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def is_finished(job: Obj) -> bool:
    """Complete or Failed: every pod has stopped (FailureTarget alone means they are stopping)."""
    conditions = true_conditions(job)
    return "Complete" in conditions or "Failed" in conditions


def needs_pod_details(job: Obj) -> bool:
    """True when some pod of a running Job is not ready yet, so its pods may say why."""
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    if is_finished(job) or spec.get("suspend"):
        return False
    return int(status.get("ready") or 0) < int(spec.get("parallelism") or 1)


def run_status(job: Obj | None, pods: list[Obj] = ()) -> RunStatus:  # type: ignore[assignment]
    """The state of one attempt from its Job and (any of) its pods."""
    if job is None:
        return RunStatus(RunState.missing)
    conditions = true_conditions(job)
    if "Complete" in conditions:
        return RunStatus(RunState.exited, 0)
    if "Failed" in conditions:
        return _failed(job, conditions["Failed"], pods)
    spec = job.get("spec") or {}
    if spec.get("suspend"):
        queue = (job.get("metadata") or {}).get("labels", {}).get(KUEUE_QUEUE)
        if queue:
            return RunStatus(
                RunState.running,
                detail=f"Waiting for quota: Kueue queue {queue} has not admitted the job yet",
            )
        return RunStatus(RunState.running, detail="Waiting: the Kubernetes Job is suspended")
    return RunStatus(RunState.running, detail=pending_detail(pods))


def _failed(job: Obj, condition: Obj, pods: list[Obj]) -> RunStatus:
    reason = condition.get("reason") or "Failed"
    message = condition.get("message") or ""
    if reason == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return RunStatus(
            RunState.exited,
            EXIT_NON_RETRIABLE,
            f"The attempt ran longer than its maximum duration ({deadline} s) and was stopped.",
        )
    code = trainer_exit_code(pods)
    if code is None and reason == "PodFailurePolicy":
        # "Container trainer for pod ns/x failed with exit code 42 matching FailJob rule at index 1"
        match = _EXIT_CODE.search(message)
        code = int(match.group(1)) if match else EXIT_NON_RETRIABLE
    if code == EXIT_NON_RETRIABLE:
        return RunStatus(RunState.exited, code)  # the trainer's error.json tells the user why
    detail = f"Kubernetes Job failed ({reason}): {message}".rstrip(": ")
    if code is None or code == 0:
        return RunStatus(RunState.lost, detail=detail)
    return RunStatus(RunState.exited, code, detail)


def trainer_exit_code(pods: list[Obj]) -> int | None:
    """The trainer's exit code from a failed pod; a 42 from any pod wins (it decides the outcome)."""
    codes = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Failed":
            continue
        if "DisruptionTarget" in true_conditions(pod):
            continue  # preempted or evicted: not the trainer's own exit code
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == TRAINER_CONTAINER and terminated and terminated.get("exitCode") is not None:
                codes.append(int(terminated["exitCode"]))
    if EXIT_NON_RETRIABLE in codes:
        return EXIT_NON_RETRIABLE
    nonzero = [c for c in codes if c != 0]
    return nonzero[0] if nonzero else None


def pending_detail(pods: list[Obj]) -> str:
    """Why pods of a running attempt are not running yet, as stable text; "" when nothing is stuck."""
    reasons: list[str] = []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        name = (pod.get("metadata") or {}).get("name", "?")
        for condition in status.get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                message = condition.get("message") or "no node fits the pod"
                reasons.append(f"Waiting for a node (Unschedulable): {message}")
        statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_REASONS:
                message = waiting.get("message") or ""
                reasons.append(f"Pod {name} cannot start ({waiting['reason']}): {message}".rstrip(": "))
    # Several pods of a multi-node attempt usually wait for the same reason; say it once.
    return "; ".join(dict.fromkeys(reasons))

"""The background fine-tunes that make the service's models, for the pages' status line and for clients."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import JobsDep, OwnerDep, SettingsDep
from app.schemas import JobList

router = APIRouter(prefix="/api/v1/jobs", tags=["service"])


@router.get("", response_model=JobList)
def list_jobs(jobs: JobsDep, settings: SettingsDep, owner: OwnerDep) -> JobList:
    """Each fine-tune `scratchgpt serve` runs in the background: its state, progress and time left.

    A finished job's model is served without a restart; a failed one says why and where its log is
    (the reason and paths where ``SCRATCHGPT_PUBLIC_SERVICE_DETAILS`` allows, or to an API key's user).
    """
    details = settings.details_public or owner.id.startswith("key:")
    return JobList(jobs=jobs.public(details), active=jobs.active)

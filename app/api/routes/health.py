"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import JSONResponse

from app.api.deps import JobsDep, KeyOwnerDep, MetricsDep, ModelsDep, SettingsDep
from app.schemas import Health, Readiness

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Liveness: the process answers. Says nothing about the models (see /ready)."""
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Models are still loading"}},
)
def ready(models: ModelsDep, settings: SettingsDep, jobs: JobsDep) -> JSONResponse:
    """Readiness: 503 while any model is still loading, then 200 with each model's state and the
    background fine-tunes' progress (``jobs``).

    A missing or broken checkpoint does not hold readiness back: the service is up, and the
    endpoints of that model answer 503 with the reason (while a fine-tune makes it: its progress).
    Neither does a fine-tune, nor our CPU kernels compiling (the chat answers through torch's
    meanwhile; ``kernels`` says which). The details (paths, errors) are shown only where
    ``SCRATCHGPT_PUBLIC_SERVICE_DETAILS`` allows (by default: without API keys).
    """
    loading = models.loading
    status = models.status()
    if not settings.details_public:
        status = {role: {"state": info["state"]} for role, info in status.items()}
    body = Readiness(ready=not loading, loading=loading, models=status, jobs=jobs.public(settings.details_public))
    return JSONResponse(body.model_dump(), status_code=503 if loading else 200)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
               401: {"description": "API keys are configured and none was sent"}},
)
def metrics(metrics: MetricsDep, settings: SettingsDep, key_owner: KeyOwnerDep) -> Response:
    """Prometheus metrics: open where ``SCRATCHGPT_PUBLIC_SERVICE_DETAILS`` allows (by default: without
    API keys), else for a scraper that sends a key (``Authorization: Bearer KEY``)."""
    if not settings.details_public and key_owner is None:
        raise HTTPException(401, detail="an API key is required: send Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

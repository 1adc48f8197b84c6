"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import MetricsDep, ModelsDep
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
def ready(models: ModelsDep) -> JSONResponse:
    """Readiness: 503 while any model is still loading, then 200 with each model's state.

    A missing or broken checkpoint does not hold readiness back: the service is up, and the
    endpoints of that model answer 503 with the reason.
    """
    loading = models.loading
    body = Readiness(ready=not loading, loading=loading, models=models.status())
    return JSONResponse(body.model_dump(), status_code=503 if loading else 200)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
)
def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

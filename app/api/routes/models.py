"""The chat models for the UI: each one's state and the decoding settings a new conversation gets with it."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ModelsDep, OwnerDep
from app.schemas import ChatModelInfo, ChatModels, DecodingDefaults

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("", response_model=ChatModels)
def chat_models(models: ModelsDep, owner: OwnerDep) -> ChatModels:
    """Every chat model served, in the order a new conversation prefers them, with the default named."""
    default = models.default_chat()
    listed = []
    for slot in models.chat.values():
        info = slot.public()
        listed.append(ChatModelInfo(
            name=slot.name, state=slot.state, default=slot is default, detail=slot.detail or None,
            make_with=info.get("make_with"), context_length=info.get("context_length"),
            decoding=DecodingDefaults(**models.conversation_defaults(slot)),
        ))
    return ChatModels(default=default.name, models=listed)

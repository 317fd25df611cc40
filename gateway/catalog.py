"""Configured models and the provider instance behind each."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ModelSettings, Settings, SimulatedModel
from gateway.errors import ModelNotFound
from gateway.providers.base import Provider
from gateway.providers.simulated import SimulatedProvider


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    settings: ModelSettings
    provider: Provider


def build_provider(model: ModelSettings) -> Provider:
    if isinstance(model, SimulatedModel):
        return SimulatedProvider(model)
    raise NotImplementedError(f"provider {model.provider!r} is not available yet")


class ModelCatalog:
    """Resolves a request's `model` (default: the first configured) to its provider."""

    def __init__(self, settings: Settings) -> None:
        self._entries = {m.name: CatalogEntry(m, build_provider(m)) for m in settings.models}
        self.default_model = settings.models[0].name

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: str | None) -> CatalogEntry:
        entry = self._entries.get(name or self.default_model)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not served here; see GET /v1/models")
        return entry

    async def aclose(self) -> None:
        for entry in self._entries.values():
            await entry.provider.aclose()

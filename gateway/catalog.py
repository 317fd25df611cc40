"""Configured models and the provider chain behind each."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ModelSettings, OpenAIModel, Settings, SimulatedModel
from gateway.errors import ModelNotFound
from gateway.metrics import GatewayMetrics
from gateway.providers.base import Provider
from gateway.providers.instrumented import InstrumentedProvider
from gateway.providers.openai import OpenAIProvider
from gateway.providers.resilience import Attempt, FallbackChain
from gateway.providers.simulated import SimulatedProvider


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    settings: ModelSettings
    #: The model's own provider wrapped with its retries and fallbacks.
    provider: Provider

    @property
    def passthrough(self) -> tuple[str, ...]:
        """Extra OpenAI-route fields this model's operator forwards as given."""
        return self.settings.passthrough if isinstance(self.settings, OpenAIModel) else ()


def build_provider(model: ModelSettings) -> Provider:
    if isinstance(model, SimulatedModel):
        return SimulatedProvider(model)
    return OpenAIProvider(model)


def _retries(model: ModelSettings) -> int:
    return model.max_retries if isinstance(model, OpenAIModel) else 0


class ModelCatalog:
    """Resolves a request's `model` (default: the first configured) to its provider chain."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        self._models = {m.name: m for m in settings.models}
        self._providers = {m.name: build_provider(m) for m in settings.models}
        if metrics is not None and metrics.enabled:
            self._providers = {
                name: InstrumentedProvider(p, metrics.upstream(p.kind, name))
                for name, p in self._providers.items()
            }
        self._entries = {m.name: CatalogEntry(m, self._chain(m)) for m in settings.models}
        self.default_model = settings.models[0].name

    def _chain(self, model: ModelSettings) -> Provider:
        fallbacks = model.fallbacks if isinstance(model, OpenAIModel) else ()
        if not fallbacks and not _retries(model):
            return self._providers[model.name]
        names = [model.name, *fallbacks]
        return FallbackChain(
            [Attempt(self._providers[n], _retries(self._models[n])) for n in names]
        )

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: str | None) -> CatalogEntry:
        entry = self._entries.get(name or self.default_model)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not served here; see GET /v1/models")
        return entry

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()

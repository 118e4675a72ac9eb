"""Projects: API-key authentication, the project view and its webhook
settings. The HTTP layer talks to this service, never to the store."""

from __future__ import annotations

from ..config import DeliverySettings, SourcesSettings
from ..addresses import AddressPolicy, validate_callback_url
from ..errors import NotFound
from ..schemas import S3Config, WebhookUpdate
from ..secretbox import SecretBox
from . import outputs
from ..store import AsyncStore, Store
from ..store.sqlite import Principal, Project


class ProjectService:
    def __init__(self, store: AsyncStore, delivery: DeliverySettings, sources: SourcesSettings,
                 secrets: SecretBox) -> None:
        self.store = store
        self.delivery = delivery
        self.sources = sources
        self.secrets = secrets

    async def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for an unknown or revoked key."""
        return await self.store(Store.authenticate, key)

    async def get(self, principal: Principal) -> Project:
        project = await self.store(Store.project, principal.project_id)
        if project is None:
            raise NotFound("project not found")
        return project

    async def set_webhook(self, principal: Principal, update: WebhookUpdate) -> Project:
        """Event names are checked by the schema; the URL by the delivery address rules."""
        if update.url is not None:
            await validate_callback_url(update.url, "url", self.delivery)
        return await self.store(Store.set_webhook, principal.project_id, update.url, list(update.events))

    async def rotate_secret(self, principal: Principal) -> Project:
        return await self.store(Store.rotate_secret, principal.project_id, self.delivery.secret_grace_seconds)

    async def set_storage(self, principal: Principal, config: S3Config) -> Project:
        """The default S3 output of the project's jobs; its secret is stored sealed."""
        await outputs.check_endpoint(config, "endpoint", AddressPolicy.for_sources(self.sources))
        return await self.store(Store.set_project_storage, principal.project_id, outputs.seal(self.secrets, config))

    async def clear_storage(self, principal: Principal) -> Project:
        return await self.store(Store.set_project_storage, principal.project_id, None)

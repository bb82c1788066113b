"""What the app holds for its lifetime; built by ``create_app``, never at module level."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from tuneforge.storage import Storage, open_storage
from tuneforge_api.auth_cache import AuthCache
from tuneforge_api.db.engine import make_engine, sessionmaker
from tuneforge_api.models_registry import base_models
from tuneforge_api.queue import TaskQueue
from tuneforge_api.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker
    storage: Storage
    queue: TaskQueue
    auth_cache: AuthCache = field(default_factory=AuthCache)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings.resolved_database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessionmaker(engine),
            storage=open_storage(settings.resolved_storage_uri),
            queue=TaskQueue(settings.redis_url, settings.resolved_queue_name),
        )

    def base_models(self) -> dict[str, Path | None]:
        return base_models(self.settings.models_dir)

    async def close(self) -> None:
        await self.queue.close()
        await self.engine.dispose()

"""Provider keys decrypted into memory, refreshed from the vault off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .vault import Vault

log = logging.getLogger("agent_egress.keyring")


class Keyring:
    def __init__(self, vault: Vault, refresh_seconds: float = 5.0) -> None:
        self.vault = vault
        self.refresh_seconds = refresh_seconds
        self._keys: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def _load(self) -> dict[str, str]:
        return {info.name: self.vault.get(info.name) for info in self.vault.list()}

    async def refresh(self) -> None:
        try:
            self._keys = await asyncio.to_thread(self._load)
        except Exception as e:  # a broken vault must not take the gateway down
            log.error("vault refresh failed, keeping the keys already loaded: %s", e)

    def get(self, name: str) -> str | None:
        return self._keys.get(name)

    def names(self) -> set[str]:
        return set(self._keys)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self.refresh()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

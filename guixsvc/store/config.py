"""Where the store and its state live, read from the environment exactly as upstream does.

`NIX_STORE_DIR` (daemon also `NIX_STORE`), `GUIX_STATE_DIRECTORY`, `GUIX_DATABASE_DIRECTORY`,
`GUIX_LOG_DIRECTORY`, `GUIX_CONFIGURATION_DIRECTORY` (spec/store.md §1), so every command and
test agrees on one set of directories.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: guix-daemon reads its socket name before listening
    from guixsvc.store.paths import StoreDir

DEFAULT_STORE = "/gnu/store"
DEFAULT_STATE = "/var/guix"
DEFAULT_LOG = "/var/log/guix"
DEFAULT_CONF = "/etc/guix"


@dataclass(frozen=True)
class StoreConfig:
    store_dir: str
    state_dir: str
    db_dir: str
    log_dir: str
    conf_dir: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, daemon: bool = True) -> StoreConfig:
        env = os.environ if env is None else env
        store = env.get("NIX_STORE_DIR") or (env.get("NIX_STORE") if daemon else None)
        store = os.path.normpath(os.path.abspath(store or DEFAULT_STORE))
        state = os.path.normpath(env.get("GUIX_STATE_DIRECTORY") or DEFAULT_STATE)
        return cls(
            store_dir=store,
            state_dir=state,
            db_dir=env.get("GUIX_DATABASE_DIRECTORY") or os.path.join(state, "db"),
            log_dir=env.get("GUIX_LOG_DIRECTORY") or DEFAULT_LOG,
            conf_dir=env.get("GUIX_CONFIGURATION_DIRECTORY") or DEFAULT_CONF,
        )

    @functools.cached_property
    def store(self) -> StoreDir:
        from guixsvc.store.paths import StoreDir

        return StoreDir(self.store_dir)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.state_dir, "daemon-socket", "socket")

    @property
    def acl_file(self) -> str:
        return os.path.join(self.conf_dir, "acl")

    @property
    def signing_key_secret(self) -> str:
        return os.path.join(self.conf_dir, "signing-key.sec")

    @property
    def signing_key_public(self) -> str:
        return os.path.join(self.conf_dir, "signing-key.pub")

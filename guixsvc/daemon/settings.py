"""The daemon's settings map, as upstream keeps it: named string values with typed readers.

Command-line options fill the defaults; each session copies the map and applies the client's
SetOptions to its copy (trusted clients may change any setting, untrusted ones only write
`untrusted-*` names), and helpers get the whole map as `_NIX_OPTIONS`
(spec/worker-protocol.md §7, globals.cc).
"""

from __future__ import annotations

import dataclasses
import pwd
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time: guix-daemon listens before loading the protocol
    from guixsvc.protocol.ops import ClientOptions

DEFAULT_SUBSTITUTE_URLS = "https://bordeaux.guix.gnu.org https://ci.guix.gnu.org"

#: Upstream defaults (`Settings::Settings` of current Guix plus the values set in guix-daemon's
#: `main`).
DEFAULTS: dict[str, str] = {
    "build-fallback": "false",
    "build-max-jobs": "1",
    "build-cores": "0",
    "system": "x86_64-linux",
    "multiplexed-build-output": "false",
    "build-max-silent-time": "3600",
    "build-timeout": "86400",
    "gc-reserved-space": str(8 * 1024 * 1024),
    "fsync-metadata": "true",
    "use-sqlite-wal": "true",
    "sync-before-registering": "false",
    "build-use-substitutes": "true",
    "build-users-group": "",
    "build-use-chroot": "true",
    "build-use-hook": "true",
    "build-impersonate-linux-26": "false",
    "build-keep-log": "true",
    "build-max-log-size": "0",
    "build-cache-failure": "false",
    "build-poll-interval": "5",
    "gc-check-reachability": "false",
    "gc-keep-outputs": "false",
    "gc-keep-derivations": "true",
    "auto-optimise-store": "true",
    "env-keep-derivations": "false",
    "substitute-urls": DEFAULT_SUBSTITUTE_URLS,
}

#: Settings a client may set for itself whether or not it is trusted.
_ALWAYS_ALLOWED = frozenset({
    "build-timeout", "build-max-silent-time", "build-max-jobs", "build-cores", "build-repeat",
    "multiplexed-build-output",
})  # fmt: skip

_BOOLEANS = frozenset(name for name, value in DEFAULTS.items() if value in ("true", "false"))
_INTEGERS = frozenset({
    "build-max-jobs", "build-cores", "build-max-silent-time", "build-timeout",
    "gc-reserved-space", "build-max-log-size", "build-poll-interval", "build-repeat",
})  # fmt: skip


class SettingsError(Exception):
    pass


@dataclass
class Settings:
    values: dict[str, str] = field(default_factory=lambda: dict(DEFAULTS))
    verbosity: int = 1  # lvlInfo
    build_verbosity: int = 0
    keep_failed: bool = False
    keep_going: bool = False
    print_build_trace: bool = False
    log_type: int = 0
    log_compression: str = "gzip"
    lose_logs: bool = False
    debug: bool = False
    #: The client's use-build-hook flag (SetOptions): false keeps its builds off the offload
    #: machines; `build-use-hook` (false with --no-offload) is the daemon's own switch.
    use_build_hook: bool = True

    def copy(self) -> Settings:
        return dataclasses.replace(self, values=dict(self.values))

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    def set(self, name: str, value: str) -> None:
        self.values[name] = value

    def get_bool(self, name: str) -> bool:
        value = self.values.get(name, DEFAULTS.get(name, "false"))
        if value == "true":
            return True
        if value == "false":
            return False
        raise SettingsError(f"configuration setting `{name}' should be either `true' or `false'")

    def get_int(self, name: str, default: int = 0) -> int:
        value = self.values.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise SettingsError(
                f"configuration setting `{name}' should have an integer value"
            ) from None

    def validate(self) -> None:
        """Upstream's `Settings::update`: every typed setting must parse."""
        for name in _BOOLEANS:
            if name in self.values:
                self.get_bool(name)
        for name in _INTEGERS:
            if name in self.values:
                self.get_int(name)

    def discovers(self) -> bool:
        """Substitutes are on and servers found by `guix discover` are to be used."""
        return self.get_bool("build-use-substitutes") and self.get_bool("discover")

    def substitute_urls(self) -> list[str]:
        if not self.get_bool("build-use-substitutes"):
            return []
        urls = self.get("untrusted-substitute-urls") or self.get("substitute-urls")
        return urls.split()

    def apply_client_options(
        self, options: ClientOptions, *, trusted: bool, remote: bool, peer_uid_known: bool
    ) -> list[str]:
        """Apply SetOptions; returns user names to create profile directories for."""
        self.keep_failed = options.keep_failed and not remote
        self.keep_going = options.keep_going
        self.set("build-fallback", "true" if options.fallback else "false")
        self.verbosity = options.verbosity
        if options.max_build_jobs is not None:
            self.set("build-max-jobs", str(options.max_build_jobs))
        if options.max_silent_time is not None:
            self.set("build-max-silent-time", str(options.max_silent_time))
        if options.build_cores is not None:
            self.set("build-cores", str(options.build_cores))
        self.build_verbosity = options.build_verbosity
        self.log_type = options.log_type
        self.print_build_trace = options.print_build_trace
        self.use_build_hook = options.use_build_hook
        if self.get_bool("build-use-substitutes"):
            self.set("build-use-substitutes", "true" if options.use_substitutes else "false")
        users: list[str] = []
        for name, value in options.overrides:
            if name == "user-name" and not peer_uid_known:
                users.append(value)
            elif trusted or name in _ALWAYS_ALLOWED:
                self.set(name, value)
            else:
                self.set("untrusted-" + name, value)
        self.validate()
        return users

    def pack(self) -> str:
        """The `_NIX_OPTIONS` value handed to helper programs."""
        lines = []
        for name in sorted(self.values, key=lambda n: n.encode()):
            value = self.values[name]
            if "\n" in name or "=" in name or "\n" in value:
                raise SettingsError(f"invalid option name/value `{name}'")
            lines.append(f"{name}={value}\n")
        return "".join(lines)


def lookup_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None

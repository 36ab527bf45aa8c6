"""mDNS/DNS-SD through the Avahi daemon's D-Bus API: advertise a service, browse for services.

`guix publish --advertise` announces `_guix_publish._tcp` and `guix-daemon --discover` browses
for it (spec/substitutes.md §9).  Upstream links libavahi-client through Guile-Avahi; that
library is itself only a D-Bus client of avahi-daemon, so speaking the same D-Bus API directly
gives the same records on the network without a C binding.  D-Bus comes from `dbus-fast`
(asyncio, pure Python with optional compiled speed-ups, maintained), imported lazily so that
nothing else in guixsvc needs it.

Behaviour kept from upstream's `guix/avahi.scm`:

* publishing registers one service on all interfaces and protocols, no TXT records unless
  given, once the Avahi server is running;
* browsing reports a service the first time its name is resolved (first interface wins), skips
  services registered by this machine's own Avahi daemon unless asked not to, and reports its
  removal.

Beyond upstream: a name collision makes the publisher pick Avahi's alternative name instead of
silently staying unpublished, a restarted avahi-daemon gets the service registered again and is
browsed again, and a service still announced on another interface after the resolved one went
away is re-resolved there instead of being dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

SERVICE_TYPE = "_guix_publish._tcp"

AVAHI_NAME = "org.freedesktop.Avahi"
_SERVER = "org.freedesktop.Avahi.Server"
_ENTRY_GROUP = "org.freedesktop.Avahi.EntryGroup"
_SERVICE_BROWSER = "org.freedesktop.Avahi.ServiceBrowser"
_DBUS = "org.freedesktop.DBus"

#: `AvahiIfIndex` / `AvahiProtocol` values of avahi-common/address.h.
IF_UNSPEC = -1
PROTO_UNSPEC = -1
PROTO_INET = 0
PROTO_INET6 = 1

#: `AvahiServerState` (avahi-common/defs.h).
SERVER_REGISTERING, SERVER_RUNNING, SERVER_COLLISION = 1, 2, 3
#: `AvahiEntryGroupState`.
GROUP_ESTABLISHED, GROUP_COLLISION, GROUP_FAILURE = 2, 3, 4
#: `AvahiLookupResultFlags`: the record was registered by the local Avahi daemon.
LOOKUP_RESULT_LOCAL = 8
LOOKUP_RESULT_OUR_OWN = 16

#: D-Bus errors that mean "nobody serves org.freedesktop.Avahi" (including a failed activation).
_NO_DAEMON_ERRORS = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.",
)

MISSING_DBUS_FAST = (
    "Avahi support needs the Python package 'dbus-fast' "
    "(install it with: pip install 'dbus-fast>=2')"
)


class AvahiError(Exception):
    """An error reported by avahi-daemon or by the bus (``function`` names the call)."""

    def __init__(self, message: str, function: str = "", name: str = "") -> None:
        super().__init__(message)
        self.function = function
        self.name = name


class AvahiNotRunning(AvahiError):
    """No Avahi daemon answers on the system bus (libavahi-client's ``error/no-daemon``)."""


class MissingDependency(AvahiError):
    """`dbus-fast` is not installed."""


@dataclasses.dataclass(frozen=True)
class Service:
    """A resolved service, as `guix/avahi.scm`'s ``<avahi-service>`` record."""

    name: str
    type: str
    domain: str
    interface: int
    protocol: int
    host: str
    address: str
    port: int
    txt: tuple[bytes, ...]
    flags: int

    @property
    def url(self) -> str:
        """``http://ADDRESS:PORT``, as `guix discover` writes it (IPv6 in brackets)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def require_dbus_fast() -> Any:
    try:
        import dbus_fast
        import dbus_fast.aio
    except ImportError:
        raise MissingDependency(MISSING_DBUS_FAST) from None
    return dbus_fast


def service_name() -> str:
    """Upstream's advertised name: ``guix-publish-<hostname>``."""
    return f"guix-publish-{socket.gethostname()}"


SignalHandler = Callable[[Any], None]


class Connection:
    """A system-bus connection talking to org.freedesktop.Avahi.

    Signals are routed by (object path, interface) to handlers.  One match rule per interface
    is installed *before* any browser exists, so no early signal can be lost (Avahi < 0.8
    starts emitting as soon as it creates an object).
    """

    def __init__(self, bus: Any, dbus_fast: Any) -> None:
        self.bus = bus
        self._df = dbus_fast
        self._handlers: dict[tuple[str, str], SignalHandler] = {}
        self._early: dict[tuple[str, str], list[Any]] = {}
        self._capture: set[str] = set()
        self.owner_changed: list[Callable[[bool], None]] = []
        bus.add_message_handler(self._on_message)

    @classmethod
    async def open(cls, address: str | None = None) -> Connection:
        """Connect to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` or the default socket)."""
        df = require_dbus_fast()
        try:
            if address:
                bus = await df.aio.MessageBus(bus_address=address).connect()
            else:
                bus = await df.aio.MessageBus(bus_type=df.BusType.SYSTEM).connect()
        except (OSError, EOFError) as exc:
            raise AvahiNotRunning(
                f"cannot connect to the system bus: {getattr(exc, 'strerror', None) or exc}",
                "connect",
            ) from None
        except Exception as exc:  # dbus_fast raises its own AuthError and friends
            raise AvahiNotRunning(f"cannot connect to the system bus: {exc}", "connect") from None
        conn = cls(bus, df)
        await conn.add_match(
            f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',"
            f"arg0='{AVAHI_NAME}'"
        )
        return conn

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bus.disconnect()

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = "/",
        interface: str = _SERVER,
        destination: str = AVAHI_NAME,
    ) -> list[Any]:
        df = self._df
        msg = df.Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=list(body),
        )  # fmt: skip
        try:
            reply = await self.bus.call(msg)
        except (OSError, EOFError) as exc:
            raise AvahiNotRunning(f"lost the system bus: {exc}", member) from None
        if reply is None:
            return []
        if reply.message_type == df.MessageType.ERROR:
            name = reply.error_name or ""
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else name
            if destination == AVAHI_NAME and name.startswith(_NO_DAEMON_ERRORS):
                raise AvahiNotRunning("Daemon not running", member, name)
            raise AvahiError(text, member, name)
        return list(reply.body)

    async def add_match(self, rule: str) -> None:
        await self.call(
            "AddMatch", "s", [rule], path="/org/freedesktop/DBus", interface=_DBUS,
            destination=_DBUS,
        )  # fmt: skip

    async def server_state(self) -> int:
        return int((await self.call("GetState"))[0])

    def capture(self, interface: str) -> None:
        """Queue signals of `interface` from objects nobody handles yet (see `on_signal`)."""
        self._capture.add(interface)

    def on_signal(self, path: str, interface: str, handler: SignalHandler) -> None:
        """Route (path, interface) signals to `handler`, replaying any captured early ones."""
        key = (path, interface)
        self._handlers[key] = handler
        for msg in self._early.pop(key, ()):
            handler(msg)

    def forget(self, path: str, interface: str) -> None:
        self._handlers.pop((path, interface), None)
        self._early.pop((path, interface), None)

    def _on_message(self, msg: Any) -> None:
        if msg.message_type != self._df.MessageType.SIGNAL:
            return
        if msg.interface == _DBUS and msg.member == "NameOwnerChanged":
            if msg.body and msg.body[0] == AVAHI_NAME:
                present = bool(msg.body[2])
                for fn in list(self.owner_changed):
                    fn(present)
            return
        key = (msg.path, msg.interface)
        handler = self._handlers.get(key)
        if handler is not None:
            handler(msg)
        elif msg.interface in self._capture:
            self._early.setdefault(key, []).append(msg)


async def _wait_running(conn: Connection, changed: asyncio.Event) -> None:
    """Return once avahi-daemon's server state is RUNNING (host name established)."""
    while True:
        changed.clear()
        try:
            if await conn.server_state() == SERVER_RUNNING:
                return
        except AvahiNotRunning:
            pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), 1.0)


class Advertiser:
    """Keeps one service registered with avahi-daemon until `close`.

    `start` fails with `AvahiNotRunning` / `MissingDependency` when there is nothing to talk
    to; afterwards registration happens in the background whenever the daemon is running.
    `published` holds the name actually registered (Avahi's alternative after a collision).
    """

    def __init__(
        self,
        name: str,
        port: int,
        *,
        type: str = SERVICE_TYPE,
        txt: Iterable[bytes] = (),
        bus_address: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.type = type
        self.txt = [list(t) for t in txt]
        self.bus_address = bus_address
        self.log = log or (lambda text: None)
        self.published: str | None = None
        self.established = asyncio.Event()
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._group: str | None = None
        self._group_state: asyncio.Queue[int] = asyncio.Queue()

    async def start(self) -> None:
        self._conn = conn = await Connection.open(self.bus_address)
        try:
            await conn.add_match(f"type='signal',sender='{AVAHI_NAME}',interface='{_SERVER}'")
            await conn.add_match(f"type='signal',sender='{AVAHI_NAME}',interface='{_ENTRY_GROUP}'")
            await conn.server_state()  # AvahiNotRunning now rather than silently later
        except BaseException:
            conn.close()
            raise
        conn.capture(_ENTRY_GROUP)
        conn.on_signal("/", _SERVER, lambda msg: self._wake.set())
        conn.owner_changed.append(self._owner_changed)
        self._task = asyncio.create_task(self._run())

    def _owner_changed(self, present: bool) -> None:
        self._group = None
        self.published = None
        self.established.clear()
        self._group_state.put_nowait(-1)
        self._wake.set()

    async def _run(self) -> None:
        conn = self._conn
        assert conn is not None
        name = self.name
        while True:
            await _wait_running(conn, self._wake)
            try:
                name = await self._register(conn, name)
            except AvahiNotRunning:
                await asyncio.sleep(0.5)
            except AvahiError as exc:
                self.log(f"an Avahi error was raised by `{exc.function}': {exc}")
                await asyncio.sleep(5)

    async def _register(self, conn: Connection, name: str) -> str:
        """Register under `name`; return when the registration is lost (the name to retry)."""
        path = str((await conn.call("EntryGroupNew"))[0])
        self._group = path
        queue: asyncio.Queue[int] = asyncio.Queue()
        self._group_state = queue
        conn.on_signal(path, _ENTRY_GROUP, lambda msg: queue.put_nowait(int(msg.body[0])))
        try:
            try:
                await conn.call(
                    "AddService", "iiussssqaay",
                    [IF_UNSPEC, PROTO_UNSPEC, 0, name, self.type, "", "", self.port, self.txt],
                    path=path, interface=_ENTRY_GROUP,
                )  # fmt: skip
            except AvahiError as exc:
                if exc.name != "org.freedesktop.Avahi.CollisionError":
                    raise
                return await self._rename(conn, name)  # registered by this very machine
            await conn.call("Commit", path=path, interface=_ENTRY_GROUP)
            while True:
                state = await queue.get()
                if state == GROUP_ESTABLISHED:
                    self.published = name
                    self.established.set()
                elif state == GROUP_COLLISION:
                    return await self._rename(conn, name)
                elif state == GROUP_FAILURE or state < 0:
                    return name
        finally:
            conn.forget(path, _ENTRY_GROUP)
            self.published = None
            self.established.clear()
            if self._group == path:
                self._group = None
                with contextlib.suppress(AvahiError):
                    await conn.call("Free", path=path, interface=_ENTRY_GROUP)

    async def _rename(self, conn: Connection, name: str) -> str:
        new = str((await conn.call("GetAlternativeServiceName", "s", [name]))[0])
        self.log(f"service name collision, renaming service to '{new}'")
        return new

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._conn is not None:
            self._conn.close()  # avahi-daemon frees the client's entry groups with it
            self._conn = None


ServiceCallback = Callable[[str, Service], Awaitable[None] | None]


class Browser:
    """Browse `types`, calling ``callback("new-service" | "remove-service", service)``.

    As upstream's `avahi-browse-service-thread`: a service is reported once per name (the
    first interface on which it resolves), services of the local Avahi daemon are skipped when
    `ignore_local` is true, and only addresses of `protocol` are resolved.
    """

    def __init__(
        self,
        types: Sequence[str],
        callback: ServiceCallback,
        *,
        ignore_local: bool = True,
        protocol: int = PROTO_INET,
        bus_address: str | None = None,
    ) -> None:
        self.types = list(types)
        self.callback = callback
        self.ignore_local = ignore_local
        self.protocol = protocol
        self.bus_address = bus_address
        self.services: dict[str, Service] = {}
        self._seen: dict[str, set[tuple[int, int, str, str]]] = {}
        self._conn: Connection | None = None
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Browse until `stop` is set; raises AvahiNotRunning when there is no daemon."""
        self._conn = conn = await Connection.open(self.bus_address)
        try:
            rule = f"type='signal',sender='{AVAHI_NAME}',interface='{_SERVICE_BROWSER}'"
            await conn.add_match(rule)
            await conn.add_match(f"type='signal',sender='{AVAHI_NAME}',interface='{_SERVER}'")
            await conn.server_state()
            conn.capture(_SERVICE_BROWSER)
            conn.on_signal("/", _SERVER, lambda msg: self._wake.set())

            def owner_changed(present: bool) -> None:
                self._lost.set()
                self._wake.set()

            conn.owner_changed.append(owner_changed)
            runner = asyncio.create_task(self._browse_forever(conn))
            stopper = asyncio.create_task((stop or asyncio.Event()).wait())
            try:
                done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if runner in done:
                    runner.result()
            finally:
                for t in (runner, stopper, *self._tasks):
                    t.cancel()
                await asyncio.gather(runner, stopper, *self._tasks, return_exceptions=True)
        finally:
            conn.close()

    async def _browse_forever(self, conn: Connection) -> None:
        while True:
            self._lost.clear()
            await _wait_running(conn, self._wake)
            paths = []
            try:
                for type_ in self.types:
                    reply = await conn.call(
                        "ServiceBrowserNew", "iissu", [IF_UNSPEC, self.protocol, type_, "", 0]
                    )
                    path = str(reply[0])
                    paths.append(path)
                    conn.on_signal(path, _SERVICE_BROWSER, self._on_browser_signal)
            except AvahiNotRunning:
                await asyncio.sleep(0.5)
                continue
            await self._lost.wait()
            for path in paths:
                conn.forget(path, _SERVICE_BROWSER)
            for name in list(self.services):
                await self._drop(name)
            self._seen.clear()

    def _on_browser_signal(self, msg: Any) -> None:
        if msg.member == "ItemNew":
            iface, proto, name, type_, domain, _flags = msg.body
            self._seen.setdefault(name, set()).add((iface, proto, type_, domain))
            if name not in self.services:
                self._spawn(self._resolve(name))
        elif msg.member == "ItemRemove":
            iface, proto, name, type_, domain, _flags = msg.body
            where = self._seen.get(name)
            if where is None:
                return
            where.discard((iface, proto, type_, domain))
            svc = self.services.get(name)
            if not where:
                del self._seen[name]
                if svc is not None:
                    self._spawn(self._drop(name))
            elif svc is not None and (svc.interface, svc.protocol) == (iface, proto):
                # Still announced elsewhere: report it gone, then resolve it there.
                self._spawn(self._drop(name, then_resolve=True))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        conn = self._conn
        assert conn is not None
        for iface, proto, type_, domain in sorted(self._seen.get(name, ())):
            if name in self.services:
                return
            try:
                r = await conn.call(
                    "ResolveService", "iisssiu",
                    [iface, proto, name, type_, domain, self.protocol, 0],
                )  # fmt: skip
            except AvahiError:
                continue  # timed out or vanished: upstream ignores resolver failures too
            flags = int(r[10])
            if name in self.services or (iface, proto, type_, domain) not in self._seen.get(
                name, ()
            ):
                return
            if self.ignore_local and flags & LOOKUP_RESULT_LOCAL:
                return
            svc = Service(
                name=r[2], type=r[3], domain=r[4], interface=int(r[0]), protocol=int(r[1]),
                host=r[5], address=r[7], port=int(r[8]), txt=tuple(bytes(t) for t in r[9]),
                flags=flags,
            )  # fmt: skip
            self.services[name] = svc
            await self._notify("new-service", svc)
            return

    async def _drop(self, name: str, then_resolve: bool = False) -> None:
        svc = self.services.pop(name, None)
        if svc is not None:
            await self._notify("remove-service", svc)
        if then_resolve and name in self._seen:
            await self._resolve(name)

    async def _notify(self, action: str, svc: Service) -> None:
        result = self.callback(action, svc)
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            await result

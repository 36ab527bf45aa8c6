"""A forked helper process for lock tests: the only way to see POSIX locks from outside."""

from __future__ import annotations

import os
import select
import time
import traceback
from collections.abc import Callable


class Child:
    """A forked process running `target(child)`, talking to the parent by lines over pipes."""

    def __init__(self, target: Callable[[Child], None]) -> None:
        self._down_r, self._down_w = os.pipe()
        self._up_r, self._up_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                target(self)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        self.pid = pid

    # child side
    def send(self, msg: str) -> None:
        os.write(self._up_w, msg.encode() + b"\n")

    def wait_for(self) -> str:
        return _read_line(self._down_r, 60.0)

    # parent side
    def tell(self, msg: str) -> None:
        os.write(self._down_w, msg.encode() + b"\n")

    def recv(self, timeout: float = 60.0) -> str:
        return _read_line(self._up_r, timeout)

    def poll(self, timeout: float) -> bool:
        return bool(select.select([self._up_r], [], [], timeout)[0])

    def join(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                for fd in (self._down_r, self._down_w, self._up_r, self._up_w):
                    os.close(fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError("child did not exit")


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"timeout waiting for a message (got {data!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"pipe closed (got {data!r})")
        data += chunk
    return data[:-1].decode()

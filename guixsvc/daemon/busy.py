"""Store items in use by running processes: what `guix gc --list-busy` prints.

The collector must not delete what a running program has mapped, opened, runs from or names in
its environment, yet nothing in the database says so.  Upstream's daemon learns it by running
`guix gc --list-busy` under the GC lock (`addAdditionalRoots`, `nix/libstore/gc.cc`), and that
command scans `/proc` (`busy-store-items`, `guix/store/roots.scm`, spec gc.md §2.3).  Our daemon
calls `busy_store_items` directly; `guixsvc gc --list-busy` prints the same list.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator

__all__ = ["busy_store_items", "canonicalize_store_item", "referenced_files"]

#: A line of `/proc/N/maps` naming a file: the path column after blanks (no spaces in it).
_MAPS_LINE = re.compile(rb"^.*[ \t]+/([^ ]+)$")
#: Errors for one process that mean "gone or not ours": its files are skipped.
_IGNORED = (errno.ENOENT, errno.ESRCH, errno.EACCES)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _fd_targets(proc: str) -> list[str]:
    directory = f"{proc}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    targets = []
    for name in names:
        if not name.isdigit():
            continue
        target = _readlink(f"{directory}/{name}")
        if target is not None and target.startswith("/"):
            targets.append(target)
    return targets


def _maps_files(proc: str) -> list[str]:
    with open(f"{proc}/maps", "rb") as f:
        data = f.read()
    files = []
    for line in data.split(b"\n"):
        m = _MAPS_LINE.match(line)
        if m:
            files.append("/" + os.fsdecode(m.group(1)))
    return files


def _environ_files(proc: str, store_dir: str) -> list[str]:
    with open(f"{proc}/environ", "rb") as f:
        data = f.read()
    pattern = re.compile(re.escape(os.fsencode(store_dir)) + rb"/[0-9a-z]{32}-[a-zA-Z0-9._+-]+")
    files: list[str] = []
    for entry in data.split(b"\0"):
        _, equal, value = entry.partition(b"=")
        if equal:
            files.extend(os.fsdecode(m) for m in pattern.findall(value))
    return files


def referenced_files(store_dir: str, proc_dir: str = "/proc") -> Iterator[str]:
    """Files used by each process (exe, cwd, open fds, mappings, store names in the environment).

    Processes are visited in numeric order; a process that vanishes or cannot be read
    contributes nothing at all, as upstream.
    """
    try:
        pids = sorted((n for n in os.listdir(proc_dir) if n.isdigit()), key=int)
    except OSError:
        return
    for pid in pids:
        proc = f"{proc_dir}/{pid}"
        try:
            found: list[str] = []
            for name in ("exe", "cwd"):
                target = _readlink(f"{proc}/{name}")
                if target is not None:
                    found.append(target)
            found.extend(_fd_targets(proc))
            found.extend(_maps_files(proc))
            found.extend(_environ_files(proc, store_dir))
        except OSError as e:
            if e.errno in _IGNORED:
                continue
            raise
        yield from found


def canonicalize_store_item(file: str, store_dir: str) -> str | None:
    """`<store>/<first component>` for a file under the store, else None."""
    prefix = store_dir + "/"
    if not file.startswith(prefix):
        return None
    base = file[len(prefix) :]
    slash = base.find("/")
    return prefix + (base if slash < 0 else base[:slash])


def busy_store_items(store_dir: str, proc_dir: str = "/proc") -> list[str]:
    """The store items running processes use, without duplicates, in order of discovery."""
    seen: dict[str, None] = {}
    for file in referenced_files(store_dir, proc_dir):
        item = canonicalize_store_item(file, store_dir)
        if item is not None:
            seen.setdefault(item, None)
    return list(seen)

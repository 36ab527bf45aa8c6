"""GC roots as users see them, and profile generations, for `guix gc --list-roots` and `-d`.

Upstream does both on the client side, without the daemon: `gc-roots` (`guix/store/roots.scm`)
lists the symlinks under `<state>/gcroots` and `<state>/profiles`, and `--delete-generations`
finds the profiles behind `NAME-N-link` roots and removes their old generation links with the
procedures of `guix/profiles.scm` (spec gc.md §7.3, §7.4).  A profile is a symlink `NAME` to the
current generation link `NAME-N-link`, which points into the store.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable

__all__ = [
    "delete_old_generations",
    "gc_roots",
    "generation_file_name",
    "generation_number",
    "generation_numbers",
    "generation_profile",
    "matching_generations",
    "profile_generations",
    "user_owned",
]

_GENERATION_RX = re.compile(r"(.*)-([0-9]+)-link$")


def _is_store_path(path: str, store_dir: str) -> bool:
    # `store-path?`: a plain prefix test, as upstream.
    return path.startswith(store_dir)


def gc_roots(state_dir: str, store_dir: str) -> list[str]:
    """`gc-roots`: breadth-first over `gcroots/` and `profiles/`, one entry per symlink.

    A link into the store yields the link itself; any other link yields its (absolute) target,
    the user-side file of an indirect root.  Each directory's links come sorted by name, and the
    directories visited later come first, as upstream's accumulation does.
    """
    queue = [f"{state_dir}/gcroots", f"{state_dir}/profiles"]
    visited: set[str] = set()
    batches: list[list[str]] = []
    while queue:
        directory = queue.pop(0)
        if directory in visited:
            continue
        visited.add(directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        batch = []
        for entry in entries:
            kind = _kind(entry)
            if kind == "d":
                queue.append(entry.path)
            elif kind == "l":
                target = os.readlink(entry.path)
                if _is_store_path(target, store_dir):
                    batch.append(entry.path)
                elif target.startswith("/"):
                    batch.append(target)
                else:
                    batch.append(f"{os.path.dirname(entry.path)}/{target}")
        batches.append(batch)
    return [root for batch in reversed(batches) for root in batch]


def _kind(entry: os.DirEntry[str]) -> str:
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "?"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "o"


def user_owned(root: str, uid: int | None = None) -> bool:
    """True if `root` exists (not followed) and belongs to `uid` (default: the caller)."""
    try:
        return os.lstat(root).st_uid == (os.getuid() if uid is None else uid)
    except OSError:
        return False


def generation_profile(root: str) -> str | None:
    """The profile of a generation link `PROFILE-N-link`, if `PROFILE/manifest` exists."""
    m = _GENERATION_RX.search(root)
    if m is None:
        return None
    profile = m.group(1)
    return profile if os.path.exists(f"{profile}/manifest") else None


def _profile_regexp(profile: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(os.path.basename(profile)) + "-([0-9]+)")


def generation_number(profile: str) -> int:
    """The current generation of `profile` (from the name its symlink points to), or 0."""
    try:
        target = os.readlink(profile)
    except OSError:
        return 0
    m = _profile_regexp(profile).match(os.path.basename(target))
    return int(m.group(1)) if m else 0


def generation_numbers(profile: str) -> list[int]:
    """Sorted generation numbers found next to `profile`, or [0] if there are none."""
    rx = _profile_regexp(profile)
    try:
        names = os.listdir(os.path.dirname(profile) or ".")
    except OSError:
        return [0]
    numbers = sorted({int(m.group(1)) for m in map(rx.match, names) if m})
    return numbers or [0]


def profile_generations(profile: str) -> list[int]:
    numbers = generation_numbers(profile)
    return [] if numbers == [0] else numbers


def generation_file_name(profile: str, number: int) -> str:
    return f"{profile}-{number}-link"


def _midnight(seconds: float) -> int:
    """The local midnight starting the day of `seconds` (upstream `time-at-midnight`)."""
    t = time.localtime(seconds)
    return int(time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, t.tm_isdst)))


def matching_generations(profile: str, duration: int, *, now: float | None = None) -> list[int]:
    """Generations whose link's target ctime (at midnight) is strictly older than
    midnight today minus `duration` seconds (`matching-generations`, relation `>`)."""
    limit = _midnight(time.time() if now is None else now) - duration
    result = []
    for number in generation_numbers(profile):
        try:
            ctime = os.stat(generation_file_name(profile, number)).st_ctime
        except OSError:
            continue
        if limit > _midnight(ctime):
            result.append(number)
    return result


def delete_old_generations(
    profile: str,
    duration: int | None,
    *,
    out: Callable[[str], object],
    now: float | None = None,
) -> list[int]:
    """Delete the generations of `profile` matching `duration` (all but the current one when
    None), printing ``deleting PROFILE-N-link`` for each; return the numbers deleted."""
    current = generation_number(profile)
    if duration is None:
        numbers = profile_generations(profile)
    else:
        numbers = matching_generations(profile, duration, now=now)
    deleted = []
    for number in numbers:
        if number in (current, 0):
            continue
        link = generation_file_name(profile, number)
        out(f"deleting {link}\n")
        try:
            os.unlink(link)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        deleted.append(number)
    return deleted

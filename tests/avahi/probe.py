"""Run inside a sandbox machine: browse `_guix_publish._tcp` with `guixsvc.avahi.Browser` for a
few seconds and print each event as a JSON line (the tests read them from stdout)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from guixsvc import avahi


async def main(seconds: float, ignore_local: bool) -> None:
    def event(action: str, svc: avahi.Service) -> None:
        record = dataclasses.asdict(svc)
        record["txt"] = [t.decode() for t in svc.txt]
        print(json.dumps({"action": action, "url": svc.url, **record}), flush=True)

    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    browser = avahi.Browser([avahi.SERVICE_TYPE], event, ignore_local=ignore_local)
    await browser.run(stop)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]), sys.argv[2:] != ["--include-local"]))

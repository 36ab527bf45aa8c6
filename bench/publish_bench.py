"""Benchmark `guixsvc publish` with wrk on loopback, side by side with nginx serving the very
same narinfo and NAR bytes as static files (sendfile), and print ours/nginx ratios.

    python bench/publish_bench.py [--seconds N] [--size-mb M] [--conns 1,10] [--publish-flag F]

Needs `wrk` and `nginx` (Debian packages wrk and nginx-light); nginx runs as the invoking user
(as root it is told `user root`) with a private prefix, config and pid file in a temporary
directory, listening on 127.0.0.1 only.  Starts its own daemon and publish servers on a
temporary store and removes everything afterwards.  The rows alternate between the servers
(ours, nginx, ours, ...), `--rounds` times, and the medians are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guixsvc.pki import keys
from tests.substitutes.helpers import free_port, start_node, start_publish, stop_node

NGINX_CONF = """\
{user}
worker_processes auto;
daemon off;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {base}/tmp;
    proxy_temp_path {base}/tmp;
    fastcgi_temp_path {base}/tmp;
    uwsgi_temp_path {base}/tmp;
    scgi_temp_path {base}/tmp;
    types {{ application/x-nix-narinfo narinfo; }}
    default_type application/x-nix-archive;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def wrk(url: str, conns: int, seconds: float) -> tuple[float, float]:
    out = subprocess.run(
        ["wrk", f"-c{conns}", f"-t{min(conns, 2)}", f"-d{seconds:g}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    assert m is not None
    scale = {"B": 1e-6, "KB": 1e-3 * 1.024, "MB": 1.048576, "GB": 1073.741824}[m.group(2)]
    return rps, float(m.group(1)) * scale


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as r:
        return bytes(r.read())


def start_nginx(base: Path, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (base / "tmp").mkdir(parents=True, exist_ok=True)
    conf = base / "nginx.conf"
    user = "user root root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, base=base, port=port, root=root))
    proc = subprocess.Popen(
        ["nginx", "-p", str(base), "-c", str(conf), "-e", str(base / "nginx-error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            fetch(url + "/probe")
            return proc, url
        except (OSError, urllib.error.URLError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start") from None
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--conns", default="1,10", help="comma-separated connection counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated row names to run")
    ap.add_argument(
        "--publish-flag", action="append", default=[], help="extra flag for our publish"
    )
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian packages wrk, nginx-light)")
            return 1
    conns_list = [int(c) for c in args.conns.split(",")]
    base = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    node = start_node(base / "n", base / "n" / "store", None)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        keys.generate_key_files(str(node.conf))
        blob = base / "blob"
        with open(blob, "wb") as f:  # half random, half compressible
            f.write(os.urandom(args.size_mb << 19))
            f.write(b"guix " * ((args.size_mb << 19) // 5))
        with node.client() as c:
            small = c.add_text_to_store("small", "hello", [])
            big = c.add_to_store("big", str(blob))
        flags = ["-C", "zstd:3", *args.publish_flag]
        _, plain = start_publish(node, None, *flags, name="publish-plain")
        cache = base / "cache"
        _, cached = start_publish(node, None, *flags, f"--cache={cache}", name="pc")
        big_base = os.path.basename(big)
        # The first request schedules baking (and answers 404 for a big item).
        with contextlib.suppress(urllib.error.HTTPError):
            fetch(f"{cached}/{big_base[:32]}.narinfo")
        deadline = time.monotonic() + 300
        while not (cache / "zstd" / f"{big_base}.narinfo").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("baking took too long")
            time.sleep(0.2)
        # nginx's document root: the same bytes, as static files.
        root = base / "www"
        small_info = f"{os.path.basename(small)[:32]}.narinfo"
        (root / "nar" / "zstd").mkdir(parents=True)
        (root / "probe").write_bytes(b"ok")
        (root / small_info).write_bytes(fetch(f"{plain}/{small_info}"))
        (root / "nar" / big_base).write_bytes(fetch(f"{plain}/nar/{big_base}"))
        shutil.copyfile(cache / "zstd" / f"{big_base}.nar", root / "nar" / "zstd" / big_base)
        nginx, static = start_nginx(base / "nginx", root)
        rows = [
            ("narinfo", f"{plain}/{small_info}", f"{static}/{small_info}"),
            ("nar none", f"{plain}/nar/{big_base}", f"{static}/nar/{big_base}"),
            ("nar zstd (live)", f"{plain}/nar/zstd/{big_base}", None),
            ("nar cached zstd", f"{cached}/nar/zstd/{big_base}", f"{static}/nar/zstd/{big_base}"),
        ]
        if args.only:
            wanted = set(args.only.split(","))
            rows = [r for r in rows if r[0] in wanted]
        print(f"size {args.size_mb} MB, {args.rounds} rounds of {args.seconds} s, medians")
        head = f"{'what':<18}{'conns':>6}{'ours req/s':>12}{'nginx req/s':>13}"
        print(head + f"{'ours MB/s':>11}{'nginx MB/s':>12}{'ours/nginx':>12}")
        for name, ours_url, peer_url in rows:
            for conns in conns_list:
                ours: list[tuple[float, float]] = []
                peer: list[tuple[float, float]] = []
                for _ in range(args.rounds):
                    ours.append(wrk(ours_url, conns, args.seconds))
                    if peer_url is not None:
                        peer.append(wrk(peer_url, conns, args.seconds))
                o_rps = statistics.median(r for r, _ in ours)
                o_mbs = statistics.median(m for _, m in ours)
                line = f"{name:<18}{conns:>6}{o_rps:>12,.0f}"
                if peer:
                    p_rps = statistics.median(r for r, _ in peer)
                    p_mbs = statistics.median(m for _, m in peer)
                    line += f"{p_rps:>13,.0f}{o_mbs:>11,.1f}{p_mbs:>12,.1f}{o_rps / p_rps:>12.2f}"
                else:
                    line += f"{'-':>13}{o_mbs:>11,.1f}{'-':>12}{'-':>12}"
                print(line, flush=True)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        stop_node(node)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``tools/serve_load.py``: a bounded load test of ``tools/serve.py`` on 127.0.0.1. A real server
process (uvicorn) answers concurrent clients that send a mix of good images, bytes that are no
image, uploads over the size limit and images over the pixel limit; every request must get an
answer (200, 4xx, or 503 when the queue is full), the server must still answer afterwards, and its
resident memory before and after is reported with the latency percentiles."""
from __future__ import annotations

import io
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Request kinds, in the order they are mixed (good images most often).
KINDS = ("image", "image", "image", "not_an_image", "too_large_upload", "too_many_pixels")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def payloads(image_side: int = 64, upload_limit_mb: float = 1.0, max_pixels: int = 1_000_000) -> dict[str, bytes]:
    """One request body per kind: a small RGB PNG, random bytes, a valid PNG just over the upload
    limit (uncompressed noise), and a small file that declares more pixels than the limit."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=0)
        return buf.getvalue()
    side = int((upload_limit_mb * 1e6 / 3) ** 0.5) + 16
    huge_side = int(max_pixels ** 0.5) + 64
    return {"image": png(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)),
            "not_an_image": rng.bytes(4096),
            "too_large_upload": png(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)),
            "too_many_pixels": png(np.zeros((huge_side, huge_side), dtype=np.uint8))}


def start_server(source: str | Path, port: int, upload_limit_mb: float, max_pixels: int, max_queue: int,
                 timeout_s: float = 120.0) -> subprocess.Popen:
    """``tools/serve.py`` in its own process, once it answers ``/info``."""
    import httpx
    tool = Path(__file__).resolve().parents[2] / "tools" / "serve.py"
    proc = subprocess.Popen([sys.executable, str(tool), str(source), "--port", str(port), "--max-upload-mb",
                             str(upload_limit_mb), "--max-megapixels", str(max_pixels / 1e6), "--max-queue",
                             str(max_queue)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tools/serve.py exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/info", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"tools/serve.py did not answer on port {port} within {timeout_s:.0f} s")


def load_test(source: str | Path, clients: int = 8, requests: int = 200, upload_limit_mb: float = 1.0,
              max_pixels: int = 1_000_000, max_queue: int = 4, progress=None) -> dict:
    """Run the load test and return its report (status counts per kind, latency percentiles in
    milliseconds, server memory before and after, whether it still answers)."""
    import httpx
    port = free_port()
    bodies = payloads(upload_limit_mb=upload_limit_mb, max_pixels=max_pixels)
    server = start_server(source, port, upload_limit_mb, max_pixels, max_queue)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=120) as warm:  # the first request pays for lazy imports
            warm.post(f"{url}/predict", files={"file": ("warm.png", bodies["image"], "image/png")})
        rss_before = rss_mb(server.pid)

        def one(i: int) -> tuple[str, int, float]:
            kind = KINDS[i % len(KINDS)]
            t0 = time.perf_counter()
            try:
                with httpx.Client(timeout=120) as client:
                    r = client.post(f"{url}/predict", files={"file": (f"{kind}.png", bodies[kind], "image/png")})
                status = r.status_code
            except httpx.HTTPError:
                status = 0  # no answer at all
            if progress:
                progress()
            return kind, status, (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
        alive = httpx.get(f"{url}/info", timeout=10).status_code == 200
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    statuses = {kind: dict(Counter(s for k, s, _ in results if k == kind)) for kind in dict.fromkeys(KINDS)}
    ms = sorted(t for _, _, t in results)
    ok_ms = sorted(t for _, s, t in results if s == 200)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None
    return {"clients": clients, "requests": requests, "wall_s": wall, "statuses": statuses,
            "unanswered": sum(1 for _, s, _ in results if s == 0), "alive_after": alive,
            "latency_ms": {"p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "mean": statistics.fmean(ms)},
            "latency_ms_200": {"p50": pct(ok_ms, 0.5), "p99": pct(ok_ms, 0.99)},
            "rss_mb": {"before": rss_before, "after": rss_after, "growth": rss_after - rss_before},
            "limits": {"upload_mb": upload_limit_mb, "max_pixels": max_pixels, "max_queue": max_queue}}


def format_report(r: dict) -> str:
    lines = [f"{r['requests']} requests from {r['clients']} concurrent clients in {r['wall_s']:.1f} s "
             f"(upload limit {r['limits']['upload_mb']:g} MB, {r['limits']['max_pixels'] / 1e6:g} megapixels, "
             f"queue {r['limits']['max_queue']})", "", f"{'request':<18}statuses", "-" * 40]
    for kind, counts in r["statuses"].items():
        lines.append(f"{kind:<18}" + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    l, l200, m = r["latency_ms"], r["latency_ms_200"], r["rss_mb"]
    lines += ["", f"latency, all requests: p50 {l['p50']:.0f} ms, p99 {l['p99']:.0f} ms"
              + (f"; answered 200: p50 {l200['p50']:.0f} ms, p99 {l200['p99']:.0f} ms" if l200["p50"] else ""),
              f"server memory: {m['before']:.0f} MB -> {m['after']:.0f} MB ({m['growth']:+.0f} MB)",
              f"unanswered: {r['unanswered']}; server answers afterwards: {'yes' if r['alive_after'] else 'NO'}"]
    return "\n".join(lines)

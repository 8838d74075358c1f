"""Subject extraction throughput against a loopback OpenAI-compatible server that answers each
request after 200 ms: 1,000 captions through the real ``openai`` client, then the same 1,000 again.

Goals: the first run in <= 10 s (so requests really overlap: one at a time would take 200 s), the
second run 0 requests (every answer comes from the SQLite cache).

    python benchmarks/subjects_throughput.py
    python benchmarks/subjects_throughput.py --captions 200 --concurrency 16 --rate 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from loopback_openai import LoopbackOpenAI  # noqa: E402

from safe_jax.text.subjects import SubjectExtractor  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=1000)
    p.add_argument("--latency", type=float, default=0.2, help="server seconds per answer")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=250.0, help="requests/s limit; 0: none")
    args = p.parse_args()

    captions = [f"Protesters gather outside city hall number {i} in Rome." for i in range(args.captions)]
    with tempfile.TemporaryDirectory() as tmp, LoopbackOpenAI(delay=args.latency) as srv:
        def run():
            ex = SubjectExtractor(backend="openai", api_key="sk-benchmark-key", base_url=srv.base_url,
                                  cache_path=Path(tmp) / "cache.sqlite", concurrency=args.concurrency,
                                  rate=args.rate or None, progress=False)
            before = srv.count
            t0 = time.perf_counter()
            results, report = ex.run(captions)
            return time.perf_counter() - t0, srv.count - before, report

        first_s, first_requests, report = run()
        assert report.ok == args.captions, report
        print(f"first run: {args.captions} captions in {first_s:.2f} s ({args.captions / first_s:.0f} captions/s), "
              f"{first_requests} requests, max {srv.max_active} in flight "
              f"(concurrency {args.concurrency}, rate {args.rate or 'unlimited'}/s, {args.latency * 1000:.0f} ms per answer)"
              f"  goal <= 10 s: {'ok' if first_s <= 10 else 'MISSED'}")
        second_s, second_requests, report = run()
        print(f"second run: {second_requests} requests, {report.cache_hits} cache hits, {second_s:.2f} s"
              f"  goal 0 requests: {'ok' if second_requests == 0 else 'MISSED'}")
    return 0 if first_s <= 10 and second_requests == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

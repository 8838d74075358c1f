"""safe-jax subjects: the key visual subjects of news captions, by an LLM or offline heuristics.

Reads JSONL (one {"id", "caption"} a line) and writes JSONL (one {"id", "subjects"} a line, plus
"error" for a caption that got no answer). --manual-dir DIR reads an ANCHOR manual directory's
records instead (anchor.jsonl or anchor.csv) and writes DIR/subjects.jsonl for those without
subjects: the step before `tfds build`, which computes no subjects itself. The API key comes from
OPENAI_API_KEY only (never a flag, so it stays out of shell history and process lists);
OPENAI_BASE_URL or --base-url points at any OpenAI-compatible server. Exit code 0: all captions
answered; 1: some failed (their lines carry "error"; a re-run retries only them); 2: bad input or
an endpoint that cannot serve the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from launch.cli_errors import ArgumentParser, float_in, int_at_least, one_line_errors, output_file

DEMO_CAPTIONS = [
    "London's mayor Boris Johnson gives a big thumbs up to photographers during the unveiling of the "
    "2012 Olympic rings on Tower Bridge.",
    "Firefighters at a flooded street in Leeds.",
    "Police officers detain a protester outside the Houses of Parliament in London on Tuesday.",
    "German Chancellor Angela Merkel and French President Emmanuel Macron attend a press conference at "
    "the Elysee Palace in Paris.",
]


def main(argv: list[str] | None = None, prog: str = "safe-jax subjects") -> int:
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", metavar="PATH", help="input JSONL ('-' for stdin)")
    p.add_argument("--out", metavar="PATH", help="output JSONL ('-' for stdout), written atomically")
    p.add_argument("--manual-dir", metavar="DIR", help="an ANCHOR manual directory instead of --in: its records "
                                                       "without subjects (--out default: DIR/subjects.jsonl)")
    p.add_argument("--demo", action="store_true", help="print subjects of a few built-in captions and exit")
    p.add_argument("--backend", choices=("auto", "openai", "offline"), default="auto",
                   help="auto: openai when OPENAI_API_KEY is set, else offline (default)")
    p.add_argument("--model", help="default: gpt-4o-mini for openai")
    p.add_argument("--base-url", help="an OpenAI-compatible endpoint (default: OPENAI_BASE_URL, else OpenAI)")
    p.add_argument("--batch-api", action="store_true", help="use the Batch API (cheaper, up to 24 h)")
    p.add_argument("--cache", type=Path, help="SQLite answer cache (default: $XDG_CACHE_HOME/safe_jax/subjects.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--concurrency", type=int_at_least(1), default=16, help="requests in flight at most (default 16)")
    p.add_argument("--rate", type=float_in(0.0), default=10.0, help="requests started per second at most; 0: no limit (default 10)")
    p.add_argument("--max-retries", type=int_at_least(0), default=6, help="retries per caption on 429/5xx/timeouts (default 6)")
    p.add_argument("--timeout", type=float_in(0.0, low_open=True), default=60.0, help="seconds per request (default 60)")
    p.add_argument("--poll-interval", type=float_in(0.0, low_open=True), default=30.0, help="seconds between Batch API polls (default 30)")
    p.add_argument("--max-subjects", type=int_at_least(1), default=6)
    p.add_argument("--response-format", choices=("json_schema", "json_object", "none"), default="json_schema",
                   help="json_object/none for servers without JSON-schema support")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log retries and failures")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.manual_dir and args.inp:
        p.error("--in and --manual-dir exclude each other")
    if not args.demo and not args.manual_dir and (not args.inp or not args.out):
        p.error("--in and --out are required (or --manual-dir, or --demo)")
    if args.out and args.out != "-":
        try:
            output_file(args.out)
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --out: {e}")

    @one_line_errors(prog)
    def run() -> int:
        from safe_jax.text.subjects import SubjectExtractor
        from safe_jax.text.subjects.jsonl import read_records, write_results

        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format=f"{prog}: %(levelname)s: %(message)s")
        if args.demo:
            extractor = SubjectExtractor(backend="offline", max_subjects=args.max_subjects)
            for r in extractor.run(DEMO_CAPTIONS).results:
                print(json.dumps({"caption": r.caption, "subjects": r.subjects}, ensure_ascii=False))
            return 0
        if args.manual_dir:
            records, args.out = _manual_dir_records(args.manual_dir, args.out)
        else:
            records = read_records(args.inp)
        extractor = SubjectExtractor(
            backend=args.backend, model=args.model, base_url=args.base_url, cache_path=args.cache,
            use_cache=not args.no_cache, batch_api=args.batch_api, concurrency=args.concurrency,
            rate=args.rate or None, max_retries=args.max_retries, timeout=args.timeout,
            poll_interval=args.poll_interval, max_subjects=args.max_subjects,
            response_format=args.response_format, progress=False if args.quiet else None)
        results, report = extractor.run(records)
        n = write_results(args.out, results)
        print(f"{report}; wrote {n} lines to {args.out}", file=sys.stderr)
        return 1 if report.failures else 0

    return run()


def _manual_dir_records(manual_dir: str, out: str | None) -> tuple[list, str]:
    """(records of an ANCHOR manual directory without subjects, output path: DIR/subjects.jsonl
    unless ``out``). Read as the build reads them: same tolerance of bad lines, same
    whitespace-normalised captions, so every subject is a span of the caption the dataset stores."""
    from safe_jax.errors import SafeJaxError
    from safe_jax.text.subjects import Record
    from tfds_anchor.anchor import manual
    from tfds_anchor.anchor.build_report import BuildReport

    try:
        records = manual.read_records(manual_dir, BuildReport(config="subjects"))
    except (FileNotFoundError, ValueError) as e:  # ValueError: LayoutError (a bad anchor.toml, a missing column)
        raise SafeJaxError(str(e)) from None
    return ([Record(r.id, r.caption) for r in records if r.subjects is None],
            out or str(Path(manual_dir) / manual.SUBJECTS_NAME))


if __name__ == "__main__":
    sys.exit(main())

"""``pscnn bench``: throughput-scaling experiments (filled in by the benchmark work)."""


def add_bench_parsers(parser) -> None:
    parser.add_subparsers(dest="bench", metavar="BENCH", required=True)


def run_bench_from_args(args) -> int:
    raise SystemExit(f"pscnn bench {args.bench}: not available")

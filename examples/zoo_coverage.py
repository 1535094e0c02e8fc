"""Coverage of the vision zoo: sparsify one small model per family (random weights) and check it (`zoo_harness.py`).

Each model runs in its own process (a hang or crash there cannot stop the run). Writes a JSON line per model and the
table docs/zoo.md. Outcomes: works (with its MACs ratio), refused (the reason), and the three that must never
happen — wrong (masked != pruned or keep-all != original), crash (a non-tokenprune exception), costlier.

    python examples/zoo_coverage.py --jobs 2        # the whole zoo, ~30-60 min with one job on 2 CPU cores
    python examples/zoo_coverage.py --only cait,eva02 --no-write
    python examples/zoo_coverage.py --only resmlp --update   # re-check some; the table keeps the others' logged rows
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(entry, flops, queue, build):
    import torch
    from zoo_harness import check_model  # this folder: the script's own directory is on sys.path

    torch.set_num_threads(1)
    queue.put(check_model(entry, flops=flops, build=build).to_dict())


def _run(entry, timeout: float, flops: bool, build=None) -> dict:
    """`check_model(entry)` in a process of its own (a hang or crash there is an outcome); `build` as there."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(entry, flops, queue, build))
    start = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {
            "family": entry.family,
            "name": entry.name,
            "library": entry.library,
            "outcome": "timeout",
            "reason": f"no result within {timeout:.0f} s",
            "seconds": time.perf_counter() - start,
        }
    if queue.empty():
        return {
            "family": entry.family,
            "name": entry.name,
            "library": entry.library,
            "outcome": "crash",
            "reason": f"worker died (exit code {proc.exitcode})",
            "seconds": time.perf_counter() - start,
        }
    return queue.get()


def _table(rows: list[dict]) -> str:
    counts = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = [
        "# Zoo coverage",
        "",
        "One small model per family, random weights (all-zero weights filled), `tokenprune.sparsify(model, 0.7)`;",
        "then, independently of the self-check inside `sparsify`: masked vs pruned execution for the same decisions,",
        "keep-all vs the original (both also with every layer scale at 1), gradients to every predictor, and fvcore",
        "multiply-adds of the eval model vs the dense one.",
        "Made by `python examples/zoo_coverage.py` (timm and torchvision versions in the header below).",
        "",
        "Summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)}).",
        "",
        "| family | model | library | outcome | kind | MACs sparse/dense | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['macs_ratio']:.3f}" if r.get("macs_ratio") else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        if len(reason) > 300:
            reason = reason[:297] + "..."
        lines.append(
            f"| {r['family']} | `{r['name']}` | {r['library']} | {r['outcome']} | {r.get('kind', '')} | "
            f"{ratio} | {reason} |"
        )
    return "\n".join(lines) + "\n"


def _latest_rows(zoo: list, jsonl: Path) -> list[dict] | None:
    """The latest logged row of every zoo model, in the zoo's order; None when one has none."""
    latest = {}
    for line in jsonl.read_text().splitlines():
        row = json.loads(line)
        latest[(row["family"], row["name"], row["library"])] = row
    rows = [latest.get((e.family, e.name, e.library)) for e in zoo]
    return None if any(r is None for r in rows) else rows


def select(entries: list, only: str | None) -> list:
    """The entries whose family or model name is in the comma-separated `only` (all of them without it)."""
    if not only:
        return list(entries)
    wanted = set(only.split(","))
    return [e for e in entries if e.family in wanted or e.name in wanted]


def check_entries(entries: list, jsonl: Path, *, jobs: int, timeout: float, flops: bool = True, build=None) -> list:
    """Check each entry in a process of its own, `jobs` at a time; append each row to `jsonl` and print a line, in
    the entries' order whatever finishes first. Returns the rows."""
    rows = []
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "a") as log, ThreadPoolExecutor(max(1, jobs)) as pool:
        runs = [pool.submit(_run, entry, timeout, flops, build) for entry in entries]
        for entry, run in zip(entries, runs):
            row = run.result()
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            ratio = f"macs {row['macs_ratio']:.3f}" if row.get("macs_ratio") else ""
            label = entry.name if entry.family == entry.name else f"{entry.family:<32} {entry.name}"
            print(f"{row['outcome']:>9}  {label:<72} {ratio:<11} {row.get('reason', '')[:160]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from zoo_harness import ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated families or model names")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--no-flops", action="store_true", help="skip the fvcore MACs comparison")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/zoo.md")
    parser.add_argument("--jsonl", default=str(ROOT / "runs" / "zoo.jsonl"))
    parser.add_argument("--jobs", type=int, default=1, help="models checked at once (one process and thread each)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="write docs/zoo.md for the whole zoo: the models checked now, the others' latest rows in --jsonl",
    )
    args = parser.parse_args(argv)
    entries = select(ZOO, args.only)
    rows = check_entries(entries, Path(args.jsonl), jobs=args.jobs, timeout=args.timeout, flops=not args.no_flops)
    if args.update:
        rows = _latest_rows(ZOO, Path(args.jsonl))
        if rows is None:
            print(f"--update: some zoo models have no row in {args.jsonl}; run the whole zoo once", file=sys.stderr)
            return 2
    if not args.no_write:
        import timm
        import torch
        import torchvision

        header = f"\n_timm {timm.__version__}, torchvision {torchvision.__version__}, torch {torch.__version__}._\n"
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "zoo.md").write_text(_table(rows) + header)
    bad = [r for r in rows if r["outcome"] in ("wrong", "crash", "costlier", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

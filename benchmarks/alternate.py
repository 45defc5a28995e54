"""Run ``bench_e2e.py`` several times, alternating versions of the code, and compare.

One run of the end-to-end benchmark moves by 10-20 % on a shared two-core machine, so a
change to a hot path is judged on rounds run back to back, each variant once per round,
and on the ratios within a round. A variant is a checkout of siterecovery (``NAME=DIR``:
``git worktree add /tmp/before HEAD~1`` makes one); every variant runs *this* checkout's
``bench_e2e.py`` with the variant's code first on ``PYTHONPATH`` (the agent's process
inherits it), so the yardstick is the same and only the code measured differs.

For each step run: siterecovery's seconds and CPU seconds, its ratio to restic (and
borg's seconds) in the same run, the vault's bytes after the initial copy against
restic's repository, and the agent's CPU seconds per cycle; per variant the medians, and
with two or more variants each one's per-round ratio to the first.

Run: ``.venv/bin/python benchmarks/alternate.py --rounds 4 --variant before=/tmp/before
--variant after=. -- --size-mib 512 --no-rsync --steps initial``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench_e2e.py"


def variant(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR")
    root = Path(path).resolve()
    if not (root / "vault").is_dir() or not (root / "mobility").is_dir():
        raise argparse.ArgumentTypeError(f"{root} is not a siterecovery checkout "
                                         "(no vault/ and mobility/ in it)")
    return name, root


def run_once(root: Path, bench_args: Sequence[str], out: Path) -> dict[str, Any]:
    """One run of the benchmark on the code in ``root``; its JSON document."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, str(BENCH), *bench_args, "--json-out", str(out)]
    r = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, check=False)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"bench_e2e.py failed on {root} (exit {r.returncode}):\n{tail}")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def facts(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per step: the figures compared across variants."""
    out: dict[str, dict[str, float]] = {}
    for step, tools in doc["seconds"].items():
        if "siterecovery" not in tools:
            continue
        f = {"s": tools["siterecovery"], "cpu_s": doc["cpu"][step].get("siterecovery", 0.0)}
        if "restic" in tools:
            f["x_restic"] = tools["siterecovery"] / tools["restic"]
        if "borg" in tools:
            f["borg_s"] = tools["borg"]
        out[step] = f
    repo = doc.get("repo_after_initial", {})
    if "initial" in out and "siterecovery" in repo and repo.get("restic"):
        out["initial"]["vault_bytes"] = repo["siterecovery"]
        out["initial"]["vault_x_restic"] = repo["siterecovery"] / repo["restic"]
    cycles = doc.get("siterecovery", {}).get("cycles", [])
    for step, cycle in zip(("initial", "incremental"), cycles, strict=False):
        if step in out and cycle.get("agent_cpu_s") is not None:
            out[step]["agent_cpu_s"] = cycle["agent_cpu_s"]
    return out


COLUMNS = ("s", "x_restic", "cpu_s", "agent_cpu_s", "borg_s", "vault_bytes", "vault_x_restic")


def _fmt(key: str, v: float) -> str:
    if key == "vault_bytes":
        return f"{v / 1e6:.2f}M"
    return f"{v:.3f}" if key.endswith("x_restic") else f"{v:.2f}"


def render(names: list[str], runs: dict[str, list[dict[str, dict[str, float]]]]) -> str:
    lines: list[str] = []
    steps = [s for s in runs[names[0]][0]] if runs[names[0]] else []
    for step in steps:
        keys = [k for k in COLUMNS if k in runs[names[0]][0][step]]
        lines.append(f"{step}: " + ", ".join(keys) + " (each round; median)")
        for name in names:
            for k in keys:
                vals = [r[step][k] for r in runs[name] if k in r.get(step, {})]
                if vals:
                    lines.append(f"  {name:10s} {k:15s} " + " ".join(_fmt(k, v) for v in vals)
                                 + f"   median {_fmt(k, statistics.median(vals))}")
        for name in names[1:]:
            for k in ("s", "cpu_s", "agent_cpu_s"):
                pairs = [b[step][k] / a[step][k]
                         for a, b in zip(runs[names[0]], runs[name], strict=True)
                         if k in a.get(step, {}) and k in b.get(step, {}) and a[step][k]]
                if pairs:
                    lines.append(f"  {name}/{names[0]} {k}: "
                                 + " ".join(f"{p:.2f}" for p in pairs)
                                 + f"   median {statistics.median(pairs):.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                 epilog="Arguments after -- go to bench_e2e.py (every run "
                                        "gets its own --json-out).")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--variant", type=variant, action="append", metavar="NAME=DIR",
                    help="a checkout to measure, in round order (repeatable; default: "
                         "this one, as 'this')")
    ap.add_argument("--json-out", metavar="FILE",
                    help="also write every run's figures and the arguments to FILE")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if "--json-out" in bench_args:
        ap.error("bench_e2e.py's --json-out is set per run; leave it out after --")
    variants: list[tuple[str, Path]] = args.variant or [("this", HERE.parent)]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        ap.error("--variant names must differ")
    runs: dict[str, list[dict[str, dict[str, float]]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="alternate-") as tmp:
        for r in range(1, args.rounds + 1):
            for name, root in variants:
                print(f"alternate: round {r}/{args.rounds}: {name} ({root})", file=sys.stderr,
                      flush=True)
                doc = run_once(root, bench_args, Path(tmp) / f"{name}-{r}.json")
                runs[name].append(facts(doc))
    print(render(names, runs))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"bench_args": bench_args, "rounds": args.rounds,
             "variants": {n: str(p) for n, p in variants}, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

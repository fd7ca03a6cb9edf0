#!/usr/bin/env python3
"""Repeats the sparse MLA sweep in separate processes and summarizes it per cell.

A single sweep moves with the card's power state and, at H = 128, with a
per-process mode (docs/performance.md), so a comparison with FlashMLA's
figures takes several processes. This runs `dsa bench --sweep-sparse-mla
--json` N times (or reads saved outputs) and prints, per (H, s_kv) cell: the
median over the sweeps of each sweep's median and of each sweep's mean, their
range, the SM clock, FlashMLA's figure and the ratios, and whether every cell
is at or under FlashMLA's figure by both.

  scripts/sweep-stats.py --runs 8 -- --protocol flashmla    # 8 processes, FlashMLA's timing protocol
  scripts/sweep-stats.py --runs 8 --save runs.jsonl          # keep the raw outputs (one JSON per line)
  scripts/sweep-stats.py --from runs.jsonl                   # summarize saved outputs

Exit status: 0 when the summary was printed, 2 when a sweep failed or an
input could not be read.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def default_dsa():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for build in ("build", "build-dev"):
        path = os.path.join(root, build, "tools", "dsa", "dsa")
        if os.path.exists(path):
            return path
    return os.path.join(root, "build", "tools", "dsa", "dsa")


def parse_sweeps(text, where):
    """Every JSON object in `text` (JSON Lines or objects one after another)."""
    decoder = json.JSONDecoder()
    sweeps, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return sweeps
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a sweep's JSON output at character {e.pos}: {e.msg}")
        if not isinstance(obj, dict) or "rows" not in obj:
            raise ValueError(f"{where}: a JSON value without 'rows' is not a sweep's output")
        sweeps.append(obj)


def summarize(sweeps):
    if not sweeps:
        raise ValueError("no sweeps to summarize")
    protocols = sorted({s.get("protocol", "sustained") for s in sweeps})
    devices = sorted({s.get("device", "?") for s in sweeps})
    cells = {}
    for s in sweeps:
        for r in s["rows"]:
            cells.setdefault((r["num_heads"], r["s_kv"]), []).append(r)
    out = [
        f"{len(sweeps)} sweeps on {', '.join(devices)}; protocol {', '.join(protocols)}",
        "| H | s_kv | ms (median of medians) | range of medians | mean (median of means) | timed runs | SM MHz median (range) "
        "| FlashMLA ms | FlashMLA / ours (medians) | FlashMLA / ours (means) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_under = True
    for (h, s_kv) in sorted(cells, key=lambda k: (-k[0], k[1])):
        rows = cells[(h, s_kv)]
        medians = [r["median_ms"] for r in rows]
        means = [r.get("mean_ms") or r["median_ms"] for r in rows]
        med, mean = statistics.median(medians), statistics.median(means)
        mhz = [r["sm_mhz"] for r in rows if r.get("sm_mhz")]
        clock = f"{statistics.median(mhz):.0f} ({min(mhz):.0f} - {max(mhz):.0f})" if mhz else "-"
        runs = sorted({r.get("runs", 0) for r in rows})
        fm = rows[0].get("flashmla_ms")  # null: no FlashMLA figure for this card / protocol
        under = fm is not None and med <= fm and mean <= fm
        all_under &= under
        figures = f"{fm:.2f} | {fm / med:.3f}x | {fm / mean:.3f}x |" if fm else "- | - | - |"
        out.append(
            f"| {h} | {s_kv} | {med:.3f} | {min(medians):.3f} - {max(medians):.3f} | {mean:.3f} | "
            f"{'/'.join(str(n) for n in runs)} | {clock} | {figures}"
            + ("" if under or not fm else " over")
        )
    out.append(
        "every cell at or under FlashMLA's figure (median of medians and of means): " + ("yes" if all_under else "no")
    )
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8, help="sweep processes to run (default 8)")
    ap.add_argument("--dsa", default=default_dsa(), help="the dsa binary (default: build/tools/dsa/dsa)")
    ap.add_argument("--save", help="also write each sweep's JSON to this file, one per line")
    ap.add_argument("--from", dest="inputs", nargs="+", help="summarize saved outputs instead of running sweeps")
    ap.add_argument("extra", nargs="*", help="after --: more arguments for dsa bench (e.g. --protocol flashmla)")
    a = ap.parse_args()
    sweeps = []
    try:
        if a.inputs:
            for path in a.inputs:
                with open(path) as f:
                    sweeps += parse_sweeps(f.read(), path)
        else:
            if a.runs < 1:
                raise ValueError(f"--runs {a.runs} is invalid: give at least one sweep")
            cmd = [a.dsa, "bench", "--sweep-sparse-mla", "--json"] + a.extra
            for i in range(a.runs):
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    raise ValueError(f"sweep {i + 1} of {a.runs} failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stderr.strip()}")
                sweeps += parse_sweeps(p.stdout, f"sweep {i + 1}")
            if a.save:
                with open(a.save, "w") as f:
                    for s in sweeps:
                        f.write(json.dumps(s) + "\n")
        sys.stdout.write(summarize(sweeps))
    except (OSError, ValueError) as e:
        print(f"sweep-stats: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"sweep-stats: a sweep row lacks the field {e}; give the output of dsa bench --sweep-sparse-mla --json", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

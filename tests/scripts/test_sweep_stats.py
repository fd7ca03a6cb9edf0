#!/usr/bin/env python3
"""Checks scripts/sweep-stats.py on saved sweep outputs (no GPU needed): the
per-cell medians, ranges, clock and ratios of tests/data/sweep_runs.json
(three sweeps, one pretty-printed and two JSON Lines, one clock missing),
the verdict, and the errors for inputs that are not sweep outputs."""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(here))
script = os.path.join(root, "scripts", "sweep-stats.py")
data = os.path.join(root, "tests", "data")
failures = []


def run(*args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True)


def expect(cond, what):
    if not cond:
        failures.append(what)


p = run("--from", os.path.join(data, "sweep_runs.json"))
expect(p.returncode == 0, f"rc {p.returncode}: {p.stderr}")
lines = p.stdout.splitlines()
expect(lines[:1] == ["3 sweeps on NVIDIA H100 80GB HBM3; protocol flashmla"], f"header: {lines[:1]}")
# H = 128 first; medians 3.6 / 3.7 / 3.5, means 3.7 / 3.65 / 3.6, one sweep without a clock.
expect("| 128 | 8192 | 3.600 | 3.500 - 3.700 | 3.650 | 5/6 | 1625 (1600 - 1650) | 3.88 | 1.078x | 1.063x |" in lines,
       f"H = 128 row missing:\n{p.stdout}")
# H = 64: the medians' median equals FlashMLA's 1.83, the means' (1.84) is over it.
expect("| 64 | 8192 | 1.830 | 1.820 - 1.840 | 1.840 | 10 | 1700 (1690 - 1710) | 1.83 | 1.000x | 0.995x | over" in lines,
       f"H = 64 row missing:\n{p.stdout}")
expect(lines[-1].endswith(": no"), f"verdict: {lines[-1:]}")

p = run("--from", os.path.join(data, "deepseek_v32_config.json"))
expect(p.returncode == 2 and "without 'rows'" in p.stderr, f"config file: rc {p.returncode}, {p.stderr}")
p = run("--from", os.path.join(data, "no_such_file.json"))
expect(p.returncode == 2 and "no_such_file.json" in p.stderr, f"missing file: rc {p.returncode}, {p.stderr}")
p = run("--runs", "0")
expect(p.returncode == 2 and "--runs 0 is invalid" in p.stderr, f"--runs 0: rc {p.returncode}, {p.stderr}")

for f in failures:
    print("FAIL:", f)
print("sweep-stats: " + ("all checks passed" if not failures else f"{len(failures)} checks failed"))
sys.exit(1 if failures else 0)

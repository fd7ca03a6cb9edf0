#!/usr/bin/env python3
"""Checks scripts/plot_bench.py on a saved `dsa bench --backend ref -a
cached=0,504,2040 --new 8 --num-heads 64 --iters 3 --json` (tests/data/bench_cached_axis.json,
no GPU needed): the table's numbers in ms and as shares, stdin input, the PNG
(when matplotlib imports; otherwise the error that names the install), and the
errors for inputs that cannot be plotted."""
import copy
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(here))
script = os.path.join(root, "scripts", "plot_bench.py")
fixture = os.path.join(root, "tests", "data", "bench_cached_axis.json")
failures = []


def run(*args, stdin=None):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, input=stdin)


def expect(cond, what):
    if not cond:
        failures.append(what)


def row(lines, name):
    hits = [l for l in lines if l.startswith(f"| {name} |")]
    return hits[0] if len(hits) == 1 else f"<{len(hits)} rows named {name}>"


with open(fixture) as f:
    records = json.load(f)

# The table in ms: x = cached + new (8, 512, 2048), stages in the layer's order.
p = run(fixture)
expect(p.returncode == 0, f"rc {p.returncode}: {p.stderr}")
lines = p.stdout.splitlines()
expect(lines[:1] == ["dsa bench on CPU (2 threads), reference backend, H = 64, batch 1, new 8, top-k 2048, "
                     "kv cache bf16: per stage against context (max cached + new per request)"],
       f"header: {lines[:1]}")
expect(lines[1:2] == ["| stage (median ms) \\ context | 8 | 512 | 2048 |"], f"column heads: {lines[1:2]}")
expect(row(lines, "indexer_logits") == "| indexer_logits | 12.870 | 7.741 | 16.311 |", row(lines, "indexer_logits"))
expect(row(lines, "sparse_mla") == "| sparse_mla | 7.120 | 19.131 | 59.448 |", row(lines, "sparse_mla"))
expect(row(lines, "layer (ms)") == "| layer (ms) | 144.379 | 154.911 | 208.143 |", row(lines, "layer (ms)"))
stage_rows = [l.split(" | ")[0][2:] for l in lines[3:3 + len(records[0]["stages"])]]
expect(stage_rows == [s["name"] for s in records[0]["stages"]], f"stage order: {stage_rows}")
# The sums and the indexer's share, recomputed here from the fixture.
sums = [sum(s["median_ms"] for s in r["stages"]) for r in records]
indexer = [sum(s["median_ms"] for s in r["stages"] if s["name"].startswith("indexer_") or s["name"] == "topk")
           for r in records]
expect(row(lines, "sum of stages (ms)") == "| sum of stages (ms) | " + " | ".join(f"{v:.3f}" for v in sums) + " |",
       row(lines, "sum of stages (ms)"))
expect(row(lines, "indexer + topk (% of stages)") ==
       "| indexer + topk (% of stages) | " + " | ".join(f"{100 * i / t:.1f}" for i, t in zip(indexer, sums)) + " |",
       row(lines, "indexer + topk (% of stages)"))

# Shares: each stage's percentage of the stages' sum; a record order that is not sorted by x.
p = run("--share", "-", stdin=json.dumps(records[::-1]))
expect(p.returncode == 0, f"--share from stdin: rc {p.returncode}: {p.stderr}")
lines = p.stdout.splitlines()
mla = [next(s["median_ms"] for s in r["stages"] if s["name"] == "sparse_mla") for r in records]
expect(row(lines, "sparse_mla") == "| sparse_mla | " + " | ".join(f"{100 * m / t:.1f}" for m, t in zip(mla, sums)) + " |",
       f"share row: {row(lines, 'sparse_mla')}")
expect(row(lines, "sparse_mla") == "| sparse_mla | 5.1 | 12.2 | 28.9 |", f"share row: {row(lines, 'sparse_mla')}")

with tempfile.TemporaryDirectory() as tmp:
    def write(name, text):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    # The PNG, when matplotlib is there; without it -o fails naming the install.
    png = os.path.join(tmp, "lc.png")
    has_mpl = subprocess.run([sys.executable, "-c", "import matplotlib"], capture_output=True).returncode == 0
    if has_mpl:
        for extra in ([], ["--share"]):
            p = run(fixture, "-o", png, *extra)
            expect(p.returncode == 0 and f"wrote {png}" in p.stdout, f"PNG {extra}: rc {p.returncode}: {p.stderr}")
            with open(png, "rb") as f:
                data = f.read() if os.path.exists(png) else b""
            expect(data[:8] == b"\x89PNG\r\n\x1a\n", f"PNG {extra}: no PNG signature")
            expect(len(data) > 20000, f"PNG {extra}: only {len(data)} bytes")
            if os.path.exists(png):
                os.remove(png)
    else:
        print("skip: the PNG checks (matplotlib is not importable; pip install matplotlib to run them)")
        p = run(fixture, "-o", png)
        expect(p.returncode == 1 and "pip install matplotlib" in p.stderr and "| layer (ms) |" in p.stdout,
               f"-o without matplotlib: rc {p.returncode}, {p.stderr}")

    # Errors: exit 1, naming the file and the problem.
    def expect_error(args, needles, what, stdin=None):
        p = run(*args, stdin=stdin)
        expect(p.returncode == 1 and all(n in p.stderr for n in needles),
               f"{what}: rc {p.returncode}, stderr {p.stderr!r}")

    empty = write("empty.json", "\n")
    expect_error([empty], [empty, "empty"], "empty file")
    broken = write("broken.json", '[{"backend": ')
    expect_error([broken], [broken, "not JSON"], "truncated JSON")
    config = os.path.join(root, "tests", "data", "deepseek_v32_config.json")
    expect_error([config], [config, "not a `dsa bench --json` record", "'stages'"], "a config.json")
    sweep = os.path.join(root, "tests", "data", "sweep_runs.json")
    expect_error([sweep], [sweep, "sparse MLA sweep"], "a sparse MLA sweep output")
    missing = os.path.join(tmp, "no_such_file.json")
    expect_error([missing], [missing, "cannot be read"], "missing file")
    expect_error(["-"], ["stdin", "empty"], "empty stdin", stdin="")

    other = copy.deepcopy(records)
    other[1]["device"] = "NVIDIA H200"
    mixed = write("mixed.json", json.dumps(other))
    expect_error([mixed], ["different devices", "'CPU (2 threads)'", "'NVIDIA H200'"], "mixed devices")
    other = copy.deepcopy(records[:1])
    other[0]["backend"] = "cuda"
    cuda = write("cuda.json", json.dumps(other))
    expect_error([fixture, cuda], ["different backends", fixture, cuda], "mixed backends across files")

    single = write("single.json", json.dumps(records[1]))
    expect_error([single], [single, "single context value (512)", "at least two"], "a single x value")
    expect_error([fixture, fixture], ["two records have context = 8"], "the same points twice")
    other = copy.deepcopy(records)
    other[2]["config"]["hidden_size"] = 4096
    shape = write("shape.json", json.dumps(other))
    expect_error([shape], [shape, "hidden_size"], "a layer configuration off the x axis")

for f in failures:
    print("FAIL:", f)
print("plot_bench: " + ("all checks passed" if not failures else f"{len(failures)} checks failed"))
sys.exit(1 if failures else 0)

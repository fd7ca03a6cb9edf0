#!/usr/bin/env python3
"""Per-stage time of `dsa bench --json` records against one axis (context length by default).

At long context the layer's cost moves from the projections and sparse MLA to
the indexer (its logits grow with the context, top-k with it); this draws that
shift as stacked bars, one per measured point, with the indexer stages in warm
colours, sparse MLA in blue, the rest in greys and the layer's own median as a
line, and prints the same numbers as a table.

  dsa bench -a cached=0,32768,61440,126976 --json > lc.json
  scripts/plot_bench.py lc.json -o lc.png            # ms per stage, PNG and table
  scripts/plot_bench.py lc.json --share -o share.png # each stage's share of the stages' sum
  dsa bench -a batch=1,8,64 --new 1 --cached 32768 --json | scripts/plot_bench.py --x batch

Inputs: files (or stdin with '-' or no file) holding what `dsa bench --json`
prints: a list of records when sweeping axes, one record otherwise; several
files are pooled. The x axis is the one that varies across the records:
context (per record, the largest cached + new over its requests) when the
cached context varies, else whichever of new, batch, num_heads, topk varies;
--x names it explicitly. Needs matplotlib only for -o.

Exit status: 0 when the table (and the PNG) were written, 1 when an input is
not usable or the PNG cannot be drawn.
"""
import argparse
import json
import sys

# The indexer's stages (its projections, quantization, logits and the top-k on
# them): the part whose cost grows with the context.
INDEXER_STAGES = ("indexer_q_proj", "indexer_k_proj", "indexer_weights_proj",
                  "indexer_quant", "indexer_logits", "topk")
SPARSE_MLA = "sparse_mla"

AXES = {
    "context": ("context (max cached + new per request)",
                lambda r: max(q["cached"] + q["new"] for q in r["requests"])),
    "cached": ("cached tokens (max per request)", lambda r: max(q["cached"] for q in r["requests"])),
    "new": ("new tokens (max per request)", lambda r: max(q["new"] for q in r["requests"])),
    "batch": ("requests in the step", lambda r: len(r["requests"])),
    "num_heads": ("attention heads", lambda r: r["config"]["num_heads"]),
    "topk": ("top-k", lambda r: r["config"]["index_topk"]),
}
# The config keys an axis changes: records may differ in these and in nothing else.
AXIS_CONFIG_KEYS = {"num_heads": {"num_heads"}, "topk": {"index_topk"}}


class InputError(Exception):
    pass


def parse_records(text, where):
    """The dsa bench records in one input: a list of records or single records, one after another."""
    if not text.strip():
        raise InputError(f"{where}: empty; expected the output of `dsa bench --json`")
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            break
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                             "expected the output of `dsa bench --json`")
        values.append(value)
    records = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        for item in items:
            n = len(records) + 1
            if isinstance(item, dict) and "rows" in item:
                raise InputError(f"{where}: the sparse MLA sweep's output (--sweep-sparse-mla), not "
                                 "per-stage `dsa bench --json` records; use scripts/sweep-stats.py for it")
            missing = [k for k in ("backend", "device", "config", "requests", "stages", "layer")
                       if not isinstance(item, dict) or k not in item]
            if missing:
                raise InputError(f"{where}: record {n} is not a `dsa bench --json` record "
                                 f"(no {', '.join(repr(k) for k in missing)})")
            try:
                ok = (item["requests"] and all(isinstance(q["cached"], int) and isinstance(q["new"], int)
                                               for q in item["requests"])
                      and all(isinstance(s["name"], str) and isinstance(s["median_ms"], (int, float))
                              for s in item["stages"])
                      and isinstance(item["layer"]["median_ms"], (int, float)))
            except (KeyError, TypeError):
                ok = False
            if not ok:
                raise InputError(f"{where}: record {n} has malformed requests, stages or layer "
                                 "(each request needs cached and new, each stage a name and median_ms)")
            item["_from"] = where
            records.append(item)
    if not records:
        raise InputError(f"{where}: an empty list; `dsa bench --json` ran no combination")
    return records


def pick_axis(records, wanted):
    if wanted:
        return wanted
    varying = [a for a in ("cached", "new", "batch", "num_heads", "topk")
               if len({AXES[a][1](r) for r in records}) > 1]
    if not varying:
        return "context"  # reported as a single x value by the caller
    return "context" if varying[0] == "cached" else varying[0]


def check_comparable(records, axis):
    for key in ("backend", "device"):
        seen = {}
        for r in records:
            seen.setdefault(r[key], r["_from"])
        if len(seen) > 1:
            listed = "; ".join(f"{v!r} in {w}" for v, w in seen.items())
            raise InputError(f"records of different {key}s are mixed ({listed}); "
                             f"plot one {key} at a time")
    allowed = AXIS_CONFIG_KEYS.get(axis, set())
    first = records[0]
    for r in records[1:]:
        differ = sorted(k for k in set(first["config"]) | set(r["config"])
                        if k not in allowed and first["config"].get(k) != r["config"].get(k))
        if differ:
            raise InputError(f"{r['_from']}: a record's layer configuration differs from "
                             f"{first['_from']}'s in {', '.join(differ)}, which is not the x axis "
                             f"({axis}); plot one configuration at a time")


def table_data(records, axis):
    """x values (sorted), the stage names in the layer's order, ms[stage][i], layer ms[i]."""
    by_x = {}
    for r in records:
        x = AXES[axis][1](r)
        if x in by_x:
            other = [a for a in ("cached", "new", "batch", "num_heads", "topk") if a != axis and
                     AXES[a][1](r) != AXES[a][1](by_x[x])]
            why = f"; they differ in {', '.join(other)}" if other else ""
            raise InputError(f"two records have {axis} = {x} ({by_x[x]['_from']} and {r['_from']}){why}; "
                             f"a chart has one x axis: plot one swept axis at a time (the others fixed), "
                             f"or pick the x axis with --x")
        by_x[x] = r
    xs = sorted(by_x)
    if len(xs) < 2:
        raise InputError(f"{records[0]['_from']}: a single {axis} value ({xs[0]}); a plot against "
                         f"{axis} needs at least two (e.g. `dsa bench -a cached=0,32768,61440 --json`)")
    names = []
    for x in xs:
        for s in by_x[x]["stages"]:
            if s["name"] not in names:
                names.append(s["name"])
    ms = {n: [next((s["median_ms"] for s in by_x[x]["stages"] if s["name"] == n), 0.0) for x in xs]
          for n in names}
    layer = [by_x[x]["layer"]["median_ms"] for x in xs]
    return xs, names, ms, layer, by_x


def shape_text(record, axis):
    c, reqs = record["config"], record["requests"]
    parts = []
    if axis != "num_heads":
        parts.append(f"H = {c['num_heads']}")
    if axis != "batch":
        parts.append(f"batch {len(reqs)}")
    if axis not in ("new",):
        news = sorted({q["new"] for q in reqs})
        parts.append("new " + "/".join(str(n) for n in news))
    if axis not in ("context", "cached"):
        cached = sorted({q["cached"] for q in reqs})
        parts.append("cached " + "/".join(str(n) for n in cached))
    if axis != "topk":
        parts.append(f"top-k {c['index_topk']}")
    parts.append(f"kv cache {c.get('kv_cache_dtype', '?')}")
    return ", ".join(parts)


def print_table(xs, names, ms, layer, axis, share, header):
    print(header)
    sums = [sum(ms[n][i] for n in names) for i in range(len(xs))]
    unit = "% of the stages' sum" if share else "median ms"
    print(f"| stage ({unit}) \\ {axis} | " + " | ".join(str(x) for x in xs) + " |")
    print("|---" * (len(xs) + 1) + "|")

    def cells(values):
        if share:
            return " | ".join(f"{100.0 * v / t:.1f}" if t > 0 else "-" for v, t in zip(values, sums))
        return " | ".join(f"{v:.3f}" for v in values)

    for n in names:
        print(f"| {n} | {cells(ms[n])} |")
    print(f"| sum of stages (ms) | " + " | ".join(f"{v:.3f}" for v in sums) + " |")
    print(f"| layer (ms) | " + " | ".join(f"{v:.3f}" for v in layer) + " |")
    idx = [sum(ms[n][i] for n in names if n in INDEXER_STAGES) for i in range(len(xs))]
    print(f"| indexer + topk (% of stages) | " +
          " | ".join(f"{100.0 * v / t:.1f}" if t > 0 else "-" for v, t in zip(idx, sums)) + " |")
    mla = ms.get(SPARSE_MLA, [0.0] * len(xs))
    print(f"| sparse_mla (% of stages) | " +
          " | ".join(f"{100.0 * v / t:.1f}" if t > 0 else "-" for v, t in zip(mla, sums)) + " |")


def stage_colours(names):
    import matplotlib
    warm = matplotlib.colormaps["YlOrRd"]
    grey = matplotlib.colormaps["Greys"]
    indexer = [n for n in names if n in INDEXER_STAGES]
    rest = [n for n in names if n not in INDEXER_STAGES and n != SPARSE_MLA]
    colours = {}
    for i, n in enumerate(indexer):
        colours[n] = warm(0.3 + 0.65 * i / max(1, len(indexer) - 1))
    for i, n in enumerate(rest):
        colours[n] = grey(0.25 + 0.5 * i / max(1, len(rest) - 1))
    colours[SPARSE_MLA] = "#1f5fbf"
    return colours


def plot(path, xs, names, ms, layer, axis, share, title, min_share):
    try:
        import matplotlib
    except ImportError:
        raise InputError("drawing the PNG needs matplotlib, which is not installed: "
                         "pip install matplotlib (the table above needs nothing)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = [sum(ms[n][i] for n in names) for i in range(len(xs))]
    # Stages under min_share of the sum at every point would be slivers with a
    # legend entry each: draw them as one band (the table lists them apart).
    small = [n for n in names if n not in INDEXER_STAGES and n != SPARSE_MLA and
             all(t <= 0 or v / t < min_share for v, t in zip(ms[n], sums))]
    bands = [(n, ms[n]) for n in names if n not in small]
    colours = stage_colours(names)
    if small:
        other = [sum(ms[n][i] for n in small) for i in range(len(xs))]
        first = min(names.index(n) for n in small)
        at = sum(1 for n, _ in bands if names.index(n) < first)
        label = f"other ({len(small)} stages < {100 * min_share:g}%)"
        bands.insert(at, (label, other))
        colours[label] = "#f4f4f4"

    fig, ax = plt.subplots(figsize=(10, 5.8), dpi=120)
    pos = list(range(len(xs)))
    bottom = [0.0] * len(xs)
    bars = []
    for name, values in bands:
        heights = [100.0 * v / t if t > 0 else 0.0 for v, t in zip(values, sums)] if share else values
        bars.append(ax.bar(pos, heights, 0.7, bottom=bottom, label=name, color=colours[name],
                           edgecolor="white" if name in names else "#b0b0b0", linewidth=0.5,
                           hatch=None if name in names else "//"))
        bottom = [b + h for b, h in zip(bottom, heights)]
    if share:
        ax.set_ylabel("share of the stages' sum (%)")
        ax.set_ylim(0, 100)
        total_ax = ax.twinx()
        total_ax.set_ylabel("layer median (ms)")
        total_ax.set_ylim(0, max(layer) * 1.1)
    else:
        ax.set_ylabel("median time (ms)")
        total_ax = ax
    line, = total_ax.plot(pos, layer, color="black", marker="o", linewidth=1.8, linestyle="--" if share else "-",
                          label="layer, measured whole (ms" + (", right axis)" if share else ")"))
    for p, v in zip(pos, layer):
        total_ax.annotate(f"{v:.3g}" if v < 1000 else f"{v:.0f}", (p, v), textcoords="offset points", xytext=(0, 6),
                          ha="center", fontsize=8)
    ax.set_xticks(pos)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(AXES[axis][0])
    ax.set_title(title, fontsize=10)
    if not share:
        ax.set_ylim(0, max(max(layer), max(bottom)) * 1.12)
    # Legend top to bottom as the stack reads, the total line first.
    handles = [line] + bars[::-1]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left",
              bbox_to_anchor=(1.08 if share else 1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("inputs", nargs="*", help="dsa bench --json outputs ('-' or none: stdin)")
    ap.add_argument("--x", choices=sorted(AXES), help="the x axis (default: the one that varies, "
                    "context when the cached tokens vary)")
    ap.add_argument("-o", "--output", help="write the chart to this PNG (needs matplotlib)")
    ap.add_argument("--share", action="store_true",
                    help="plot and tabulate each stage's share of the stages' sum instead of ms")
    ap.add_argument("--min-share", type=float, default=0.01,
                    help="in the chart, stages outside the indexer and sparse MLA under this fraction "
                         "of the sum at every point are drawn as one band (default 0.01; 0 draws all)")
    args = ap.parse_args(argv)
    try:
        records = []
        for path in args.inputs or ["-"]:
            if path == "-":
                records += parse_records(sys.stdin.read(), "stdin")
                continue
            try:
                with open(path) as f:
                    text = f.read()
            except OSError as e:
                raise InputError(f"{path}: cannot be read: {e.strerror}")
            records += parse_records(text, path)
        axis = pick_axis(records, args.x)
        check_comparable(records, axis)
        xs, names, ms, layer, by_x = table_data(records, axis)
        first = by_x[xs[0]]
        header = (f"dsa bench on {first['device']}, {first['backend']} backend, {shape_text(first, axis)}: "
                  f"per stage against {AXES[axis][0]}")
        print_table(xs, names, ms, layer, axis, args.share, header)
        if args.output:
            title = (f"{first['device']}, {first['backend']} backend: per-stage "
                     f"{'share' if args.share else 'time'} against {axis}\n{shape_text(first, axis)}")
            plot(args.output, xs, names, ms, layer, axis, args.share, title, args.min_share)
            print(f"wrote {args.output}")
    except InputError as e:
        print(f"plot_bench: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How O1 and O2 scale with graph size: seconds per node on stacked transformers of 5k to 80k nodes.

A 60-block video DiT or an 80-layer LLM is 10k-40k IR nodes, so a pass that is quadratic in the node count
turns a second into minutes. The graphs: one GPT-2 block (transformers, a small config, eager attention so
the attention fusion has work) captured once through torch.export, then stacked block after block in the
IR until the graph holds the wanted node count; each block gets its own weights (random, so no two blocks'
constants merge). O1 and O2 run with verification off, as a user runs them. Goal (issue 23): the time per
node at 80k within 2x of that at 5k. Each size runs ``--repeats`` times on a fresh copy; the table gives
the median and the min-max spread.

    python benchmarks/ir_scaling.py [--sizes 5000,20000,80000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import graphopt
from graphopt.ir import Graph, Value
from graphopt.pass_manager import PassManager

RESULTS = Path(__file__).parent / "results"


def gpt2_block() -> Graph:
    """One GPT-2 block as an IR graph: hidden states in, hidden states out."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(n_embd=32, n_head=4, n_layer=1, n_positions=64, attn_implementation="eager")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = GPT2Block(config, layer_idx=0)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            out = self.block(hidden)
            return out[0] if isinstance(out, tuple) else out

    torch.manual_seed(0)
    return graphopt.capture(Block().eval(), (torch.randn(2, 16, 32),))


def stacked(block: Graph, nodes: int) -> Graph:
    """``block`` repeated until the graph holds at least ``nodes`` nodes, each copy with fresh weights."""
    g = Graph("stacked")
    x = block.inputs[0]
    current = g.add_input("hidden", x.type)
    copies = max(1, -(-nodes // len(block)))
    for k in range(copies):
        mapping: dict[int, Value] = {id(x): current}
        for v in block.constants.values():
            data = torch.randn_like(v.data) if v.data.is_floating_point() else v.data
            mapping[id(v)] = g.add_constant(data, f"b{k}.{v.name}", v.is_parameter)
        for n in block:
            new = g.add_node(n.op, [None if v is None else mapping[id(v)] for v in n.inputs], dict(n.attrs),
                             output_types=[o.type for o in n.outputs], name=f"b{k}.{n.name}")
            mapping.update((id(o), no) for o, no in zip(n.outputs, new.outputs))
        current = mapping[id(block.outputs[0])]
    g.outputs = [current]
    return g


def time_level(graph: Graph, level: str) -> float:
    manager = PassManager([level], verify=False)
    start = time.perf_counter()
    manager.run(graph)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000,80000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="O1,O2")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = args.levels.split(",")
    block = gpt2_block()
    rows = []
    with tqdm(total=len(sizes) * len(levels) * args.repeats, desc="O1/O2 on stacked GPT-2 blocks", file=sys.stderr) as bar:
        for size in sizes:
            for level in levels:
                seconds = []
                for _ in range(args.repeats):
                    graph = stacked(block, size)
                    nodes = len(graph)
                    seconds.append(time_level(graph, level))
                    bar.update()
                rows.append({"level": level, "nodes": nodes, "median_s": statistics.median(seconds),
                             "min_s": min(seconds), "max_s": max(seconds)})
    base = {r["level"]: r["median_s"] / r["nodes"] for r in rows if r["nodes"] == min(x["nodes"] for x in rows)}
    lines = ["| level | nodes | median s | spread (min-max) s | µs / node | per node ÷ smallest |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per_node = r["median_s"] / r["nodes"]
        r["per_node_ratio"] = per_node / base[r["level"]]
        lines.append(f"| {r['level']} | {r['nodes']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
                     f"{per_node * 1e6:.1f} | {r['per_node_ratio']:.2f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ir_scaling.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "ir_scaling.md").write_text(
        f"# O1 / O2 time against graph size (stacked GPT-2 blocks, {len(block)} nodes each)\n\n"
        f"{args.repeats} runs per cell, verification off; goal: per node at the largest size within 2x of the "
        f"smallest.\n\n{table}\n")


if __name__ == "__main__":
    main()

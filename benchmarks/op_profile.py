"""Where a compiled step spends its time, op by op: a `jax.profiler` trace of a few runs, each
executed XLA instruction's self time attributed to the Python function that emitted it and to
the kind of work it does (no flags here; `benchmarks.train_throughput --profile` uses it).

The attribution reads two things XLA gives us:
  * the trace (`jax.profiler.trace(..., create_perfetto_trace=True)`): one event per executed
    instruction (thunk), named by its HLO instruction in `args.hlo_op`, with its duration. A
    `while` (a `lax.scan`) encloses its body's events, so each event counts its *self* time: its
    duration less that of the events nested in it on the same thread;
  * the compiled module's text (`compiled.as_text()`): each instruction's opcode, the computation
    a fusion calls (its kind: a fusion with a dot is "matmul", with a reduce "reduction", ...), and
    its `stack_frame_id`, which indexes the Python stack that traced it. The innermost frame in
    bmojo_jax (else in optax, else anywhere outside jax and flax) names its *site*, e.g.
    `ops/ssm/xla.py:ssd_chunked`.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable, NamedTuple

import jax

KINDS = ("matmul", "reduction", "layout", "gather/scatter", "elementwise", "loop", "other")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast", "concatenate", "pad",
               "slice", "parameter", "constant", "tuple", "get-tuple-element"}
_GATHER_OPS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}


class Site(NamedTuple):
    """What an instruction is: `site` (the Python function that emitted it, "path:function") and
    `kind` (one of KINDS)."""
    site: str
    kind: str


def _kind(opcodes: set) -> str:
    """The kind of work of an instruction (or of the fused computation) made of `opcodes`."""
    if opcodes & {"dot", "convolution"}:
        return "matmul"
    if opcodes & {"reduce", "reduce-window"}:
        return "reduction"
    if opcodes & {"while", "conditional", "call"}:
        return "loop"
    if opcodes & _GATHER_OPS:
        return "gather/scatter"
    if opcodes <= _LAYOUT_OPS:
        return "layout"
    return "elementwise"


def _stack_frames(text: str) -> dict:
    """stack_frame_id -> [(file, function), ...], innermost first, from the module's tables
    (FileNames, FunctionNames, FileLocations, StackFrames at the top of the text; a frame's
    printed parent_frame_id is its parent's id + 1, 0 at the root)."""
    tables, current = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        match = re.match(r"^(\d+) (.*)$", line)
        if current is None or not match:
            current = None
            continue
        current[int(match.group(1))] = match.group(2)
    if "StackFrames" not in tables:
        return {}

    def field(entry, name):
        return int(re.search(fr"{name}=(\d+)", entry).group(1))

    frames = {}
    for frame_id in tables["StackFrames"]:
        chain, current_id = [], frame_id
        while current_id in tables["StackFrames"] and len(chain) < 256:
            entry = tables["StackFrames"][current_id]
            location = tables["FileLocations"][field(entry, "file_location_id")]
            chain.append((tables["FileNames"][field(location, "file_name_id")].strip('"'),
                          tables["FunctionNames"][field(location, "function_name_id")].strip('"')))
            current_id = field(entry, "parent_frame_id") - 1
        frames[frame_id] = chain
    return frames


def _site_of(chain) -> str:
    """The innermost frame in bmojo_jax as path:function ("ops/ssm/xla.py:ssd"), else "optax"
    (the optimizer update), else the innermost frame outside jax and flax, as file:function."""
    for path, function in chain:
        if "/bmojo_jax/" in path:
            return f"{path.split('/bmojo_jax/', 1)[1]}:{function.replace('<locals>.', '')}"
    if any("/optax/" in path for path, _ in chain):
        return "optax (optimizer update)"
    for path, function in chain:
        if not re.search(r"/(jax|jaxlib|flax)/", path):
            return f"{os.path.basename(path)}:{function}"
    return "(jax internals)"


def instruction_sites(compiled) -> dict:
    """HLO instruction name -> `Site`, for every instruction of `compiled`
    (a `jax.stages.Compiled`)."""
    text = compiled.as_text()
    chains = _stack_frames(text)
    opcodes, computation = collections.defaultdict(set), None
    instructions = {}
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        opcodes[computation].add(opcode)
        calls = _CALLS.search(line)
        frame = _FRAME.search(line)
        instructions[name] = (opcode, calls.group(1) if calls else None,
                              int(frame.group(1)) if frame else None)
    sites = {}
    for name, (opcode, calls, frame) in instructions.items():
        kind = _kind(opcodes[calls]) if opcode == "fusion" and calls else _kind({opcode})
        sites[name] = Site(_site_of(chains.get(frame, [])), kind)
    return sites


def traced_self_seconds(run: Callable[[], object], runs: int) -> dict:
    """HLO instruction name -> self seconds per call of `run`, averaged over `runs` traced calls."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(runs):
                run()
        (path,) = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True)
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_thread = collections.defaultdict(list)
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        if event.get("ph") == "X" and op and event.get("dur") is not None:
            by_thread[event["tid"]].append((float(event["ts"]), float(event["dur"]), op))
    totals = collections.Counter()
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e[0], -e[1]))
        stack = []  # [end, op, self] of the enclosing events
        for start, duration, op in thread_events:
            while stack and stack[-1][0] <= start:
                _, name, own = stack.pop()
                totals[name] += own
            if stack:
                stack[-1][2] -= duration
            stack.append([start + duration, op, duration])
        for _, name, own in stack:
            totals[name] += own
    return {op: microseconds * 1e-6 / runs for op, microseconds in totals.items()}


def profile(compiled, run: Callable[[], object], runs: int = 2, top: int = 15) -> dict:
    """The time of `run` (which calls `compiled` once) by site and kind.

    Returns a dict: `rows`, [{site, kind, seconds, share}] for the `top` (site, kind) pairs by
    self seconds per run, then one "(other)" row; `by_kind`, {kind: share}; `op_seconds`, the sum
    of all instructions' self seconds per run (over the threads: it can exceed the wall time when
    XLA runs instructions side by side).
    """
    sites = instruction_sites(compiled)
    seconds = traced_self_seconds(run, runs)
    grouped, by_kind = collections.Counter(), collections.Counter()
    for op, value in seconds.items():
        site = sites.get(op, Site("(unattributed: " + op.split(".")[0] + ")", "other"))
        grouped[site] += value
        by_kind[site.kind] += value
    total = sum(grouped.values()) or float("nan")
    rows = [dict(site=s.site, kind=s.kind, seconds=v, share=v / total)
            for s, v in grouped.most_common(top)]
    rest = total - sum(r["seconds"] for r in rows)
    if len(grouped) > top:
        rows.append(dict(site="(other)", kind="", seconds=rest, share=rest / total))
    return dict(rows=rows, op_seconds=total,
                by_kind={kind: by_kind[kind] / total for kind in KINDS if by_kind[kind]})

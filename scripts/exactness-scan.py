#!/usr/bin/env python3
"""Exact rows must be exact: scans the verify-decoder JSON reports in a folder
(verify-*.json, model-*.json, hw-*.json: single runs, sweeps and --model runs) and fails
when an exact row's analytic and measured values differ, or when a report has no exact row
the scan can read (a report it cannot read proves nothing). A pass within the tolerance is
not enough for these rows. The liveness peak passes within the tolerance; how many peaks
are exact is printed as evidence, not a gate.

Usage: exactness-scan.py FOLDER    (scripts/device-check runs it on its results)
Exit status: 0 all exact, 1 an inexact row, an unreadable report or no report at all,
2 a wrong argument.
"""
import glob, json, os, sys
args = sys.argv[1:]
if args in (["-h"], ["--help"]):
    print(__doc__.strip())
    sys.exit(0)
if len(args) != 1 or not os.path.isdir(args[0]):
    shown = " ".join(args) if args else "(none)"
    print(f"exactness-scan: FOLDER = {shown} is invalid: expected one existing folder of verify-decoder JSON reports (see --help)", file=sys.stderr)
    sys.exit(2)
folder = args[0]
EXACT = {"matmul_flops", "elementwise_flops", "tensor_core_flops", "cuda_core_flops", "weight_bytes", "kv_cache_bytes", "io_bytes", "activation_bytes"}
rows = inexact = 0
# The liveness peak passes within the tolerance; how many are exact is evidence, not a gate.
peaks = peak_exact = 0
def row_groups(report):
    """(where, attention kernels, rows) of every group of metric rows in a report: the
    layers of a single run or of each sweep case (modelmeter.verify/1, verify-sweep/1); in a
    --model report (verify-model/1) each call's stack rows and the parts it kept (a call
    judged exact keeps none), each phase's rows and its groups'."""
    model = report.get("model")
    if model is None:
        for case in report.get("cases", [report]):
            for layer in case.get("layers", []):
                yield f"case {case.get('index', '-')} {layer['name']}", layer.get("attention_kernels", []), layer.get("metrics", [])
        return
    for call in model.get("calls", []):
        label = f"{call['phase']} C={call.get('context_len', '-')}"
        yield f"{label} stack", [], call.get("metrics", [])
        for layer in call.get("layers", []):
            yield f"{label} {layer['name']}", layer.get("attention_kernels", []), layer.get("metrics", [])
    for phase in model.get("phases", []):
        yield f"phase {phase['phase']}", [], phase.get("metrics", [])
        for group in phase.get("groups", []):
            yield f"phase {phase['phase']} {group['name']}", [], group.get("metrics", [])
empty = []
paths = sorted(glob.glob(os.path.join(folder, "verify-*.json")) + glob.glob(os.path.join(folder, "model-*.json")) + glob.glob(os.path.join(folder, "hw-*.json")))
for path in paths:
    try:
        with open(path) as f:
            report = json.load(f)
        groups = list(row_groups(report))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # Unreadable, not JSON, or not a verify-decoder report: it proves nothing.
        print(f"UNREADABLE {os.path.basename(path)}: {type(e).__name__}: {e}")
        empty.append(os.path.basename(path))
        continue
    before = rows
    for group, kernels, metrics in groups:
        for m in metrics:
            where = f"{os.path.basename(path)} {group}"
            if m["metric"] in EXACT:
                rows += 1
                if m["analytic"] != m["measured"]:
                    inexact += 1
                    print(f"INEXACT {where} {m['metric']}: analytic {m['analytic']} measured {m['measured']} {kernels}")
            elif m["metric"] == "peak_activation_bytes":
                peaks += 1
                if m["analytic"] == m["measured"]:
                    peak_exact += 1
                else:
                    print(f"PEAK {where}: analytic {m['analytic']} measured {m['measured']} ({m['status']}) {kernels}")
    if rows == before:
        empty.append(os.path.basename(path))
for name in empty:
    print(f"NO EXACT ROWS in {name}: a report the scan cannot read proves nothing")
if not paths:
    print(f"NO REPORTS in {folder} (verify-*.json, model-*.json, hw-*.json): nothing was scanned, which proves nothing")
print(f"peak rows: {peak_exact} of {peaks} exact")
print(f"exact rows: {rows - inexact} of {rows} equal to the FLOP/byte")
sys.exit(1 if inexact or empty or not paths else 0)

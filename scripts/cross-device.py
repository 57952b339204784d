#!/usr/bin/env python3
"""Same seed, two devices, identical counts: compares two verify-decoder --json reports.

usage: cross-device.py A.json B.json

Issue 15 asks for "identical counts on every device": the seeded weights are drawn with
the CPU's values on every device (modelmeter_reference::draws), so the routing, and the
FLOPs that follow from it, must not depend on where the model ran. For every layer in both
reports this compares, measured side only:
  - tokens_per_expert (the routing the weights produced), where the layer reports it;
  - the measured flops, matmul_flops and elementwise_flops rows.
Bytes are not compared: the CUDA caching allocator's blocks and the CPU's tensor bytes are
different quantities by design. The two reports must have run the same config, workload,
dtype and seed (checked; the device is what differs).

Exit 0: identical; 1: a count differs (each difference printed); 2: unreadable input or
reports of different runs.
"""
import json
import sys

COMPARED = ("flops", "matmul_flops", "elementwise_flops")
SAME_RUN = ("dtype", "seed", "attention", "tf32_allowed")


def refuse(message):
    print(f"cross-device: {message}", file=sys.stderr)
    sys.exit(2)


def load(path):
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        refuse(f"{path}: {e}")
    if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
        refuse(f"{path}: not a verify-decoder --json report (no layers list)")
    return report


def main():
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if len(sys.argv) != 3:
        refuse("usage: cross-device.py A.json B.json")
    a, b = (load(p) for p in sys.argv[1:])
    env = (a.get("environment", {}), b.get("environment", {}))
    for key in SAME_RUN:
        if env[0].get(key) != env[1].get(key):
            refuse(f"the reports ran different {key}: {env[0].get(key)!r} and {env[1].get(key)!r}")
    # The workload names its platform (the device's kind): everything else must agree.
    workloads = [{k: v for k, v in r.get("workload", {}).items() if k != "platform"} for r in (a, b)]
    if workloads[0] != workloads[1]:
        refuse(f"the reports ran different workloads: {workloads[0]} and {workloads[1]}")
    # The config's fields, not where it came from: a built-in name and its file are one
    # config.
    configs = [{k: v for k, v in (r.get("config") or {}).items() if k != "name"} for r in (a, b)]
    if configs[0] != configs[1]:
        refuse("the reports ran different configs")
    layers_b = {l.get("name"): l for l in b["layers"]}
    differences, compared = [], 0
    for la in a["layers"]:
        lb = layers_b.get(la.get("name"))
        if lb is None:
            continue
        name = la["name"]
        if "tokens_per_expert" in la or "tokens_per_expert" in lb:
            compared += 1
            if la.get("tokens_per_expert") != lb.get("tokens_per_expert"):
                differences.append(f"{name}: tokens_per_expert {la.get('tokens_per_expert')} vs {lb.get('tokens_per_expert')}")
        rows_b = {r.get("metric"): r for r in lb.get("metrics", [])}
        for row in la.get("metrics", []):
            metric = row.get("metric")
            if metric in COMPARED and metric in rows_b:
                compared += 1
                if row.get("measured") != rows_b[metric].get("measured"):
                    differences.append(f"{name}: measured {metric} {row.get('measured')} vs {rows_b[metric].get('measured')}")
    if compared == 0:
        refuse("no layer and count in common: nothing compared")
    devices = f"{env[0].get('device')} and {env[1].get('device')}"
    for line in differences:
        print(f"cross-device: {line}")
    if differences:
        print(f"cross-device: {len(differences)} of {compared} counts differ between {devices}")
        sys.exit(1)
    print(f"cross-device: {compared} counts identical between {devices} (seed {env[0].get('seed')})")


if __name__ == "__main__":
    main()

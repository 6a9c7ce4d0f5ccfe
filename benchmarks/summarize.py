"""Prints a markdown table of a pytest-benchmark JSON file (the extra_info of each benchmark):
    python benchmarks/summarize.py benchmarks/results/<file>.json
"""

import json
import sys


def main(path):
    data = json.load(open(path))
    rows = [b["extra_info"] | {"name": b["name"]} for b in data["benchmarks"]]
    copy = [r for r in rows if r.get("variant") == "copy"]
    copy_gbps = copy[0]["GBps"] if copy else None
    official = {r["network"]: r["images_per_s"] for r in rows
                if r.get("variant") == "official_style" and "images_per_s" in r}
    devs = sorted({r.get("device", "?") for r in rows})
    dev = ", ".join(devs)
    print(f"device: {dev}" + (f"; copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    print("| benchmark | shape | variant | backend | mode | ms/call | GB/s | % of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms_per_step" in r:  # bench_step.py
            mfu = r.get("mfu_vs_bf16_matmul")
            base = official.get(r["network"])
            speedup = f" {r['images_per_s'] / base:.2f}x official |" if base else ""
            line = (f"| {r['name'].split('[')[0]} | {r['network']} x{r['batch']} | {r['variant']} "
                    f"| {r['images_per_s']:.0f} img/s | {r['ms_per_step']:.1f} ms/step "
                    f"| {r.get('peak_mem_GiB', 0):.2f} GiB peak | {r['tflops']:.1f} TFLOP/s |")
            print(line + (f" MFU {100 * mfu:.1f}% |" if mfu else "") + speedup)
            continue
        if r.get("variant") == "copy" or "ms_per_call" not in r:
            continue
        pct = f"{100 * r['GBps'] / copy_gbps:.0f}%" if copy_gbps and "GBps" in r else ""
        shape = "x".join(map(str, r.get("shape", [])))
        print(f"| {r['name'].split('[')[0]} | {shape} | {r.get('variant')} | {r.get('backend')} "
              f"| {r.get('mode', '')} "
              f"| {r['ms_per_call']:.4f} | {r.get('GBps', 0):.0f} | {pct} |")


if __name__ == "__main__":
    main(sys.argv[1])

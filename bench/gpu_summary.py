"""One table from what bench/gpu.sh wrote under its output folder: the steps' PASS/FAIL, bench/train.py's rows
(tokens/s and peak memory against PEFT), bench/qlora.py's runs and bench/serve.py's medians.

    python bench/gpu_summary.py OUT     # OUT: gpu.sh's $OUT (summary.txt, gpu.txt, *.json, serve.log)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train_rows(out: Path) -> list[str]:
    rows = ["| bench | data | dtype | trainer | real tok/s | × first | peak MiB | × first | roofline | final loss |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("train-*.json")):
        data = json.loads(path.read_text())
        name = path.stem if data.get("complete", True) else f"{path.stem} (cut short)"  # the rows measured before
        for r in data["table"]:
            rows.append(f"| {name} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['tokens_per_s']:.0f} | "
                        f"{r['speedup']:.2f} | {r['peak_mb']:.0f} | {r['memory_ratio']:.2f} | "
                        f"{100 * r['roofline']:.1f}% | {r['final_loss']:.4f} |")
    return rows if len(rows) > 2 else []


def qlora_rows(out: Path) -> list[str]:
    path = out / "qlora.json"
    if not path.is_file():
        return []
    rows = ["| qlora run | tok/s | s/step | peak MiB | loss first → last |", "|---|---|---|---|---|"]
    for r in json.loads(path.read_text())["runs"]:
        rows.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_bytes'] / 2**20:.0f} | "
                    f"{r['first_loss']:.3f} → {r['final_loss']:.3f} |")
    return rows


def serve_rows(out: Path) -> list[str]:
    """bench/serve.py's median table and goals, as it printed them."""
    path = out / "serve.log"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith("| run (median")), None)
    return [] if start is None else [x for x in lines[start:] if x.strip()]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")
    for name in ("gpu.txt", "summary.txt"):
        if (out / name).is_file():
            print((out / name).read_text().rstrip())
    for block in (train_rows(out), qlora_rows(out), serve_rows(out)):
        if block:
            print("\n" + "\n".join(block))


if __name__ == "__main__":
    main()

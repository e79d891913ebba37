"""Benchmark: the same small NIH grid alone and beside a busy neighbour, in one run (issue 27 §1).

The neighbour is a separate process doing 2-thread torch matmuls for as long as the grid runs (started
and stopped here). The grid runs as `ctxaware nih` does, in a subprocess, twice beside the neighbour: with
ctxaware's thread policy (waiting threads sleep: OMP_WAIT_POLICY=PASSIVE) and with OpenMP's spinning
default (OMP_WAIT_POLICY=ACTIVE), so the policy's effect is measured, not assumed. Every run's rows must be
identical (greedy outputs); the ratios to the run alone are printed. Sharing 2 cores fairly gives 2x.

    python benchmarks/shared_cpu.py                 # SmolLM2, 3 lengths x 3 depths, chat+prefix and plain+prefix
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["--lengths", "400,800,1200", "--depths", "0,50,100", "--template", "1", "--max-new-tokens", "16",
        "--haystack", "synthetic", "--modes", "chat,plain", "--prefix", "true"]  # fmt: skip
NEIGHBOUR = """
import torch, time
torch.set_num_threads(2)
a = torch.randn(768, 768)
while True:
    a = (a @ a).tanh()
"""


def grid(out: Path, policy: str) -> tuple[float, list]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ctxaware.cli", "nih", *GRID, "--output", str(out)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    dt = time.perf_counter() - t0
    rows = [json.loads(x) for x in next(out.rglob("rows.jsonl")).read_text().splitlines()]
    key = lambda r: (r["condition"], r["length"], r["depth"])  # noqa: E731
    return dt, sorted((key(r), r["output"]) for r in rows)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ctxaware-shared-cpu-"))
    grid(tmp / "warm", "PASSIVE")  # the GGUF conversion and file caches, outside the timings
    alone, ref = grid(tmp / "alone", "PASSIVE")
    times = {}
    for policy in ("PASSIVE", "ACTIVE"):
        neighbour = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR], env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
        )
        try:
            time.sleep(2)  # the neighbour is busy before the grid starts
            times[policy], rows = grid(tmp / f"beside_{policy.lower()}", policy)
        finally:
            neighbour.kill()
            neighbour.wait()
        assert rows == ref, f"outputs beside the neighbour ({policy}) differ from the run alone"
    print(
        f"cores: {os.cpu_count()}, load before: {os.getloadavg()[0]:.2f}; grid: {len(ref)} tests, outputs identical"
    )
    print(f"alone:                                  {alone:7.1f} s")
    for policy, t in times.items():
        label = "ctxaware policy (PASSIVE)" if policy == "PASSIVE" else "spinning OpenMP default (ACTIVE)"
        print(f"beside a 2-thread neighbour, {label:33s} {t:7.1f} s  ratio {t / alone:.2f}x")


if __name__ == "__main__":
    main()

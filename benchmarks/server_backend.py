"""Benchmark: the same NIH grid through both generation backends, in one run (issue 25 section 3).

``ctxaware nih --backend hf`` (in-process: batched, prefix cache) and ``--backend server`` against
``transformers serve`` on the built-in SmolLM2 (started and stopped here, 127.0.0.1), each as a subprocess
on the same grid. The rows' outputs must be identical (greedy, the same rendered prompts); the wall times
and their ratio are printed. On a CPU the in-process engine is expected to win (``transformers serve``
answers one request at a time without a shared prefix cache); a serving engine pays off on GPUs with
continuous batching (vLLM, SGLang), which this machine cannot run.

    python benchmarks/server_backend.py        # 2 lengths x 5 depths x chat/plain with the prefix: 20 prompts
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

GRID = ["--lengths", "200,400", "--depths", "0,25,50,75,100", "--modes", "chat,plain", "--prefix", "true",
        "--haystack", "synthetic", "--device", "cpu", "--dtype", "float32", "--no-attention"]  # fmt: skip


def nih(out: Path, *extra: str) -> tuple[float, dict]:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "ctxaware.cli", "nih", *GRID, *extra, "--output", str(out)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    wall = time.time() - t0
    (rows,) = out.glob("*/rows.jsonl")
    data = [json.loads(x) for x in rows.read_text().splitlines()]
    return wall, {(r["condition"], r["length"], r["depth"]): r["output"] for r in data}


def main() -> None:
    from ctxaware.core.models import load_tokenizer

    model_dir = load_tokenizer("default").name_or_path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([shutil.which("transformers"), "serve", model_dir, "--host", "127.0.0.1", "--port",
                               str(port), "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            hf_s, hf = nih(Path(tmp) / "hf")
            sv_s, sv = nih(Path(tmp) / "server", "--backend", "server", "--base-url", url, "--served-model",
                           model_dir, "--concurrency", "2")  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    assert hf == sv, [k for k in hf if hf[k] != sv.get(k)]
    print(f"{len(hf)} NIH prompts, identical outputs; in-process {hf_s:.1f} s, server {sv_s:.1f} s "
          f"(server / in-process = {sv_s / hf_s:.2f}x; model load included in both)")  # fmt: skip


if __name__ == "__main__":
    main()

"""Benchmark: what a full SHA-256 of the 1.3B artifact costs when it is opened.

Writes a temp file the size of the files a Wan2.1-1.3B artifact's ``step`` and ``text`` graphs
load (sizes from ``bench/results/export_fullsize.json``: the graphs and their external weights),
and hashes it with ``memrope.artifact.file_sha256`` (the code ``load_artifact`` runs): from the
page cache (``hot``: the file was just written or read, as after an export or a previous run)
and after dropping this file's pages (``cold``: ``posix_fadvise(DONTNEED)``, as after a reboot;
on a VM the host may still cache it). Also SHA-256 of bytes already in memory: the CPU's
ceiling. Three repeats each, median and spread. Other artifact sizes (fp32, the VAE decoder,
the recache graph's copy of the weights) follow from the measured throughput.

Results: ``bench/results/artifact_hash_cpu.json`` (machine, versions, date);
docs/artifact_integrity.md explains what they mean for the default check.

Usage: python bench/artifact_hash_cpu.py [--dtype bfloat16] [--workdir /tmp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16 << 20


def loaded_bytes(export: dict, dtype: str) -> dict[str, int]:
    """File -> bytes that the step and text graphs of the ``dtype`` export load."""
    result = next(r for r in export["results"] if r["dtype"] == dtype)
    return {name: int(mb * 1e6) for name, mb in result["files_mb"].items() if name.endswith((".onnx", ".data"))}


def vae_bytes(vae_export: dict, dtype: str) -> int | None:
    for r in vae_export["results"]:
        if r.get("stage") == "export" and r.get("dtype") == dtype:
            return sum(r["files_bytes"].values())
    return None


def write_file(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)  # content does not change SHA-256's speed; a real file on disk does matter
    with open(path, "wb") as handle:
        left = size
        while left:
            n = min(left, CHUNK)
            handle.write(block[:n])
            left -= n
        handle.flush()
        os.fsync(handle.fileno())


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, repeats: int, before=None) -> dict:
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"seconds": [round(s, 3) for s in seconds], "median_s": round(statistics.median(seconds), 3),
            "spread_s": round(max(seconds) - min(seconds), 3)}


def main() -> int:
    from memrope.runtime.bench import cpu_name  # the machine line every results file uses

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="which export's sizes the temp file takes")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from memrope.artifact import file_sha256

    export = json.loads((ROOT / "bench" / "results" / "export_fullsize.json").read_text())
    vae_export = json.loads((ROOT / "bench" / "results" / "vae_export_fullsize.json").read_text())
    load_before = os.getloadavg()[0]  # this VM is shared: a busy one makes every number slower
    files = loaded_bytes(export, args.dtype)
    size = sum(files.values())
    path = args.workdir / f".memrope-hash-bench-{os.getpid()}.bin"
    try:
        write_file(path, size)
        file_sha256(path)  # warm-up: the whole file in the page cache
        hot = timed(lambda: file_sha256(path), args.repeats)
        cold = timed(lambda: file_sha256(path), args.repeats, before=lambda: drop_cache(path))
    finally:
        path.unlink(missing_ok=True)
    block = os.urandom(CHUNK)
    in_memory_bytes = 64 * CHUNK

    def hash_memory() -> None:
        digest = hashlib.sha256()
        for _ in range(in_memory_bytes // CHUNK):
            digest.update(block)

    memory = timed(hash_memory, args.repeats)
    rate = {case: size / r["median_s"] / 1e6 for case, r in (("hot", hot), ("cold", cold))}
    rate["in_memory"] = in_memory_bytes / memory["median_s"] / 1e6

    def estimate(n: int) -> dict:
        return {"mb": round(n / 1e6, 1), "hot_s": round(n / 1e6 / rate["hot"], 2),
                "cold_s": round(n / 1e6 / rate["cold"], 2)}

    estimates = {}
    for dtype in ("bfloat16", "float32"):
        dit = sum(loaded_bytes(export, dtype).values())
        step = sum(v for k, v in loaded_bytes(export, dtype).items() if k.startswith("step."))
        vae = vae_bytes(vae_export, dtype) or 0
        estimates[dtype] = {"step_and_text": estimate(dit), "step_text_and_recache": estimate(dit + step),
                            "step_text_recache_and_vae": estimate(dit + step + vae)}
    doc = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "cpu": cpu_name(), "cpus": os.cpu_count(),
                 "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1),
                 "platform": platform.platform(), "python": platform.python_version(),
                 "openssl": ssl.OPENSSL_VERSION, "workdir": str(args.workdir), "repeats": args.repeats,
                 "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)},
        "measured": {"dtype": args.dtype, "files": files, "bytes": size, "hot": hot, "cold": cold,
                     "in_memory": {**memory, "bytes": in_memory_bytes},
                     "mb_per_s": {k: round(v) for k, v in rate.items()}},
        "estimates": estimates,
    }
    out = ROOT / "bench" / "results" / "artifact_hash_cpu.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"bytes": size, "hot_s": hot["median_s"], "cold_s": cold["median_s"],
                      "mb_per_s": doc["measured"]["mb_per_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What Ray Serve costs and what a second replica buys, on the CPU: the embedded demo model served
to 4 aiortc viewers by

* ``memrope serve`` (one process, one model worker), pinned to core 0;
* ``memrope serve --ray --replicas 1``, its engine replica pinned to core 0;
* ``memrope serve --ray --replicas 2``, each engine replica pinned to a core of its own,

every model thread single-threaded (``OMP_NUM_THREADS=1``), so the one-worker setups are
generation-bound with 4 sessions. Measured per setup, over a steady window: each session's frame
rate, the total, and each viewer's time to first frame (``POST /sessions`` to its first decoded
frame). Then memory: with 2 replicas, 3 waves of 4 viewers that watch a few seconds and vanish
(the connection closed, no stop); each replica's resident memory after each wave.

Targets: 1 replica's per-session rate >= 0.9x one process's; 2 replicas' total
>= 1.7x 1 replica's; time to first frame with Ray <= one process's + 300 ms; each replica's
memory after wave 3 within 5% of after wave 1.

    python bench/cluster_bench.py --out bench/results/cluster_cpu.json --report docs/cluster_cpu.md

Two models: the embedded demo, where two replicas reach its 16 fps real-time cap with 2 sessions
each (so the total cannot double), and serve_bench's mid model, generation-bound in every setup.

Needs the serve and cluster extras; starts and stops its own servers (and Ray) on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import meta, model_args  # noqa: E402

from memrope.runtime.serve.client import ServerProcess, Viewer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball bouncing on a blue background"
VIEWERS = 4
MB = 1 << 20
# "one process" runs first and again last: the machine's load drifts, and Ray's overhead is read
# against the mean of the two.
SETUPS = {"one process": [], "ray, 1 replica": ["--ray", "--replicas", "1"],
          "ray, 2 replicas": ["--ray", "--replicas", "2"], "one process, again": []}


def pin(pid: int, cores: set[int]) -> None:
    """Pin every thread of process ``pid`` (threads started later inherit from theirs)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cores)


def engine_pids(server: ServerProcess, ray: bool) -> list[int]:
    if not ray:
        return [server.process.pid]
    replicas = server.get("/healthz")[2]["engine_replicas"]
    return sorted(r["pid"] for r in replicas)


async def wait_idle(server: ServerProcess, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await asyncio.to_thread(server.get, "/healthz"))[2].get("sessions"):
        if time.monotonic() > deadline:
            raise RuntimeError("sessions were not freed")
        await asyncio.sleep(0.25)


async def measure(server: ServerProcess, window_s: float, timeout_s: float = 180.0) -> dict:
    viewers = [Viewer(server.url) for _ in range(VIEWERS)]
    try:
        await asyncio.gather(*(v.start(PROMPT, seed=i) for i, v in enumerate(viewers)))
        await asyncio.gather(*(v.wait_frames(1, timeout_s) for v in viewers))
        ttff_ms = [1e3 * (v.frame_times[0] - v.created_at) for v in viewers]
        # Past the start: every session has two blocks out.
        await asyncio.gather(*(v.wait_event(lambda e: e.get("type") == "block" and e["block"] >= 1, timeout_s,
                                            "block 1") for v in viewers))
        frames0, t0 = [v.frames for v in viewers], time.monotonic()
        await asyncio.sleep(window_s)
        elapsed = time.monotonic() - t0
        fps = [(v.frames - f0) / elapsed for v, f0 in zip(viewers, frames0, strict=True)]
        owners = [v.id.split(".")[0] if "." in v.id else "one process" for v in viewers]
        await asyncio.gather(*(v.stop() for v in viewers))
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    await wait_idle(server)
    return {"window_s": round(elapsed, 2), "ttff_ms": [round(x, 1) for x in ttff_ms],
            "ttff_ms_median": round(statistics.median(ttff_ms), 1),
            "per_session_fps": [round(x, 2) for x in fps], "per_session_fps_mean": round(statistics.fmean(fps), 2),
            "total_fps": round(sum(fps), 2), "owners": owners}


async def memory_waves(server: ServerProcess, waves: int, watch_s: float) -> list[dict[str, float]]:
    """Resident MB of each replica after each wave of viewers that watch and vanish."""
    after = []
    for _ in range(waves):
        viewers = [Viewer(server.url) for _ in range(VIEWERS)]
        await asyncio.gather(*(v.start(PROMPT, seed=i) for i, v in enumerate(viewers)))
        await asyncio.gather(*(v.wait_frames(1, 180) for v in viewers))
        await asyncio.sleep(watch_s)
        await asyncio.gather(*(v.close() for v in viewers))  # gone without a stop: the server notices
        await wait_idle(server)
        await asyncio.sleep(2.0)  # the last streams' caches released
        metrics = await asyncio.to_thread(server.metrics)
        after.append({key.split('"')[1]: round(value / MB, 1) for key, value in metrics.items()
                      if key.startswith("process_resident_memory_bytes{")})
    return after


async def run_setup(name: str, args: list[str], window_s: float, waves: int) -> dict:
    """One setup: ``args`` are ``memrope serve``'s (model and cluster options)."""
    ray = "--ray" in args
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    with ServerProcess(*args, "--max-sessions", str(VIEWERS), "--heartbeat-timeout", "3",
                       "--sessions-per-minute", "0", start_timeout_s=300, stop_timeout_s=60, env=env) as server:
        pids = engine_pids(server, ray)
        for core, pid in enumerate(pids):
            pin(pid, {core % os.cpu_count()})
        result = {"setup": name, "engine_processes": len(pids), **await measure(server, window_s)}
        if ray and len(pids) > 1 and waves:
            result["rss_mb_after_wave"] = await memory_waves(server, waves, watch_s=4.0)
    return result


def targets(results: dict[str, dict]) -> dict:
    one = [results["one process"], results["one process, again"]]
    r1, r2 = results["ray, 1 replica"], results["ray, 2 replicas"]
    overhead = r1["per_session_fps_mean"] / statistics.fmean(r["per_session_fps_mean"] for r in one)
    scaling = r2["total_fps"] / r1["total_fps"]
    ttff_extra = max(r1["ttff_ms_median"], r2["ttff_ms_median"]) - statistics.fmean(r["ttff_ms_median"] for r in one)
    waves = r2.get("rss_mb_after_wave") or []
    drift = {rep: round(waves[-1][rep] / waves[0][rep] - 1, 4) for rep in waves[0]} if len(waves) > 1 else {}
    out = {
        "ray_overhead_fps_ratio": {"value": round(overhead, 3), "target": ">= 0.9", "met": overhead >= 0.9},
        "two_replica_scaling": {"value": round(scaling, 3), "target": ">= 1.7", "met": scaling >= 1.7},
        "ttff_extra_ms": {"value": round(ttff_extra, 1), "target": "<= 300", "met": ttff_extra <= 300},
    }
    if drift:
        out["rss_drift_wave3_vs_wave1"] = {"value": drift, "target": "within 5%",
                                           "met": all(abs(d) <= 0.05 for d in drift.values())}
    return out


def report(doc: dict, path: Path, command: str) -> None:
    m = doc["meta"]
    lines = [
        "# `memrope serve --ray` against one process, on the CPU", "",
        f"Run on {m['date']} (UTC): {m['machine']['cpu']}, {m['machine']['cores']} cores, "
        f"{m['machine']['memory_gb']} GB, no GPU; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['machine']['load_average_at_start'])}. Command: `{command}`. Raw numbers: "
        "[bench/results/cluster_cpu.json](../bench/results/cluster_cpu.json).", "",
        f"{VIEWERS} aiortc viewers in the bench process, eager fp32, every model thread single-threaded; one process "
        "and the one replica pinned to core 0, the two replicas to cores 0 and 1. Ray's own processes and the viewers "
        "share both cores. Models: `tiny` is the embedded demo (96x64, 16 fps); `mid` is `bench/serve_bench.py`'s "
        "mid DiT with a tiny umT5 and VAE (128x96).", "",
        "| preset | setup | per-session fps (mean) | total fps | time to first frame, ms (median) | "
        "sessions per replica |",
        "|---|---|---|---|---|---|",
    ]
    for preset, part in doc["presets"].items():
        for r in part["results"].values():
            per = {o: r["owners"].count(o) for o in dict.fromkeys(r["owners"])}
            lines.append(f"| {preset} | {r['setup']} | {r['per_session_fps_mean']} | {r['total_fps']} | "
                         f"{r['ttff_ms_median']} | {', '.join(str(n) for n in per.values())} |")
    lines += ["", "| preset | target | value | wanted | met |", "|---|---|---|---|---|"]
    for preset, part in doc["presets"].items():
        for name, t in part["targets"].items():
            lines.append(f"| {preset} | {name} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    for preset, part in doc["presets"].items():
        waves = part["results"]["ray, 2 replicas"].get("rss_mb_after_wave") or []
        if waves:
            lines += ["", f"Resident memory of each replica ({preset}) after each wave of {VIEWERS} viewers that "
                          "watched and vanished, MB:", ""]
            for i, wave in enumerate(waves, 1):
                lines.append(f"- wave {i}: " + ", ".join(f"{rep} {mb}" for rep, mb in wave.items()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,mid",
                        help="tiny: the embedded demo (two replicas reach its 16 fps real-time cap); mid: serve_bench's "
                             "mid model (generation-bound in every setup)")
    parser.add_argument("--window", type=float, default=20.0, help="steady window per setup, s")
    parser.add_argument("--waves", type=int, default=3, help="memory waves with 2 replicas, first preset only (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster_cpu.json")
    parser.add_argument("--report", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    doc = {"meta": meta(), "presets": {}}
    for i, preset in enumerate(args.presets.split(",")):
        results = {}
        for name, setup_args in SETUPS.items():
            results[name] = asyncio.run(run_setup(name, [*model_args(preset), *setup_args], args.window,
                                                  args.waves if i == 0 else 0))
            print(json.dumps({"preset": preset, **results[name]}), flush=True)
        doc["presets"][preset] = {"results": results, "targets": targets(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(args.out)
    if args.report:
        report(doc, args.report, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    print(json.dumps({p: d["targets"] for p, d in doc["presets"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

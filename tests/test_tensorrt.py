"""TensorRT path.

On every machine with ``tensorrt_rtx`` (the ``rtx`` extra; no GPU needed): the real TensorRT-RTX
builder builds every graph of the golden model's exports (step, text, recache; for the ema
policy in bf16/fp16 also a tiny VAE decoder) through ``memrope build --target rtx``, for all
three policies (ema, eviction, global) in fp32, bf16 and fp16 (the eviction and global policies'
bf16 and fp16 in the slow step); bf16/fp16 attention lands
on fused kernels and fp32 attention is decomposed, as the build report says; a graph the builder
rejects is one error naming the layer, and nothing is written; up-to-date plans are reused and
other compute capabilities rebuild; loading a plan on a machine without a GPU says so in one
line. Pure Python: sidecars and the refusal of plans built for another target, TensorRT version,
GPU or artifact, with the exact rebuild command. On a CUDA GPU (marked, skipped here): per-call
parity with eager under the bf16 ratio rule, and CUDA-graph replay (per bound feeds set)
identical to plain execution, for each target whose module is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import onnx
import pytest
import torch
from conftest import Lazy

from memrope.artifact import load_artifact
from memrope.backend import Backend, Feeds
from memrope.config import WanConfig, load_run_config
from memrope.engine.build import io_differences, network_io
from memrope.engine.sidecar import (
    EngineMismatchError,
    EngineSidecar,
    check_sidecar,
    plan_path,
    read_sidecar,
    runtime_cache_path,
    sidecar_path,
    write_sidecar,
)
from memrope.engine.tensorrt_backend import EngineLoadError, TensorRTBackend
from memrope.model import build_dit, random_state_dict
from memrope.runtime.cli import main

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "data" / "golden"
PIXELS = dict(height=32, width=48)  # latent 4 x 6
POLICIES = ("memrope_ema", "memrope_eviction", "global_noevict")  # the ema, eviction and global policies
VAE_POLICY = "memrope_ema"  # its bf16/fp16 exports carry a tiny VAE decoder (vae_decode) as well
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install -e '.[rtx]'; "
                                                   "TensorRT-RTX builds engines with no GPU)")

SIDECAR = EngineSidecar(target="rtx", module="tensorrt_rtx", module_version="1.7.1.116",
                        compute_capabilities=["8.9", "12.0"], contract_hash="abc123", graph="step",
                        dtype="bfloat16", build_flags={"strongly_typed": True, "builder_optimization_level": 3})
DEFAULT = replace(SIDECAR, compute_capabilities=["8.0", "8.6", "8.9", "12.0"], default_compute_capabilities=True)
SERVER = EngineSidecar(target="server", module="tensorrt", module_version="10.15.1.29",
                       compute_capabilities=["9.0"], gpu_name="NVIDIA H100 80GB HBM3", contract_hash="abc123",
                       graph="step", dtype="bfloat16")


# --- sidecars and refusing plans built for something else (pure Python) ----------------------------

def test_sidecar_round_trip_records_when_it_was_built(tmp_path):
    path = sidecar_path(plan_path(tmp_path, "step"))
    assert path.name == "step.plan.json"
    assert runtime_cache_path(plan_path(tmp_path, "step")).name == "step.plan.rtxcache"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    built = EngineSidecar(**{k: v for k, v in vars(SIDECAR).items() if k != "created"})  # stamped now
    write_sidecar(path, built)
    assert read_sidecar(path) == built
    created = datetime.fromisoformat(read_sidecar(path).created)
    assert created.tzinfo is not None and before <= created <= datetime.now(timezone.utc)
    check_sidecar(read_sidecar(path), contract_hash="abc123", module_version="1.7.1.116", compute_capability="8.9")


@pytest.mark.parametrize("sidecar,here,says,command", [
    (SIDECAR, dict(compute_capability="8.6"), "built for 8.9, 12.0, this GPU is 8.6",
     "memrope build /a/b --target rtx --compute-capability 8.6,8.9,12.0 --force"),
    (SIDECAR, dict(module_version="1.8.0.5"), "engine tensorrt_rtx '1.7.1.116', here '1.8.0.5'",
     "memrope build /a/b --target rtx --compute-capability 8.9,12.0 --force"),
    (DEFAULT, dict(module_version=None), "pip install -e '.[rtx]'", "memrope build /a/b --target rtx --force"),
    (DEFAULT, dict(compute_capability="7.5"), "built for 8.0, 8.6, 8.9, 12.0, this GPU is 7.5",
     "memrope build /a/b --target rtx --compute-capability 7.5 --force"),
    (SIDECAR, dict(contract_hash="def456"), "engine 'abc123', artifact 'def456'",
     "memrope build /a/b --target rtx --compute-capability 8.9,12.0 --force"),
    (SIDECAR, dict(target="server"), "target: engine 'rtx', asked for 'server'",
     "memrope build /a/b --target server --force"),
    (SERVER, dict(compute_capability="8.9", gpu_name="NVIDIA GeForce RTX 4090"), "gpu_name: engine 'NVIDIA H100",
     "memrope build /a/b --target server --force"),
])
def test_check_sidecar_refuses_with_the_exact_rebuild_command(sidecar, here, says, command):
    fits = dict(contract_hash="abc123", module_version=sidecar.module_version,
                compute_capability=sidecar.compute_capabilities[0], gpu_name=sidecar.gpu_name)
    check_sidecar(sidecar, **fits, artifact_dir="/a/b")  # the plan's own environment: accepted
    with pytest.raises(EngineMismatchError) as err:
        check_sidecar(sidecar, **{**fits, **here}, artifact_dir="/a/b")
    message = str(err.value)
    assert says in message and message.endswith(f"`{command}`"), message
    assert "\n" not in message


def test_rtx_default_targets_reach_forward_explicit_ones_do_not():
    assert DEFAULT.runs_on("8.6") and DEFAULT.runs_on("12.1")
    assert not DEFAULT.runs_on("9.0") and not DEFAULT.runs_on("7.5")
    assert SIDECAR.runs_on("12.0") and not SIDECAR.runs_on("12.1")


def test_sidecar_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "text.plan.json"
    write_sidecar(path, SIDECAR)
    write_sidecar(path, replace(SIDECAR, graph="text"))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.plan.json"]
    assert read_sidecar(path).graph == "text"

    with pytest.raises(TypeError):  # json cannot serialise it mid-write: the old file must survive intact
        write_sidecar(path, replace(SIDECAR, build_flags={"bad": object()}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.plan.json"]
    assert read_sidecar(path).graph == "text"


def test_read_sidecar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="memrope build"):
        read_sidecar(tmp_path / "step.plan.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="memrope build"):
        read_sidecar(tmp_path / "bad.json")
    (tmp_path / "latin1.json").write_bytes(b'{"graph": "caf\xe9"}')
    with pytest.raises(EngineMismatchError, match="memrope build"):
        read_sidecar(tmp_path / "latin1.json")
    old = {"tensorrt_version": "10.15.1.29", "gpu_name": "NVIDIA H100", "compute_capability": "9.0",
           "contract_hash": "abc", "graph": "step", "dtype": "bfloat16"}  # what version 1 wrote
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(EngineMismatchError, match="sidecar version None; this engine reads version 3"):
        read_sidecar(tmp_path / "old.json")
    (tmp_path / "mixed.json").write_text(json.dumps({**SIDECAR.to_json(), "module": "tensorrt"}))
    with pytest.raises(EngineMismatchError, match="a rtx plan is built by tensorrt_rtx"):
        read_sidecar(tmp_path / "mixed.json")


# --- real TensorRT-RTX builds of every export (no GPU needed) ----------------------------------------

@pytest.fixture(scope="module")
def exports(request, golden_dit, tiny_config, tmp_path_factory):
    """(policy, dtype) -> the golden model exported for that policy in that dtype (fp32: the shared,
    validated exports; bf16/fp16 of the ema policy carry a tiny VAE decoder too), made on first use."""
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed (pip install -e '.[rtx]')")
    from memrope.export.onnx_export import export_artifact

    root = tmp_path_factory.mktemp("low_precision")

    def make(key: tuple[str, str]) -> Path:
        policy, dtype = key
        if dtype == "float32":
            return request.getfixturevalue("artifacts")[policy]  # only when a test needs them
        if policy == VAE_POLICY:
            return request.getfixturevalue("low_precision_exports")[dtype]
        dit = build_dit(tiny_config, golden_dit.state_dict(), dtype=DTYPES[dtype])
        run = load_run_config(GOLDEN / f"{policy}.yaml")
        return export_artifact(dit, run, root / f"{policy}_{dtype}", validate=False, **PIXELS).path

    return Lazy(make)


def _build(path: Path, *extra: str) -> tuple[int, str]:
    """``memrope build PATH --target rtx ...`` in this process: exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["build", str(path), "--target", "rtx", *extra])
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def built(exports, tmp_path_factory):
    """(policy, dtype) -> an export copied and built once with ``memrope build --target rtx``:
    path, exit code, output (made on first use)."""
    root = tmp_path_factory.mktemp("built")

    def make(key: tuple[str, str]) -> tuple[Path, int, str]:
        policy, dtype = key
        path = root / f"{policy}_{dtype}"
        shutil.copytree(exports[policy, dtype], path)  # the shared exports stay plan-free
        return (path, *_build(path))

    return Lazy(make)


# The default suite builds every policy in fp32 and the ema policy (the method's graph, with the
# VAE decoder) in bf16 and fp16; the eviction and global policies in bf16 and fp16, the same graphs
# in another dtype, build in CI's slow step.
BUILD_CASES = [(policy, dtype) if policy == VAE_POLICY or dtype == "float32"
               else pytest.param(policy, dtype, marks=pytest.mark.slow)
               for policy in POLICIES for dtype in DTYPES]


def _onnx_facts(path: Path) -> tuple[int, int]:
    """(Attention nodes, bytes of initializers) of an exported graph, read with onnx, not TensorRT."""
    model = onnx.load(str(path), load_external_data=False)
    attention = sum(node.op_type == "Attention" for node in model.graph.node)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    return attention, weights


@needs_rtx
@pytest.mark.parametrize("policy,dtype", BUILD_CASES)
def test_memrope_build_rtx_builds_every_graph(built, policy, dtype):
    import tensorrt_rtx

    path, code, printed = built[policy, dtype]
    assert code == 0, printed
    contract = load_artifact(path).contract
    with_vae = policy == VAE_POLICY and dtype != "float32"
    assert set(contract.graphs) == {"step", "text", "recache", *(["vae_decode"] if with_vae else [])}
    for graph in contract.graphs:  # every graph the export wrote
        plan = plan_path(path, graph)
        sidecar = read_sidecar(sidecar_path(plan))
        assert f"{plan}: " in printed
        assert (sidecar.target, sidecar.module, sidecar.module_version) == ("rtx", "tensorrt_rtx",
                                                                             tensorrt_rtx.__version__)
        assert (sidecar.graph, sidecar.dtype, sidecar.contract_hash) == (graph, dtype, contract.config_hash)
        assert sidecar.default_compute_capabilities and sidecar.compute_capabilities == ["8.0", "8.6", "8.9", "12.0"]
        report = sidecar.report
        attention, weight_bytes = _onnx_facts(load_artifact(path).graph_path(graph))
        assert report["plan_bytes"] == plan.stat().st_size >= weight_bytes  # the weights are inside the plan
        assert report["attention_layers"] == attention
        assert report["engine_layers"] > 0 and report["network_layers"] >= report["engine_layers"]
        if attention == 0:
            assert report["attention"] == "no attention layers"
        elif dtype == "float32":  # decomposed on purpose: no fused fp32 kernel for these shapes
            assert report["decomposable_attention_layers"] == attention
            assert report["fused_attention_kernels"] == [] and report["attention"].startswith("decomposed")
        else:  # bf16/fp16 stay non-decomposable: one fused kernel per attention layer, or no build at all
            assert report["decomposable_attention_layers"] == 0
            assert len(report["fused_attention_kernels"]) == attention
            assert report["attention"].startswith(f"fused: {attention} attention layers")
    assert read_sidecar(sidecar_path(plan_path(path, "step"))).report["attention_layers"] > 0


@needs_rtx
def test_the_parsed_graph_is_checked_against_the_contract(exports):
    import tensorrt_rtx as trt

    bf16, fp32 = load_artifact(exports["memrope_ema", "bfloat16"]), load_artifact(exports["memrope_ema", "float32"])
    log = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(log).create_network(0)
    assert trt.OnnxParser(network, log).parse_from_file(str(bf16.graph_path("step")))
    io_here = network_io(trt, network)
    assert io_differences(io_here, bf16.contract.step) == []
    differences = io_differences(io_here, fp32.contract.step)  # same names, other dtype
    assert differences and any(d.startswith("latents: TensorRT ('input', (1, 3, 16, 4, 6), 'bfloat16')")
                               for d in differences)
    assert any("flow" in d for d in differences)


@needs_rtx
def test_up_to_date_plans_are_reused_and_other_targets_rebuild(built, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(built["memrope_ema", "bfloat16"][0], path)
    step = plan_path(path, "step")
    before = step.read_bytes(), read_sidecar(sidecar_path(step))
    code, printed = _build(path)
    assert code == 0 and printed.count("up to date") == len(load_artifact(path).contract.graphs) == 4
    assert (step.read_bytes(), read_sidecar(sidecar_path(step))) == before

    code, printed = _build(path, "--compute-capability", "8.9", "--graph", "step")
    assert code == 0 and "compute capability 8.9;" in printed and "text.plan" not in printed
    sidecar = read_sidecar(sidecar_path(step))
    assert sidecar.compute_capabilities == ["8.9"] and not sidecar.default_compute_capabilities
    assert sidecar.created >= before[1].created and sidecar.report["fused_attention_kernels"]
    with pytest.raises(EngineMismatchError, match=r"--target rtx --compute-capability 8\.9,12\.0 --force`$"):
        check_sidecar(sidecar, contract_hash=sidecar.contract_hash, module_version=sidecar.module_version,
                      compute_capability="12.0", artifact_dir=path)


@pytest.fixture(scope="module")
def rejected_artifact(tiny_config, tmp_path_factory) -> Path:
    """A real export TensorRT-RTX cannot build: bf16 attention with 6-channel heads has no fused kernel."""
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed (pip install -e '.[rtx]')")
    from memrope.export.onnx_export import export_artifact

    model = replace(tiny_config, dim=12)  # 2 heads x head_dim 6: valid for the model, not for the kernel
    dit = build_dit(model, random_state_dict(model), dtype=torch.bfloat16)
    run = load_run_config(GOLDEN / "memrope_ema.yaml")
    return export_artifact(dit, run, tmp_path_factory.mktemp("rejected") / "hd6", validate=False, **PIXELS).path


def _listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@needs_rtx
def test_a_rejected_graph_is_one_error_naming_the_layer_and_nothing_is_written(rejected_artifact, tmp_path, capfd):
    path = tmp_path / "hd6"
    shutil.copytree(rejected_artifact, path)
    assert _build(path, "--graph", "text")[0] == 0  # an earlier, good build of one graph
    capfd.readouterr()
    before = _listing(path)
    assert "text.plan" in before and "step.plan" not in before

    # text builds first in this run, then step fails: the new text plan must not be committed either.
    for order in (["--graph", "text", "--graph", "step"], []):
        code, printed = _build(path, *order, "--force")
        err = capfd.readouterr().err
        assert code == 1 and printed == ""  # the build stage failed (exit 1), the options were fine
        lines = err.strip().splitlines()
        assert len(lines) == 1, err  # one error; nothing the libraries printed leaks through
        message = lines[0]
        assert message.startswith("memrope build: error: TensorRT-RTX ") and "could not build the step graph" in message
        assert "layer node_scaled_dot_product_attention (Attention, bfloat16 query [1, 2, 18, 6]" in message
        assert "Attention operation was not supported by a dedicated kernel" in message
        assert message.endswith("no plan was written")
        assert _listing(path) == before  # byte for byte: no plan, sidecar or temp file added or changed


@needs_rtx
@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_during_a_build_stops_it_and_writes_nothing(built, tmp_path, signum, code, said):
    """TensorRT calls our logger from inside the build and swallows a KeyboardInterrupt raised
    there; Ctrl-C (exit 130) or SIGTERM (exit 143) must still stop ``memrope build`` before any
    plan is written."""
    path = tmp_path / "art"
    shutil.copytree(built["memrope_ema", "float32"][0], path)  # fp32 step: the longest build here (~2 s)

    def state() -> dict[str, tuple[bytes, int, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(path.iterdir())}

    before = state()
    assert "step.plan" in before
    proc = subprocess.Popen([sys.executable, "-m", "memrope", "build", str(path), "--target", "rtx", "--force"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not (seen and "building step.plan" in seen[-1]) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        assert seen and "building step.plan" in seen[-1], "".join(seen)
        time.sleep(0.3)  # past parsing (~50 ms), inside build_serialized_network
        proc.send_signal(signum)
        proc.wait(timeout=120)
        out = proc.stdout.read()
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())
    err = "".join(seen)
    assert proc.returncode == code, err
    assert err.rstrip().endswith(f"memrope build: {said}") and "Traceback" not in err, err
    assert "KeyboardInterrupt" not in err and "built step.plan" not in err and out == "", err
    assert state() == before  # byte for byte, same files: no plan, sidecar or temp file added or replaced


@needs_rtx
def test_build_options_are_checked_before_building(built, tmp_path, capsys):
    path = built["memrope_ema", "bfloat16"][0]
    cases = [(["--target", "rtx", "--timing-cache", str(tmp_path / "t.cache")],
              "--timing-cache is for --target server"),
             (["--target", "rtx", "--compute-capability", "8.9,90"], "MAJOR.MINOR"),
             (["--target", "rtx", "--compute-capability", "9.0"], "is not a tensorrt_rtx"),
             (["--target", "rtx", "--graph", "vae"], "--graph must name distinct graphs"),
             (["--target", "rtx", "--opt-level", "7"], "--opt-level must be 0..5")]
    if importlib.util.find_spec("tensorrt") is None and not torch.cuda.is_available():
        cases.append((["--target", "server"], "pip install -e '.[tensorrt]'"))
    cases.append((["--target", "server", "--compute-capability", "8.9"], "--compute-capability is for --target rtx"))
    for args, says in cases:
        listing = _listing(path)
        assert main(["build", str(path), *args]) == 2, args
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, (args, err)
        assert _listing(path) == listing


# --- loading plans -------------------------------------------------------------------------------------

@needs_rtx
def test_loading_an_rtx_plan_without_a_gpu_says_so_in_one_line(built, tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the no-GPU message cannot be observed")
    path = built["memrope_ema", "bfloat16"][0]
    with pytest.raises(EngineLoadError) as err:
        TensorRTBackend(path)
    message = str(err.value)
    assert "no usable NVIDIA GPU on this machine" in message and "CUDA driver version is insufficient" in message
    assert "compute capability 8.0, 8.6, 8.9, 12.0 and later" in message and "\n" not in message
    capfd.readouterr()

    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(1, 16, 32)}, tmp_path / "emb.safetensors")
    code = main(["generate", "--engine", str(path), "--backend", "tensorrt", "--no-decode",
                 "--text-embeds", str(tmp_path / "emb.safetensors"), "--latents-out", str(tmp_path / "l.safetensors")])
    captured = capfd.readouterr()
    # The CLI checks for a GPU before it loads anything: the same plain fact, one line, exit 2.
    assert code == 2 and captured.err.startswith("memrope generate: error: --backend tensorrt runs TensorRT plans "
                                                 "on an NVIDIA GPU and this machine has none")
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.out + captured.err and "[TRT]" not in captured.out + captured.err
    assert not (tmp_path / "l.safetensors").exists()


@needs_rtx
def test_backend_refuses_a_plan_for_another_target_or_version_before_loading_it(built, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(built["memrope_ema", "float16"][0], path)
    command = f"`memrope build {path} --target server --force`"
    with pytest.raises(EngineMismatchError, match=rf"asked for 'server'.*{command}$"):
        TensorRTBackend(path, target="server")
    sidecar = sidecar_path(plan_path(path, "step"))
    raw = json.loads(sidecar.read_text())
    raw["module_version"] = "1.6.0.1"
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(EngineMismatchError, match=rf"'1.6.0.1'.*`memrope build {path} --target rtx --force`$"):
        TensorRTBackend(path)


def test_tensorrt_backend_without_plans_says_memrope_build(artifacts):
    path = artifacts["memrope_ema"]
    with pytest.raises(FileNotFoundError, match="memrope build") as err:
        TensorRTBackend(path)
    assert str(path) in str(err.value) and "--target rtx" in str(err.value)


# --- on a CUDA GPU with TensorRT (marked; skipped without one) -------------------------------------------

def _tiny_dit(dtype: torch.dtype = torch.bfloat16):
    cfg = WanConfig.from_json(GOLDEN / "config.json")
    return build_dit(cfg, random_state_dict(cfg), dtype=dtype)  # seeded: same weights every time


def _require_gpu_target(target: str) -> None:
    module = {"rtx": "tensorrt_rtx", "server": "tensorrt"}[target]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[{'rtx' if target == 'rtx' else 'tensorrt'}]')")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: running TensorRT engines needs an NVIDIA GPU")
    if target == "rtx" and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("TensorRT-RTX does not support Hopper (compute capability 9.0) GPUs")


@pytest.fixture(scope="module", params=["rtx", "server"])
def gpu_built(request, tmp_path_factory) -> Path:
    _require_gpu_target(request.param)
    from memrope.engine.build import build_engines
    from memrope.export.onnx_export import export_artifact

    run = load_run_config(GOLDEN / "memrope_ema.yaml")
    path = export_artifact(_tiny_dit(), run, tmp_path_factory.mktemp("gpu") / "tiny_bf16", validate=False,
                           **PIXELS).path
    plans = build_engines(path, target=request.param)
    assert [p.graph for p in plans] == list(load_artifact(path).contract.graphs)
    return path


class _PerCallComparison(Backend):
    """Wraps the TensorRT backend; on every call runs eager bf16 and eager fp32 on the same feeds.

    Backends bind a stream's :class:`Feeds` once (a plain dict is refused), so the fp32 reference
    gets its own ``Feeds``, made at the stream's first call and refreshed in place after.
    """

    def __init__(self, trt_backend, eager_bf16, eager_fp32):
        self.trt, self.bf16, self.fp32 = trt_backend, eager_bf16, eager_fp32
        self.name, self.model, self.layout = "compare", trt_backend.model, trt_backend.layout
        self.dtype, self.device = trt_backend.dtype, trt_backend.device
        self.calls = 0
        self._source: Feeds | None = None
        self._wide: Feeds | None = None

    def encode_text(self, prompt_embeds):
        return self.trt.encode_text(prompt_embeds)

    def _widened(self, feeds: Feeds) -> Feeds:
        """``feeds`` with its floating-point tensors in fp32 (integer and bool ones shared)."""
        if feeds is not self._source:
            self._source = feeds
            self._wide = Feeds({k: v.float() if v.is_floating_point() else v for k, v in feeds.items()})
        else:
            for name, tensor in feeds.items():
                if tensor.is_floating_point():
                    self._wide[name].copy_(tensor)
        return self._wide

    def step(self, feeds):
        out = self.trt.step(feeds)
        ref = self.fp32.step(self._widened(feeds))
        low = self.bf16.step(feeds)
        for name, got in out.items():
            err_trt = (got.float() - ref[name].float()).abs().max().item()
            err_eager = (low[name].float() - ref[name].float()).abs().max().item()
            assert err_trt <= 2 * err_eager + 1e-3, (
                f"call {self.calls} {name}: TensorRT error vs fp32 {err_trt:.3g} > 2 x eager-bf16 {err_eager:.3g}")
        self.calls += 1
        return out


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_matches_eager_per_call_within_bf16_ratio(gpu_built, golden_inputs):
    from memrope.engine.eager_backend import EagerBackend
    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import TensorNoise

    artifact = load_artifact(gpu_built)
    run = artifact.run
    eager_bf16 = EagerBackend(_tiny_dit().cuda(), run)
    # The fp32 reference holds the same (bf16-rounded) weights, widened exactly.
    eager_fp32 = EagerBackend(_tiny_dit(torch.float32).cuda(), run)
    eager_fp32.dit.load_state_dict({k: v.float() if v.is_floating_point() else v
                                    for k, v in eager_bf16.dit.state_dict().items()})
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], artifact.layout().block_frames)
    prompt = golden_inputs["prompt_embeds"].to("cuda", torch.bfloat16)
    with TensorRTBackend(gpu_built, cuda_graph=False) as trt_backend:
        compare = _PerCallComparison(trt_backend, eager_bf16, eager_fp32)
        pipeline = MemRoPEPipeline(compare, run)
        pipeline.generate(prompt, noise)
        blocks = run.num_output_frames // pipeline.layout.block_frames
        assert compare.calls == blocks * (pipeline.schedule.num_steps + 1)  # every call was compared


@pytest.mark.trt
@pytest.mark.gpu
def test_cuda_graph_replay_matches_plain_execution_per_feeds_set(gpu_built):
    contract = load_artifact(gpu_built).contract.step
    gen = torch.Generator().manual_seed(1)

    def fill(feeds):  # new contents, same addresses
        for spec in contract.inputs:
            t = feeds[spec.name]
            if t.is_floating_point():
                t.copy_(torch.randn(spec.shape, generator=gen))
            elif t.dtype == torch.bool:
                t.fill_(spec.name == "key_valid")
            else:
                t.copy_(torch.arange(t.numel()).reshape(spec.shape))

    # Two streams' Feeds (what the loop passes; the backend binds each once, weakly).
    sessions = [Feeds({spec.name: spec.zeros("cuda") for spec in contract.inputs}) for _ in range(2)]
    with TensorRTBackend(gpu_built, cuda_graph=False) as plain, \
            TensorRTBackend(gpu_built, cuda_graph=True) as graphed:
        for call in range(6):  # two sessions alternating: each captured once, then replayed
            feeds = sessions[call % 2]
            fill(feeds)
            a = {k: v.clone() for k, v in plain.step(feeds).items()}
            b = {k: v.clone() for k, v in graphed.step(feeds).items()}
            for name, expected in a.items():
                assert torch.equal(expected, b[name]), f"call {call}: {name} differs under CUDA-graph replay"
        assert graphed.captured_graphs == 2, "each bound feeds set gets one captured graph, kept across switches"
    sidecar = read_sidecar(sidecar_path(plan_path(gpu_built, "step")))
    assert runtime_cache_path(plan_path(gpu_built, "step")).is_file() == (sidecar.target == "rtx")

"""Faults a user can hit, through the real CLI: each is one line on stderr naming what is wrong,
the documented exit code (2: bad input, found before the work; 1: the run failed), no traceback
without -v, and nothing half-written left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import golden_generate_args
from safetensors.torch import load_file, save_file

from memrope.runtime.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def golden(golden_dir):
    return {name: golden_dir / name for name in ("tiny_selfforcing.pt", "config.json", "memrope_ema.yaml",
                                                 "inputs.safetensors")}


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("memrope generate: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- non-finite values ---------------------------------------------------------------------------

def test_noise_overflow_stops_at_the_block_and_writes_nothing(golden, tmp_path, capsys):
    """Noise of 1e30 in one frame of block 2 poisons the block; the run stops there (exit 1)
    naming it, instead of writing 29 NaN blocks; --allow-nonfinite is the escape hatch."""
    tensors = load_file(str(golden["inputs.safetensors"]))
    tensors["noise"] = tensors["noise"].clone()
    tensors["noise"][:, 7] = 1e30
    noisy = tmp_path / "noisy.safetensors"
    save_file(tensors, str(noisy))
    out = tmp_path / "out" / "latents.safetensors"
    assert main(golden_generate_args(out, **{"--noise": noisy})) == 1
    _one_line_error(capsys, "block 2", "NaN or Inf", "likely cause")
    assert _leftovers(out.parent) == []
    # --allow-nonfinite keeps the outputs for inspection, warns per bad block, and still fails.
    assert main(golden_generate_args(out, **{"--noise": noisy, "--allow-nonfinite": ""})) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("memrope generate: error:")]
    assert len(failed) == 1 and "blocks were non-finite or out of range (blocks 2, " in failed[0], err
    assert "the outputs were kept (--allow-nonfinite)" in failed[0] and "Traceback" not in err
    latents = load_file(str(out))["latents"]
    assert torch.isfinite(latents[:, :6]).all() and not torch.isfinite(latents[:, 6:9]).all()


def test_nan_weights_are_refused_at_load(golden, tmp_path, capsys):
    checkpoint = torch.load(golden["tiny_selfforcing.pt"], weights_only=True)
    state = checkpoint["generator_ema"]
    name = next(k for k in state if k.endswith("ffn.0.weight"))
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(checkpoint, bad)
    out = tmp_path / "latents.safetensors"
    assert main(golden_generate_args(out, **{"--checkpoint": bad})) == 2
    _one_line_error(capsys, "nan.pt", "NaN or Inf", name.removeprefix("model."))
    assert not out.exists()


# --- outputs checked before the work -----------------------------------------------------------------

@pytest.mark.parametrize("target, needle", [
    ("dir", "is a directory"),
    ("/proc/memrope.safetensors", "is not writable"),
    ("latents.pt", "must end in .safetensors"),
    ("file/latents.safetensors", "is not a directory"),
])
def test_bad_output_paths_fail_in_milliseconds(golden, tmp_path, capsys, target, needle):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    path = Path(target) if target.startswith("/") else tmp_path / target
    # The checkpoint does not exist: reaching it would be a different error, so the output check
    # provably ran first.
    assert main(golden_generate_args(path, **{"--checkpoint": tmp_path / "later.pt"})) == 2
    _one_line_error(capsys, needle)


def test_a_full_disk_mid_run_is_one_line_and_leaves_nothing(golden, tmp_path):
    """The file-size limit stands in for a full disk: the latents stream fails on a late block
    with an OSError; exit 1, one line, no temp file, no output."""
    out = tmp_path / "out" / "latents.safetensors"
    out.parent.mkdir()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000)); "
            "from memrope.runtime.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *golden_generate_args(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "File too large" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert _leftovers(out.parent) == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(golden, tmp_path, caplog):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file = out_dir / f".latents.safetensors.{dead.pid}.{uuid.uuid4().hex}.tmp"
    stale_dir = out_dir / f".art.partial-{dead.pid}-0123abcd"
    live_file = out_dir / f".other.safetensors.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    stale_file.write_bytes(b"half a file")
    stale_dir.mkdir()
    live_file.write_bytes(b"being written by a live process")
    assert main(golden_generate_args(out_dir / "latents.safetensors")) == 0
    assert not stale_file.exists() and not stale_dir.exists() and live_file.exists()
    assert caplog.text.count("left by a killed run") == 2


# --- bad options ----------------------------------------------------------------------------------------

def test_unknown_device_and_truncated_graph_are_one_line(golden, artifacts, tmp_path, capsys):
    out = tmp_path / "latents.safetensors"
    assert main(golden_generate_args(out, **{"--device": "tpu"})) == 2
    _one_line_error(capsys, "--device must be cpu or cuda[:N]", "'tpu'")
    art = tmp_path / "art"
    import shutil

    shutil.copytree(artifacts["memrope_ema"], art)
    data = (art / "step.onnx").read_bytes()
    (art / "step.onnx").write_bytes(data[: len(data) // 3])
    args = golden_generate_args(out, **{"--checkpoint": None, "--model-config": None, "--engine": art,
                                 "--backend": "onnxruntime"})
    assert main(args) == 2
    _one_line_error(capsys, "step.onnx")
    assert not out.exists()


def test_verbose_works_anywhere_and_help_shows_defaults(golden, tmp_path, capsys):
    out = tmp_path / "latents.safetensors"
    for argv in (["-v", *golden_generate_args(out, **{"--device": "tpu"})],
                 [*golden_generate_args(out, **{"--device": "tpu"}), "-v"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "--device must be cpu" in err
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    assert "(default: eager)" in help_text and "(default: reference)" in help_text
    assert "float16" in help_text and "(default: None)" not in help_text


def test_version_and_bench_arguments_that_would_measure_nothing(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("memrope 0.")
    assert main(["bench", "--backends", ","]) == 2
    assert "names no backend" in capsys.readouterr().err
    for value in ("-1", "0"):
        assert main(["bench", "--warmup-blocks", value]) == 2
        assert "--warmup-blocks must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--height", "0"]) == 2
    assert "--height must be a positive number of pixels" in capsys.readouterr().err


def test_no_third_party_noise_on_a_clean_run(golden, tmp_path):
    out = tmp_path / "latents.safetensors"
    proc = subprocess.run([sys.executable, "-m", "memrope", *golden_generate_args(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    assert proc.stdout.startswith("wrote ")



def test_engine_with_another_resolutions_config_runs_at_the_artifacts_size(golden, artifacts, tmp_path, capsys):
    """--engine ART --config memrope_60s.yaml (832x480 latents, 240 frames): the artifact fixes the
    resolution before any shape is derived, so the run happens at its 4x6 latent size."""
    out = tmp_path / "latents.safetensors"
    args = golden_generate_args(out, **{"--checkpoint": None, "--model-config": None, "--noise": None,
                                 "--engine": artifacts["memrope_ema"], "--backend": "onnxruntime",
                                 "--config": ROOT / "tests" / "data" / "configs" / "memrope_60s.yaml",
                                 "--num-frames": 6})
    assert main(args) == 0, capsys.readouterr().err
    assert load_file(str(out))["latents"].shape == (1, 6, 16, 4, 6)


def test_export_and_bench_outputs_are_checked_first(golden, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(golden["tiny_selfforcing.pt"]), "--model-config",
                 str(golden["config.json"]), "--config", str(golden["memrope_ema.yaml"]), "--height", "32",
                 "--width", "48", "--out", "/proc/memrope-artifact"]) == 2
    assert "/proc is not writable" in capsys.readouterr().err
    assert main(["bench", "--backends", "eager", "--json-out", "/proc/bench.json"]) == 2
    assert "/proc is not writable" in capsys.readouterr().err


# --- found before the expensive work -------------------------------------------------------------

def test_export_force_replaces_artifacts_only(golden, tmp_path, capsys):
    """--force on a folder that is not an artifact (or on a file) is refused before anything
    loads, and the folder is untouched."""
    work = tmp_path / "thesis"
    work.mkdir()
    (work / "chapter1.tex").write_text("precious")
    (tmp_path / "notes.txt").write_text("precious too")
    base = ["export", "--checkpoint", str(golden["tiny_selfforcing.pt"]), "--model-config", str(golden["config.json"]),
            "--config", str(golden["memrope_ema.yaml"]), "--height", "32", "--width", "48", "--force", "--no-validate"]
    for target, needle in ((work, "is not an artifact (no contract.json) and is not empty"),
                           (tmp_path / "notes.txt", "is a file, not an artifact directory")):
        assert main([*base, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert (work / "chapter1.tex").read_text() == "precious" and sorted(p.name for p in work.iterdir()) == ["chapter1.tex"]
    assert (tmp_path / "notes.txt").read_text() == "precious too"


def test_weights_and_providers_are_checked_before_the_text_encoder_and_vae(golden, artifacts, tmp_path, capsys,
                                                                           caplog):
    """A checkpoint that does not fit the model, weights given to an exported backend, a
    provider this machine lacks, a text cache that cannot be a folder: one line, exit 2, and
    neither the text encoder nor the VAE was loaded (nothing logged by memrope.runtime.text/runtime.vae)."""
    from memrope.runtime.t2v import ensure_demo_model

    demo = ensure_demo_model()
    wrong = tmp_path / "wrong.pt"
    torch.save({"generator_ema": {"blocks.0.norm3.weight": torch.ones(8)}}, wrong)
    (tmp_path / "cache.mp4").write_text("a file")
    out = tmp_path / "out.mp4"
    base = ["generate", "--model-dir", str(demo), "--prompt", "a red fox", "--num-frames", "3", "--no-progress",
            "--out", str(out)]
    engine = ["--engine", str(artifacts["memrope_ema"]), "--backend", "onnxruntime"]
    cases = [
        (["--checkpoint", str(wrong), "--config", str(golden["memrope_ema.yaml"])], "does not match the model config"),
        ([*engine, "--checkpoint", str(golden["tiny_selfforcing.pt"])],
         "--checkpoint cannot change --backend onnxruntime's weights"),
        ([*engine, "--vae-backend", "eager", "--ort-provider", "cuda"], "needs onnxruntime-gpu and a CUDA GPU"),
        (["--text-cache", str(tmp_path / "cache.mp4")], "--text-cache"),
    ]
    for extra, needle in cases:
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (extra, err)
        loaded = [r.getMessage() for r in caplog.records if r.name.startswith(("memrope.runtime.text", "memrope.runtime.vae"))]
        assert loaded == [], (extra, loaded)
    assert not out.exists()


def test_png_frames_appear_whole_and_replace_only_an_earlier_runs_frames(tmp_path, capsys):
    """The PNG folder is renamed into place when the run succeeds: an earlier run's 20 frames are
    replaced, not mixed with the new 9; a folder holding other files is refused before the run; a
    failed run leaves the old folder as it was and no partial folder."""
    from memrope.runtime.video import PngFolderWriter

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(20):
        (frames / f"frame_{i:06d}.png").write_bytes(b"old")
    out = tmp_path / "video.mp4"
    args = ["generate", "--preset", "tiny", "--prompt", "a red fox", "--num-frames", "3", "--no-progress",
            "--out", str(out), "--png-dir", str(frames)]
    assert main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in frames.iterdir()) == [f"frame_{i:06d}.png" for i in range(9)]
    assert (frames / "frame_000000.png").read_bytes()[:4] == b"\x89PNG"
    assert _leftovers(tmp_path) == ["frames", "video.mp4"]

    (frames / "notes.txt").write_text("mine")
    out.unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--png-dir" in err and "holds other files (notes.txt)" in err
    assert not out.exists()
    (frames / "notes.txt").unlink()

    before = sorted(p.name for p in frames.iterdir())
    with pytest.raises(RuntimeError, match="the decoder failed"), PngFolderWriter(frames) as writer:
        writer.write(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), 0)
        raise RuntimeError("the decoder failed")
    assert sorted(p.name for p in frames.iterdir()) == before
    assert _leftovers(tmp_path) == ["frames"]

    # The rename of the new frames fails after the old ones were moved aside (an injected fault):
    # the old frames go back where they were.
    import memrope.runtime.video as video

    real_replace = video.os.replace

    def failing_replace(src, dst):
        if ".partial-" in Path(src).name and Path(dst) == frames:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    video.os.replace = failing_replace
    try:
        with pytest.raises(OSError, match="No space left"), PngFolderWriter(frames) as writer:
            writer.write(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), 0)
    finally:
        video.os.replace = real_replace
    assert sorted(p.name for p in frames.iterdir()) == before
    assert _leftovers(tmp_path) == ["frames"]


def test_serve_refuses_a_taken_port_before_loading_models(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "memrope", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert "umT5" not in proc.stderr and "VAE" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("flag, value", [("--connect-timeout", "0"), ("--heartbeat-timeout", "-1"),
                                         ("--max-sessions", "0"), ("--stun", "stun.example.org:3478"),
                                         ("--turn", "turn:relay.example.org?transport=sctp")])
def test_serve_refuses_a_bad_limit_before_loading_models(flag, value):
    proc = subprocess.run([sys.executable, "-m", "memrope", "serve", "--port", "0", flag, value],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"error: {flag} must be" in lines[0] and "got" in lines[0], proc.stderr
    assert "umT5" not in proc.stderr and "VAE" not in proc.stderr, proc.stderr


def test_serve_refuses_a_short_api_key_before_loading_models():
    from memrope.runtime.serve.options import API_KEY_ENV

    proc = subprocess.run([sys.executable, "-m", "memrope", "serve", "--port", "0"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=dict(os.environ, **{API_KEY_ENV: "short"}))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"${API_KEY_ENV} must be at least 16" in lines[0], proc.stderr
    assert "short" not in lines[0] and "umT5" not in proc.stderr


def test_turn_needs_credentials_and_hands_them_to_clients_only():
    from memrope.runtime.serve.options import TURN_CREDENTIAL_ENV, TURN_USERNAME_ENV, ServerOptions

    proc = subprocess.run([sys.executable, "-m", "memrope", "serve", "--port", "0", "--turn", "turn:relay.example.org"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in (TURN_USERNAME_ENV, TURN_CREDENTIAL_ENV)})
    assert proc.returncode == 2 and "umT5" not in proc.stderr, proc.stderr
    assert f"--turn needs the TURN server's credentials in ${TURN_USERNAME_ENV}" in proc.stderr.strip().splitlines()[-1]
    options = ServerOptions(stun="stun:stun.example.org", turn="turns:relay.example.org:5349?transport=tcp",
                            turn_username="viewer", turn_credential="s3cret-relay")
    assert options.ice_servers() == [{"urls": "stun:stun.example.org"},
                                     {"urls": "turns:relay.example.org:5349?transport=tcp", "username": "viewer",
                                      "credential": "s3cret-relay"}]
    assert "s3cret-relay" not in repr(options)


def test_serve_refuses_tls_files_that_do_not_load_before_loading_models(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    cases = [(["--tls-cert", str(tmp_path / "cert.pem")], "--tls-cert and --tls-key go together"),
             (["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "missing.pem")],
              f"cannot load the TLS certificate {tmp_path / 'cert.pem'}")]
    for flags, message in cases:
        proc = subprocess.run([sys.executable, "-m", "memrope", "serve", "--port", "0", *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and "umT5" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr

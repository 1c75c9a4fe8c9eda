"""Model pieces against independent formulations, and the step's export-readiness: one
strictly exported program (no data-dependent ops, fixed shapes) serves every block."""

from __future__ import annotations

import torch
from conftest import golden_run, golden_trace

from memrope.config import model_preset
from memrope.contract import step_contract
from memrope.engine.eager_backend import EagerBackend
from memrope.export.graph import StepGraph
from memrope.model import WanCausalDiT, build_dit, param_count, random_state_dict
from memrope.pipeline import MemRoPEPipeline
from memrope.rope import RopeTables, apply_rope, rope_cos_sin, rope_pair_split
from memrope.sampler import TensorNoise


def _complex_rope_reference(x, t_idx, grid_h, grid_w):
    """Spec section 2 written with complex128 tables, as the authors do."""
    d = x.shape[-1]
    def params(dim):
        return torch.outer(torch.arange(1024, dtype=torch.float64),
                           1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.polar(torch.ones(1024, d // 2, dtype=torch.float64),
                        torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1))
    p_t, p_h, _ = rope_pair_split(d)
    ft, fh, fw = freqs.split([p_t, p_h, p_h], dim=1)
    f = len(t_idx)
    table = torch.cat([ft[t_idx][:, None, None].expand(f, grid_h, grid_w, -1),
                       fh[:grid_h][None, :, None].expand(f, grid_h, grid_w, -1),
                       fw[:grid_w][None, None, :].expand(f, grid_h, grid_w, -1)], dim=-1).reshape(-1, 1, d // 2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * table).flatten(-2).to(x.dtype)


def test_rope_matches_complex_reference_for_several_head_sizes():
    for head_dim, (gh, gw) in ((32, (2, 3)), (128, (30, 52)), (64, (5, 7))):
        tables = RopeTables(head_dim, gh, gw)
        positions = torch.tensor([0, 3, 11, 900])
        cos, sin = rope_cos_sin(positions, tables.temporal_cos, tables.temporal_sin,
                                tables.spatial_cos, tables.spatial_sin)
        x = torch.randn(1, len(positions) * gh * gw, 2, head_dim)
        torch.testing.assert_close(apply_rope(x, cos, sin), _complex_rope_reference(x, positions, gh, gw),
                                   atol=5e-6, rtol=1e-5)


def test_rope_split_and_parameter_count_follow_the_config():
    assert rope_pair_split(128) == (22, 21, 21) and rope_pair_split(32) == (6, 5, 5)
    cfg = model_preset("wan-1.3b")
    with torch.device("meta"):  # the real module, no memory
        full = WanCausalDiT(cfg)
    per_block = sum(p.numel() for p in full.blocks[0].parameters())
    assert per_block == 46_440_704  # spec section 1.1
    assert param_count(cfg) == sum(p.numel() for p in full.parameters())
    tiny = model_preset("tiny")
    assert param_count(tiny) == sum(p.numel() for p in build_dit(tiny, random_state_dict(tiny)).parameters())


def test_one_exported_program_serves_every_block(golden_dit, golden_inputs):
    """torch.export (strict) traces the step once; that program, fed the loop's tensors, reproduces
    the golden trace through fill, first eviction and steady state."""
    name = "memrope_ema"
    run, trace = golden_run(name), golden_trace(name)
    pipeline = MemRoPEPipeline(EagerBackend(golden_dit, run), run)
    contract = step_contract(golden_dit.config, run, pipeline.layout, "float32", 1)
    flat = StepGraph(pipeline.backend.module, contract)
    exported = {}

    def exported_step(feeds):
        args = tuple(feeds[name] for name in contract.input_names)
        if "program" not in exported:
            exported["program"] = torch.export.export(flat, args, strict=True).module()
        return dict(zip(contract.output_names, exported["program"](*args), strict=True))

    pipeline.backend.step = exported_step
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], 3)
    latents = pipeline.generate(golden_inputs["prompt_embeds"], noise)
    torch.testing.assert_close(latents, trace["output_latents"], atol=1e-4, rtol=0)


def test_float32_sinusoid_matches_float64():
    from memrope.model import sinusoid_constants, sinusoidal_features

    t = torch.tensor([1000.0, 937.5, 833.3333129882812, 625.0, 0.0, 999.999, 3.3, 4095.5])
    half = 128
    omega = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -torch.arange(half, dtype=torch.float64) / half)
    angles = t.double()[:, None] * omega
    reference = torch.cat([angles.cos(), angles.sin()], dim=-1)
    ours = sinusoidal_features(t, **sinusoid_constants(256))
    assert ours.dtype == torch.float32
    assert float((ours.double() - reference).abs().max()) < 1e-6

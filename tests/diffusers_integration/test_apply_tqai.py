"""``apply_tqai`` / ``remove_tqai`` / ``tqai.patch`` on tiny random-weight WAN and LTX pipelines.

WAN runs CFG as two transformer calls per step (cache contexts ``cond`` and ``uncond``), LTX as
one ``2B`` batch (``cond_uncond``); each tiny transformer has 2 self-attention layers of 2 heads
of size 16. A WAN generation here has 8 tokens per frame pair (16 K vectors per call), LTX 192.
"""

from __future__ import annotations

import pytest
import torch
from tiny_video_models import (
    relative_error,
    run_ltx,
    run_wan,
    tiny_ltx_pipeline,
    tiny_wan_pipeline,
    tiny_wan_transformer,
)

import tqai
from tqai_diffusers import TqaiConfig, TqaiStats, apply_tqai, get_stats, remove_tqai
from tqai_diffusers.hooks import HOOK_NAMES

pytestmark = pytest.mark.integration

STEPS = 4
WAN_VECTORS = 16  # (B=1) x (H=2) x (T=8) per K or V call
LTX_VECTORS = 2 * 2 * 192  # (2B=2) x (H=2) x (T=192)


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_wan_pipeline()
    return pipe, run_wan(pipe, STEPS)


@pytest.fixture(scope="module")
def ltx():
    pipe = tiny_ltx_pipeline()
    return pipe, run_ltx(pipe, STEPS)


@pytest.fixture
def applied(request):
    """Removes tqai from whatever a test applied it to, even when the test fails."""
    targets = []
    yield targets.append
    for target in targets:
        remove_tqai(target)


def _module_state(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    return {name: tuple(sorted(vars(m))) for name, m in module.named_modules()}


def test_kv_hooks_fire_per_layer_stream_and_cfg_branch(wan, applied):
    pipe, base = wan
    apply_tqai(pipe, TqaiConfig(bits_k=4, bits_v=4))
    applied(pipe)
    out = run_wan(pipe, STEPS)
    stats = get_stats(pipe)
    expected = {(c, layer, s): STEPS for c in ("cond", "uncond") for layer in (0, 1) for s in "kv"}
    assert dict(stats.kv_calls) == expected
    assert torch.isfinite(out).all()
    assert 0 < relative_error(out, base) < 0.2  # compressed, not broken
    attn = pipe.transformer.blocks[0].attn1
    assert set(attn.norm_k._diffusers_hook.hooks) == {"tqai_kv"}
    assert set(attn.to_v._diffusers_hook.hooks) == {"tqai_kv"}
    assert not hasattr(pipe.transformer.blocks[0].attn2.to_v, "_diffusers_hook")  # cross-attn


def test_ltx_batched_cfg_is_one_context(ltx, applied):
    pipe, base = ltx
    apply_tqai(pipe, TqaiConfig(bits_k=8, bits_v=8))
    applied(pipe)
    out = run_ltx(pipe, STEPS)
    stats = get_stats(pipe)
    assert dict(stats.kv_calls) == {("cond_uncond", i, s): STEPS for i in (0, 1) for s in "kv"}
    assert torch.isfinite(out).all()
    assert 0 < relative_error(out, base) < 0.01  # 8 bits: close to the baseline


def test_more_bits_give_a_closer_final_latent(wan, applied):
    pipe, base = wan
    errors = []
    for bits in (2, 8):
        apply_tqai(pipe, TqaiConfig(bits_k=bits, bits_v=bits))
        errors.append(relative_error(run_wan(pipe, STEPS), base))
        remove_tqai(pipe)
    assert errors[1] < errors[0] / 10


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("delta", [[1, 0], [0, 1], [0, 1], [0, 1]]),
        ("delta2", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]),
    ],
)
def test_step_sharing_orders_without_fallback(wan, applied, strategy, expected):
    # fallback=False: step 0 has no history (full), then the highest order the history allows.
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig(strategy=strategy, strategy_kwargs={"fallback": False}))
    applied(pipe)
    run_wan(pipe, STEPS)
    counts = get_stats(pipe).order_counts
    for context in ("cond", "uncond"):
        for layer in (0, 1):
            for stream in "kv":
                got = [counts[(context, layer, stream, step)] for step in range(STEPS)]
                assert got == [[WAN_VECTORS * c for c in row] for row in expected]


def test_delta_predicts_within_a_cfg_branch_and_costs_one_flag_per_vector(wan, applied):
    pipe, base = wan
    apply_tqai(pipe, TqaiConfig(bits_k=4, bits_v=4))
    plain = relative_error(run_wan(pipe, STEPS), base)
    plain_bits = get_stats(pipe).bits
    remove_tqai(pipe)
    apply_tqai(pipe, TqaiConfig(bits_k=4, bits_v=4, strategy="delta"))
    applied(pipe)
    delta = relative_error(run_wan(pipe, STEPS), base)
    stats = get_stats(pipe)
    # Step 0 is coded in full; later steps mostly as deltas from the same branch's last step.
    assert stats.order_counts[("cond", 0, "k", 0)] == [WAN_VECTORS, 0]
    later = [stats.order_counts[("cond", 0, "k", s)][1] for s in range(1, STEPS)]
    assert min(later) > WAN_VECTORS // 2
    calls_after_first = sum(stats.kv_calls.values()) - 8  # 8 (context, layer, stream) keys
    assert stats.bits == plain_bits + calls_after_first * WAN_VECTORS  # one mode bit per vector
    assert delta < plain


def test_reset_between_generations_gives_identical_outputs(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig(strategy="delta2"))
    applied(pipe)
    first = run_wan(pipe, STEPS)
    states = pipe.transformer.blocks[0].attn1.to_v._diffusers_hook.hooks["tqai_kv"].states
    assert states.contexts == ()  # the pipeline reset the hooks before returning
    second = run_wan(pipe, STEPS)
    assert torch.equal(first, second)  # no delta history leaked from the first generation
    counts = get_stats(pipe).order_counts
    assert counts[("cond", 1, "v", 0)] == [2 * WAN_VECTORS, 0, 0]  # step 0 full, both times


def test_reset_state_through_diffusers_registry(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe.transformer, TqaiConfig(strategy="delta"))
    applied(pipe.transformer)
    hidden = torch.randn(1, 4, 2, 4, 4)
    call = {
        "hidden_states": hidden,
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "return_dict": False,
    }
    with torch.no_grad():
        pipe.transformer(**call)  # outside any cache_context: context "default"
        pipe.transformer(**call)
        states = pipe.transformer.blocks[0].attn1.to_v._diffusers_hook.hooks["tqai_kv"].states
        assert states.contexts == ("default",)
        pipe.transformer._reset_stateful_cache()
        assert states.contexts == ()
        pipe.transformer(**call)
    counts = get_stats(pipe.transformer).order_counts
    assert counts[("default", 0, "k", 0)] == [2 * WAN_VECTORS, 0]  # full again after the reset


def test_cfg_sharing_split_for_wan_codes_uncond_from_cond(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig(strategy="cfg_sharing"))
    applied(pipe)
    out = run_wan(pipe, STEPS)
    modes = get_stats(pipe).partner_modes
    assert torch.isfinite(out).all()
    assert set(modes) == {("uncond", i, s) for i in (0, 1) for s in "kv"}
    assert all(sum(m) == STEPS * WAN_VECTORS for m in modes.values())


def test_cfg_sharing_batched_for_ltx(ltx, applied):
    pipe, _ = ltx
    apply_tqai(pipe, TqaiConfig(strategy="cfg_sharing"))
    applied(pipe)
    out = run_ltx(pipe, STEPS)
    modes = get_stats(pipe).partner_modes
    assert torch.isfinite(out).all()
    assert set(modes) == {("cond_uncond", i, s) for i in (0, 1) for s in "kv"}
    assert all(sum(m) == STEPS * LTX_VECTORS // 2 for m in modes.values())


def test_cfg_sharing_mode_can_be_forced(ltx, applied):
    pipe, _ = ltx
    apply_tqai(pipe, TqaiConfig(strategy="cfg_sharing", strategy_kwargs={"mode": "split"}))
    applied(pipe)
    run_ltx(pipe, 2)
    assert get_stats(pipe).partner_modes  # step 1 is coded from step 0 (one context)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_window_reuses_attention_output_and_skips_the_work(applied):
    pipe = tiny_wan_pipeline()
    to_q = _count_calls(pipe.transformer.blocks[1].attn1.to_q)
    config = TqaiConfig(
        strategy="window", strategy_kwargs={"threshold": -1.0, "max_reuse": 2}, compress_kv=False
    )
    apply_tqai(pipe, config)
    applied(pipe)
    out = run_wan(pipe, 5)
    stats = get_stats(pipe)
    # threshold -1 always passes, so max_reuse decides: computed at steps 0 and 3.
    assert stats.attention == {(c, i): [2, 3] for c in ("cond", "uncond") for i in (0, 1)}
    assert to_q[0] == 2 * 2  # two computed steps per branch; reused steps never project
    assert torch.isfinite(out).all()
    assert stats.kv_calls == {}  # compress_kv=False


def test_window_with_an_unreachable_threshold_is_the_baseline(wan, applied):
    pipe, base = wan
    apply_tqai(
        pipe, TqaiConfig(strategy="window", strategy_kwargs={"threshold": 1.0}, compress_kv=False)
    )
    applied(pipe)
    out = run_wan(pipe, STEPS)
    # Inputs of different steps always differ a little, so nothing is reused: the hook only
    # forwards, and the output is bit-identical to the baseline.
    assert get_stats(pipe).reuse_fraction == 0.0
    assert torch.equal(out, base)


def test_window_with_kv_compression(ltx, applied):
    pipe, _ = ltx
    apply_tqai(pipe, TqaiConfig(strategy="window", strategy_kwargs={"threshold": -1.0}))
    applied(pipe)
    run_ltx(pipe, STEPS)
    stats = get_stats(pipe)
    computed = stats.attention[("cond_uncond", 0)][0]
    assert stats.kv_calls[("cond_uncond", 0, "k")] == computed  # only computed steps quantize


def test_skip_layers_leave_a_layer_untouched(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig(skip_layers=[1]))
    applied(pipe)
    run_wan(pipe, 2)
    assert {layer for _, layer, _ in get_stats(pipe).kv_calls} == {0}
    assert not hasattr(pipe.transformer.blocks[1].attn1.to_v, "_diffusers_hook")


def test_monitor_runs_in_the_pipeline(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig(bits_k=2, bits_v=2, monitor="stability"))
    applied(pipe)
    out = run_wan(pipe, STEPS)
    assert torch.isfinite(out).all()
    assert get_stats(pipe).bits_per_coord >= 2


def test_wan22_two_experts_are_both_hooked(applied):
    pipe = tiny_wan_pipeline(two_experts=True)
    apply_tqai(pipe, TqaiConfig())
    applied(pipe)
    run_wan(pipe, STEPS)
    high, low = get_stats(pipe.transformer), get_stats(pipe.transformer_2)
    assert sum(high.kv_calls.values()) > 0
    assert sum(low.kv_calls.values()) > 0
    assert sum(high.kv_calls.values()) + sum(low.kv_calls.values()) == STEPS * 2 * 2 * 2


def test_standard_attention_processor_transformer():
    # Any diffusers transformer with the classic Attention + AttnProcessor2_0 (here DiT).
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()  # fmt: skip
    x = torch.randn(2, 4, 8, 8)
    kwargs = {"timestep": torch.tensor([3, 3]), "class_labels": torch.tensor([1, 2])}
    errors = []
    with torch.no_grad():
        base = model(x, **kwargs).sample
        for bits in (2, 8):
            apply_tqai(model, TqaiConfig(bits_k=bits, bits_v=bits))
            out = model(x, **kwargs).sample
            calls = dict(get_stats(model).kv_calls)
            remove_tqai(model)
            assert calls == {("default", i, s): 1 for i in (0, 1) for s in "kv"}
            assert torch.isfinite(out).all()
            errors.append(relative_error(out, base))
    assert 0 < errors[1] < 0.01 < errors[0]


def test_remove_restores_modules_and_outputs_exactly(wan):
    pipe, base = wan
    before = _module_state(pipe.transformer)
    params = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    apply_tqai(pipe, TqaiConfig(strategy="window", strategy_kwargs={"threshold": 0.5}))
    assert _module_state(pipe.transformer) != before
    assert not torch.equal(run_wan(pipe, STEPS), base)
    remove_tqai(pipe)
    assert _module_state(pipe.transformer) == before
    assert all(torch.equal(v, params[k]) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(run_wan(pipe, STEPS), base)
    remove_tqai(pipe)  # a second remove is a no-op


def test_tqai_patch_routes_diffusers_pipelines_to_this_backend(ltx):
    pipe, base = ltx
    assert tqai.patching.resolve_backend(pipe).name == "diffusers"
    stats = tqai.patch(pipe, bits_k=8, bits_v=8, strategy="delta")
    try:
        assert isinstance(stats, TqaiStats)
        run_ltx(pipe, 2)
        assert stats.kv_calls[("cond_uncond", 0, "k")] == 2
    finally:
        tqai.unpatch(pipe)
    assert torch.equal(run_ltx(pipe, STEPS), base)


def test_apply_twice_is_refused(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig())
    applied(pipe)
    with pytest.raises(ValueError, match="already applied"):
        apply_tqai(pipe, TqaiConfig())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"bits_k": 9}, r"TqaiConfig\.bits_k must be in 1\.\.8"),
        ({"bits_v": "4"}, r"TqaiConfig\.bits_v must be an int"),
        ({"strategy": "delta3"}, r"TqaiConfig\.strategy must be one of None, 'delta', 'delta2'"),
        ({"adapter": "flux"}, r"TqaiConfig\.adapter must be one of None, 'wan', 'dit'"),
        ({"skip_layers": "0"}, r"TqaiConfig\.skip_layers must be a list"),
        ({"skip_layers": [-1]}, r"TqaiConfig\.skip_layers must hold layer indices"),
        ({"compress_kv": False}, r"compress_kv=False leaves nothing to do"),
        ({"rotation": "givens"}, r"TqaiConfig\.rotation must be one of 'haar', 'hadamard'"),
        ({"strategy_kwargs": [1]}, r"TqaiConfig\.strategy_kwargs must be a dict"),
    ],
)
def test_bad_config_fields_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        TqaiConfig(**fields)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            TqaiConfig(skip_layers=[5]),
            r"skip_layers must be self-attention layer indices in 0\.\.1",
        ),
        (TqaiConfig(monitor="nope"), r"config\['monitor'\] = 'nope' is not a tqai\.monitors"),
        (TqaiConfig(strategy="tiered"), r"needs a config\['scorer'\]; allowed values: .*palm"),
        (TqaiConfig(strategy="delta", strategy_kwargs={"order": 3}), r"strategy_kwargs"),
        (TqaiConfig(strategy="window", strategy_kwargs={"threshold": 2}), r"threshold"),
        (TqaiConfig(strategy="window", strategy_kwargs={"size": 2}), r"allowed keys: threshold"),
        (TqaiConfig(adapter="dit"), r"no self-attention layer that the 'dit' adapter recognises"),
        (TqaiConfig(scorer_kwargs={"alpha": 1}), r"scorer_kwargs is given but TqaiConfig\.scorer"),
    ],
)
def test_bad_config_fails_at_apply_and_changes_nothing(config, match):
    transformer = tiny_wan_transformer()
    before = _module_state(transformer)
    with pytest.raises(ValueError, match=match):
        apply_tqai(transformer, config)
    assert _module_state(transformer) == before


def test_bad_targets_are_refused():
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        apply_tqai(object(), TqaiConfig())
    with pytest.raises(TypeError, match="config must be a TqaiConfig"):
        apply_tqai(tiny_wan_transformer(), {"bits_k": 4})
    fused = tiny_wan_transformer()
    fused.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV projections"):
        apply_tqai(fused, TqaiConfig())
    with pytest.raises(ValueError, match="not applied"):
        get_stats(tiny_wan_transformer())


def test_hook_names_are_the_ones_registered():
    assert HOOK_NAMES == ("tqai_kv", "tqai_window")


def test_tiered_with_a_scorer_and_hadamard_rotation(wan, applied):
    pipe, _ = wan
    apply_tqai(pipe, TqaiConfig(strategy="tiered", scorer="palm", rotation="hadamard"))
    applied(pipe)
    out = run_wan(pipe, 2)
    assert torch.isfinite(out).all()
    # Plain K4/V2 costs exactly 4.0 bits/coord at D=16 (norms included); tiered adds
    # high-bit tokens and a routing bit per token.
    assert get_stats(pipe).bits_per_coord > 4.0


def test_remove_keeps_diffusers_own_hooks_on_the_same_modules():
    from diffusers import PyramidAttentionBroadcastConfig

    pipe = tiny_wan_pipeline()
    pab = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    )
    pipe.transformer.enable_cache(pab)  # hooks every attention module, attn1 included
    with_pab = run_wan(pipe, STEPS)
    before = _module_state(pipe.transformer)
    apply_tqai(pipe, TqaiConfig(strategy="window", strategy_kwargs={"threshold": 0.5}))
    attn = pipe.transformer.blocks[0].attn1
    assert list(attn._diffusers_hook.hooks) == ["pyramid_attention_broadcast", "tqai_window"]
    run_wan(pipe, STEPS)
    remove_tqai(pipe)
    assert list(attn._diffusers_hook.hooks) == ["pyramid_attention_broadcast"]
    assert _module_state(pipe.transformer) == before
    assert torch.equal(run_wan(pipe, STEPS), with_pab)


def test_kv_hook_refuses_an_unexpected_projection_shape(applied):
    transformer = tiny_wan_transformer()
    apply_tqai(transformer, TqaiConfig())
    applied(transformer)
    to_v = transformer.blocks[0].attn1.to_v
    with pytest.raises(ValueError, match=r"expected a \(B, T, H \* 16\) projection output"):
        to_v(torch.randn(2, 3, 4, 32))  # 4-D input: not a token sequence

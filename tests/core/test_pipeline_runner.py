"""CompressionPipeline: config resolution and errors, the plain path, skip_layers, bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from tqai import TurboQuantMSE, TurboQuantProd
from tqai._xp import namespace, namespace_name
from tqai.pipeline import (
    CONFIG_KEYS,
    CompressionPipeline,
    CompressionResult,
    PipelineConfigError,
    QuantizerBank,
    build_pipeline,
)
from tqai.pipeline.monitors.lyapunov import LyapunovMonitor
from tqai.pipeline.scorers.fisher import FisherScorer
from tqai.pipeline.strategies.tiered import TieredStrategy
from tqai.registry import registry
from tqai.testing import make_array, xp_assert_equal

D = 64


def _norm_dtype(xp) -> str:
    return "float16" if hasattr(xp, "float16") else "float32"


def _tokens(seed: int = 0, shape=(2, 2, 16, D)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_build_pipeline_none_is_the_plain_path():
    assert build_pipeline(None) is None


def test_build_pipeline_passes_a_pipeline_through():
    pipe = build_pipeline({"strategy": "delta"})
    assert build_pipeline(pipe) is pipe


@pytest.mark.parametrize("stream", ["k", "v"])
def test_pipeline_without_strategy_matches_plain_quantizer(xp, stream):
    # What a cache stores with pipeline=None is quantizer.quantize(x); a pipeline that only
    # quantizes (or a skipped layer) must reproduce it bit for bit.
    norm = _norm_dtype(xp)
    pipe = build_pipeline({"bits_k": 4, "bits_v": 2, "quantizer_kwargs": {"norm_dtype": norm}})
    x = make_array(xp, _tokens(), "float32")
    plain = TurboQuantMSE(D, 4 if stream == "k" else 2, norm_dtype=norm)
    qt = plain.quantize(x)

    out = pipe.compress(x, layer=0, stream=stream)

    xp_assert_equal(out.reconstruction, plain.dequantize(qt))
    xp_assert_equal(out.payload[0].packed, qt.packed)
    assert out.bits == 8 * qt.nbytes
    assert out.bits_per_coord == pytest.approx(qt.bits_per_coordinate)


def test_skipped_layer_is_plain_and_not_handled(xp):
    norm = _norm_dtype(xp)
    pipe = build_pipeline(
        {
            "scorer": "palm",
            "strategy": "tiered",
            "skip_layers": [0, 5],
            "bits_k": 3,
            "quantizer_kwargs": {"norm_dtype": norm},
        }
    )
    x = make_array(xp, _tokens(1), "float32")
    plain = TurboQuantMSE(D, 3, norm_dtype=norm)

    assert not pipe.handles(0)
    assert pipe.handles(1)
    xp_assert_equal(pipe.compress(x, layer=0).reconstruction, plain.dequantize(plain.quantize(x)))
    assert pipe.compress(x, layer=1).info["high_tokens"] == 32


def test_compress_returns_input_namespace_dtype_and_shape(xp):
    pipe = build_pipeline(
        {"scorer": "fisher", "strategy": "tiered", "quantizer_kwargs": {"norm_dtype": "float32"}}
    )
    x = make_array(xp, _tokens(2), "float32")

    out = pipe.compress(x, layer=3, stream="v")

    assert isinstance(out, CompressionResult)
    assert namespace_name(namespace(out.reconstruction)) == namespace_name(namespace(x))
    assert tuple(out.reconstruction.shape) == tuple(x.shape)
    assert out.reconstruction.dtype == x.dtype


def test_compress_kv_uses_each_stream_width():
    pipe = build_pipeline({"bits_k": 4, "bits_v": 2})
    k, v = pipe.compress_kv(_tokens(3), _tokens(4), layer=0)

    assert (k.n_bits, v.n_bits) == (4, 2)
    assert k.bits_per_coord == pytest.approx(4 + 16 / D)
    assert v.bits_per_coord == pytest.approx(2 + 16 / D)
    assert pipe.bits_per_coord("k") == pytest.approx(4 + 16 / D)
    assert pipe.bits_per_coord() == pytest.approx(3 + 16 / D)


def test_prod_quantizer_is_resolved_through_the_registry():
    pipe = build_pipeline({"strategy": "delta", "quantizer": "prod", "bits_k": 3})
    out = pipe.compress(_tokens(5), layer=0)

    assert isinstance(pipe.quantizers.get(D, 3), TurboQuantProd)
    assert out.payload[0].spec.kind == "prod"


def test_steps_are_counted_per_layer_and_stream():
    seen = []

    class Spy:
        def score(self, x, *, layer=None, step=None, stream=None):
            seen.append((layer, stream, step))
            return np.ones(x.shape[:-1], dtype=np.float32)

        def reset(self):
            seen.append("reset")

    pipe = CompressionPipeline(scorer=Spy(), strategy=TieredStrategy())
    x = _tokens(6)
    for _ in range(2):
        pipe.compress_kv(x, x, layer=0)
        pipe.compress(x, layer=1)
    pipe.compress(x, layer=1, step=10)
    pipe.compress(x, layer=1)
    pipe.reset()
    pipe.compress(x, layer=0)

    assert seen == [
        (0, "k", 0), (0, "v", 0), (1, "k", 0),
        (0, "k", 1), (0, "v", 1), (1, "k", 1),
        (1, "k", 10), (1, "k", 11), "reset", (0, "k", 0),
    ]  # fmt: skip


def test_monitor_moves_the_width_and_is_clamped():
    class Greedy:
        def observe(self, x, result, **context):
            pass

        def adjust(self, n_bits, *, layer=None, stream=None):
            return n_bits + 20

        def reset(self):
            pass

    out = CompressionPipeline(monitor=Greedy(), bits_k=3).compress(_tokens(7), layer=0)
    assert out.n_bits == 8


def test_monitor_returning_a_non_int_is_an_error():
    class Broken:
        def observe(self, x, result, **context):
            pass

        def adjust(self, n_bits, *, layer=None, stream=None):
            return 3.5

        def reset(self):
            pass

    with pytest.raises(TypeError, match=r"adjust returned 3\.5"):
        CompressionPipeline(monitor=Broken()).compress(_tokens(8), layer=0)


def test_scores_of_the_wrong_shape_are_an_error():
    class Flat:
        def score(self, x, **context):
            return np.ones(x.shape[-2], dtype=np.float32)

        def reset(self):
            pass

    pipe = CompressionPipeline(scorer=Flat(), strategy=TieredStrategy())
    with pytest.raises(ValueError, match=r"expected x\.shape\[:-1\]"):
        pipe.compress(_tokens(9), layer=0)


def test_instances_and_classes_are_accepted():
    pipe = build_pipeline(
        {"scorer": FisherScorer(), "strategy": TieredStrategy, "strategy_kwargs": {"fraction": 1}}
    )
    assert pipe.compress(_tokens(10), layer=0).info["high_tokens"] == 64


def test_reset_reaches_every_plugin():
    monitor = LyapunovMonitor()
    pipe = build_pipeline({"strategy": "delta", "monitor": monitor})
    for t in range(3):
        pipe.compress(_tokens(11) * (1 + t) ** 2, layer=0)
    assert monitor.rate(layer=0, stream="k") != 0.0

    pipe.reset()

    assert monitor.rate(layer=0, stream="k") == 0.0
    assert pipe.compress(_tokens(11), layer=0).info["order_counts"] == (64, 0)


def test_unknown_stream_is_an_error():
    with pytest.raises(ValueError, match="stream must be one of k, v"):
        build_pipeline({}).compress(_tokens(12), stream="q")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"scorers": "palm"}, r"unknown pipeline config key\(s\) 'scorers'; allowed keys: scorer"),
        ({"scorer": "nope", "strategy": "tiered"}, r"config\['scorer'\] = 'nope' .*'palm'"),
        ({"strategy": "zip"}, r"config\['strategy'\] = 'zip' .*allowed values: .*'tiered'"),
        ({"monitor": "nope"}, r"config\['monitor'\] .*allowed values: .*'stability'"),
        ({"adapter": "gpt"}, r"config\['adapter'\] .*allowed values: .*'llm'"),
        ({"quantizer": "int8"}, r"config\['quantizer'\] = 'int8' .*allowed values: .*'mse'"),
        ({"bits_k": 9}, r"config\['bits_k'\] must be in 1\.\.8, got 9"),
        ({"bits_v": "4"}, r"config\['bits_v'\] must be an integer in 1\.\.8"),
        ({"skip_layers": [1, -2]}, r"config\['skip_layers'\] must hold layer indices"),
        ({"skip_layers": "0,1"}, r"config\['skip_layers'\] must be a list"),
        ({"scorer_kwargs": {"momentum": 0.5}}, r"config\['scorer_kwargs'\] is given but"),
        (
            {"strategy": "tiered", "scorer": "palm", "strategy_kwargs": {"fractoin": 0.1}},
            r"config\['strategy_kwargs'\] = \{'fractoin': 0\.1\} does not fit strategy 'tiered'",
        ),
        (
            {"strategy": "tiered", "scorer": "palm", "strategy_kwargs": {"fraction": 2.0}},
            r"does not fit strategy 'tiered': fraction must be in \[0, 1\]",
        ),
        ({"strategy": "tiered", "strategy_kwargs": [1]}, r"must be a dict of keyword arguments"),
        ({"strategy": "tiered"}, r"'tiered' routes tokens by score and needs a config\['scorer'\]"),
        ({"scorer": "palm"}, r"config\['scorer'\] = 'palm' needs a config\['strategy'\]"),
        ({"strategy": 42}, r"config\['strategy'\] must be a tqai\.strategies plugin name"),
        (
            {"strategy": TieredStrategy(), "strategy_kwargs": {"fraction": 0.1}},
            r"config\['strategy'\] is an instance",
        ),
        (
            {"strategy": "delta", "adapter": "llm"},
            r"'delta' requires model features recomputed_kv, which config\['adapter'\] = 'llm'",
        ),
        ({"strategy": "cfg_sharing", "adapter": "llm"}, r"requires model features cfg"),
    ],
)
def test_bad_config_names_the_key_and_the_allowed_values(config, message):
    with pytest.raises(PipelineConfigError, match=message):
        build_pipeline(config)


def test_direct_construction_checks_the_protocols():
    with pytest.raises(PipelineConfigError, match="strategy must implement Strategy"):
        CompressionPipeline(strategy=FisherScorer())


def test_config_must_be_a_mapping():
    with pytest.raises(PipelineConfigError, match="must be a dict with keys from scorer"):
        build_pipeline(["palm"])


def test_adapters_accept_the_strategies_their_models_run():
    for adapter, strategy in [("dit", "delta2"), ("wan", "window"), ("wan", "cfg_sharing")]:
        pipe = build_pipeline({"adapter": adapter, "strategy": strategy})
        assert pipe.adapter.name == adapter
    assert build_pipeline({"adapter": "llm", "scorer": "palm", "strategy": "tiered"}) is not None


def test_every_built_in_config_key_is_documented():
    assert set(CONFIG_KEYS) == {
        *("scorer", "strategy", "monitor", "adapter"),
        *("scorer_kwargs", "strategy_kwargs", "monitor_kwargs", "adapter_kwargs"),
        *("skip_layers", "bits_k", "bits_v", "quantizer", "quantizer_kwargs"),
    }


def test_every_built_in_plugin_is_declared_by_tqai_core():
    expected = {
        "tqai.scorers": {"palm", "snr", "fisher", "fisher_static", "sheaf", "bsa"},
        "tqai.strategies": {"tiered", "delta", "delta2", "window", "cfg_sharing"},
        "tqai.monitors": {"stability", "lyapunov"},
        "tqai.adapters": {"llm", "dit", "wan"},
    }
    for group, names in expected.items():
        infos = {i.name: i for i in registry(group).entries()}
        assert names <= set(infos), group
        assert {infos[n].package for n in names} == {"tqai-core"}
        for name in names:
            assert registry(group).get(name).name == name


def test_quantizer_bank_builds_each_width_once():
    bank = QuantizerBank(options={"seed": 3})
    assert bank.get(D, 2) is bank.get(D, 2)
    assert bank.get(D, 2) is not bank.get(D, 3)
    assert bank.get(D, 2).spec.seed == 3

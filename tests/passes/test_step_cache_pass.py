"""The step_cache pass on diffusers transformers nobody here wrote (small configs, random weights).

Before: a captured denoiser. After: one ``step_cache`` node holding its blocks.
Expected: with a policy that never reuses, the emitted module equals the
uncached graph exactly; with a fixed interval of 2, half the block evaluations
after warm-up are skipped (counted, not timed).
"""
import functools

import pytest
import torch

import graphopt
from graphopt import models
from graphopt.errors import InvalidOptionError, UnsupportedModelError
from graphopt.passes.step_cache.runtime import StepCache

ARCHITECTURES = {
    "dit": (models.build_dit, False),
    "pixart": (models.build_pixart, True),
    "cogvideox": (models.build_cogvideox, True),
    "flux": (lambda: models.build_flux(2), False),
    "sd3": (lambda: models.build_sd3(3), True),
    "sana": (models.build_sana, True),
    "wan": (models.build_wan, True),
    "hunyuan_video": (lambda: models.build_hunyuan_video(2), True),
    "ltx_video": (models.build_ltx_video, True),
    "mochi": (lambda: models.build_mochi(3), True),
    "auraflow": (lambda: models.build_auraflow(2, 6), True),
    "allegro": (models.build_allegro, True),
}


def cases():
    return [pytest.param(name, marks=pytest.mark.slow) if slow else name for name, (_, slow) in ARCHITECTURES.items()]


def at_step(inputs, position, k):
    """The inputs of sampling step ``k``: the timestep decreases."""
    t = inputs[position]
    later = (t.float() * (1.0 - 0.1 * k)).to(t.dtype) if t.is_floating_point() else t - k
    return tuple(later if i == position else x for i, x in enumerate(inputs))


@functools.lru_cache(maxsize=None)
def captured(name):
    """Each architecture is built and captured once; tests rewrite clones."""
    model, inputs = ARCHITECTURES[name][0]()
    return model, inputs, graphopt.capture(model, inputs)


def cached(name, options):
    model, inputs, graph = captured(name)
    graph = graph.clone()
    plain = graph.clone().to_torch()
    graphopt.optimize(graph, level="O0", passes=["step_cache"], options={"step_cache": options})
    return model, inputs, graph, plain, graph.to_torch()


def step_cache_of(module):
    return next(m for m in module.modules() if isinstance(m, StepCache))


@pytest.mark.parametrize("name", cases())
def test_no_reuse_equals_uncached_exactly(name):
    model, inputs, graph, plain, module = cached(name, {"policy": "none"})
    assert graph.op_counts()["step_cache"] == 1
    position = model.arg_names.index("timestep")
    with torch.no_grad():
        for k in range(3):
            step = at_step(inputs, position, k)
            assert torch.equal(module(*step), plain(*step))
    assert step_cache_of(module).report()["runs"][0]["skipped"] == 0


@pytest.mark.parametrize("name", cases())
def test_interval_2_skips_half_the_block_evaluations(name):
    model, inputs, graph, _, module = cached(name, {"policy": "fora", "interval": 2, "warmup": 0})
    cache = step_cache_of(module)
    position = model.arg_names.index("timestep")
    with torch.no_grad():
        for k in range(6):
            module(*at_step(inputs, position, k))
    run = cache.report()["runs"][0]
    batch = inputs[0].shape[0]
    assert run["calls"] == 6
    assert run["skipped"] == 3 * cache.cached * batch  # steps 1, 3, 5 reuse every cached block
    assert run["evaluated"] == (3 * cache.cached + 6 * cache.tail) * batch


def test_the_timestep_is_found_by_dataflow():
    model, _, graph, _, _ = cached("flux", {"policy": "none"})
    node = graph.find("step_cache")[0]
    assert node.inputs[node.attrs["timestep"]] is graph.inputs[model.arg_names.index("timestep")]


def test_a_symbolic_batch_marks_the_inputs_a_subset_of_samples_can_run_on():
    """Captured with the batch symbolic, the node lists the inputs with a row per sample (the streams, the
    pooled text and timestep it reads), not the rotary tables; captured static, it lists none."""
    model, inputs = models.build_flux(2)
    inputs = tuple(x.expand(2, *x.shape[1:]).clone() if k < 4 else x for k, x in enumerate(inputs))
    for dynamic in ({k: {0: "batch?"} for k in range(4)}, None):
        graph = graphopt.capture(model, inputs, dynamic=dynamic)
        graphopt.optimize(graph, level="O0", passes=["step_cache"], options={"step_cache": {"policy": "none"}})
        node = graph.find("step_cache")[0]
        batched = set(node.attrs["batched"])
        if dynamic is None:
            assert batched == set()
            continue
        read = {model.arg_names[graph.inputs.index(v)] for k, v in enumerate(node.inputs) if k in batched
                and v in graph.inputs}
        assert set(range(node.attrs["streams"])) <= batched and read == {"pooled_projections", "timestep"}
        assert len(batched) < len(node.inputs)  # the rotary cos/sin tables are shared by every sample


def test_a_model_without_repeated_blocks_gets_one_line():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    graph = graphopt.capture(model, (torch.randn(1, 3, 16, 16),))
    with pytest.raises(UnsupportedModelError, match="step_cache found no repeated blocks"):
        graphopt.optimize(graph, level="O0", passes=["step_cache"])


@pytest.mark.parametrize("options, message", [
    ({"policy": "sometimes"}, "unknown step_cache policy 'sometimes'"),
    ({"policy": "fora", "threshold": 0.1}, "step_cache policy fora has no option threshold"),
    ({"policy": "magcache"}, "magcache reads calibrated span_log_ratio_rate"),
    ({"policy": "fora", "speed": 2}, "pass step_cache has no option speed"),
])
def test_bad_options_get_one_line(options, message):
    graph = captured("flux")[2].clone()
    with pytest.raises(InvalidOptionError, match=message):
        graphopt.optimize(graph, level="O0", passes=["step_cache"], options={"step_cache": options})


def test_onnx_export_of_a_cached_graph_is_refused_clearly():
    graph = cached("dit", {"policy": "fora"})[2]
    with pytest.raises(Exception, match="keeps state across calls"):
        graph.to_onnx()


def test_through_torch_compile():
    model, inputs, _ = captured("flux")
    compiled = torch.compile(model, backend="graphopt", options={
        "passes": ["step_cache"], "pass_options": {"step_cache": {"policy": "fora", "interval": 2}}})
    position = model.arg_names.index("timestep")
    with torch.no_grad():
        outs = [compiled(*at_step(inputs, position, k)) for k in range(4)]
        eager = [model(*at_step(inputs, position, k)) for k in range(4)]
    torch.testing.assert_close(outs[2], eager[2])  # computed after warm-up
    assert not torch.allclose(outs[3], eager[3])  # reused

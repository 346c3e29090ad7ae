"""The ONNX model zoo's "light" set shipped in the onnx wheel (opset 9): converted, optimized, same outputs.

The nine CNNs (AlexNet to DenseNet-121) keep their weights as ConstantOfShape
nodes, so they are small files whose outputs are still real networks' outputs.
They are older than opset 13, so each load goes through onnx's version
converter; then O2 and the ONNX emitter, and onnxruntime must give the
original model's outputs on the emitted one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphopt

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# five seconds or more each on two shared cores (VGG-19's and AlexNet's dense layers hold 0.5 GB
# once O2 folds their ConstantOfShape weights); the fast suite keeps the other four
SLOW = {"light_densenet121", "light_inception_v2", "light_vgg19", "light_bvlc_alexnet", "light_resnet50"}
MODELS = [pytest.param(p.stem, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else [])
          for p in sorted(LIGHT.glob("light_*.onnx"))]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_the_light_set_is_all_there_and_older_than_opset_13() -> None:
    assert len(MODELS) == 9
    for path in LIGHT.glob("light_*.onnx"):
        assert onnx.load(path).opset_import[0].version == 9, path


@pytest.mark.parametrize("name", MODELS)
def test_light_model_is_converted_optimized_and_gives_the_same_outputs(name: str) -> None:
    path = LIGHT / f"{name}.onnx"
    original = onnx.load(path)
    graph = graphopt.load_onnx(path)
    assert graph.meta["onnx"]["converted_from_opset"] == 9
    optimized = graphopt.optimize(graph, "O2")
    emitted = optimized.to_onnx()
    assert {o.domain: o.version for o in emitted.opset_import}[""] == 13
    assert len(emitted.graph.node) < len(original.graph.node)

    before, after = _session(original), _session(emitted)
    # IR version 3 lists every initializer as an input too; they stay constants, as onnxruntime keeps them
    assert [(i.name, i.shape) for i in after.get_inputs()] == [(i.name, i.shape) for i in before.get_inputs()]
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.random(i.shape, dtype=np.float32) for i in before.get_inputs()}
    expected, actual = before.run(None, feeds), after.run(None, feeds)
    # the outputs are softmax probabilities of logits near 1e10 (constant weights): float
    # reassociation moves them by a few 1e-3, while a wrong graph moves them by up to 1
    for want, got in zip(expected, actual):
        assert got.shape == want.shape and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-3)
    shipped = numpy_helper.to_array(onnx.load_tensor(os.fspath(LIGHT / f"{name}_output_0.pb")))
    assert shipped.shape == expected[0].shape


def test_the_cli_converts_an_old_model_says_so_once_and_writes_opset_13(tmp_path, capsys) -> None:
    from graphopt.cli import main

    out = tmp_path / "shufflenet.opt.onnx"
    assert main(["optimize", str(LIGHT / "light_shufflenet.onnx"), "-o", str(out), "--check", "1"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "converted" in line]
    assert said == ["graphopt: converted light_shufflenet.onnx from opset 9 to 13 (onnx version converter)"], err
    written = onnx.load(out)
    assert {o.domain: o.version for o in written.opset_import}[""] == 13
    onnx.checker.check_model(written, full_check=True)

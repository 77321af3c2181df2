"""The seam between the model's math and the acceleration layer (uio.model.ops, uio.accel): what
registering, switching and ``UIO_ACCEL=0`` do, and the rule that model code never reaches past it."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uio import accel
from uio.accel import transformer_ops
from uio.model import ops

MODEL_SOURCES = sorted((Path(__file__).resolve().parents[2] / "src" / "uio" / "model").glob("*.py"))


def test_registering_replaces_an_operation_until_reset():
    def doubled(x, weight):
        return 2 * ops.REFERENCE["linear"](x, weight)

    ops.reset()
    assert ops.registered() == {} and ops.linear is ops.REFERENCE["linear"]
    ops.register("linear", doubled)
    assert ops.registered() == {"linear": doubled} and ops.linear is doubled
    ops.reset()
    assert ops.registered() == {} and all(getattr(ops, name) is ops.REFERENCE[name] for name in ops.NAMES)


def test_registering_an_unknown_operation_raises_and_names_the_known_ones():
    with pytest.raises(KeyError, match="no operation 'linaer' in the seam: one of linear, project"):
        ops.register("linaer", lambda x, weight: x)
    assert "linaer" not in vars(ops)


def test_enable_and_disable_switch_every_fast_operation():
    accel.disable()
    assert not accel.enabled() and ops.registered() == {} and not accel.switched_on()  # stays off
    accel.enable()
    assert accel.enabled() and ops.registered()["linear"] is transformer_ops.linear
    assert set(ops.registered()) >= set(transformer_ops.FAST_OPS)
    assert accel.switched_on()


@pytest.mark.parametrize("before", ["enabled", "disabled"])
def test_disabled_gives_the_reference_operations_within_and_what_was_before_after(before):
    accel.enable() if before == "enabled" else accel.disable()
    registered = ops.registered()
    with accel.disabled():
        assert ops.registered() == {} and not accel.switched_on()
        with accel.disabled():
            assert ops.registered() == {}
        assert ops.registered() == {}
    assert ops.registered() == registered and accel.switched_on() == (before == "enabled")
    with pytest.raises(RuntimeError, match="inside"), accel.disabled():
        raise RuntimeError("inside")
    assert ops.registered() == registered
    with accel.disabled():
        accel.enable()  # switched on within: off again after, where it was off before
    assert ops.registered() == registered and accel.switched_on() == (before == "enabled")


# Run by a child process with UIO_ACCEL=0: the model it builds, on the reference path, and its tokens.
PLAIN_RUN = """import json, sys
import numpy as np
from PIL import Image
from uio import accel
from uio.model import ops
from uio.runner import ModelRunner

runner = ModelRunner.from_pretrained(**json.loads(sys.argv[1]))
weights = [p for p in runner.model.parameters() if p.dim() == 2]
image = np.array(Image.open(sys.argv[2]).convert("RGB"))
out = runner.run([image], [sys.argv[3]], output_text_len=8, num_decodes=2)
print(json.dumps({
    "enabled": accel.enabled(), "registered": sorted(ops.registered()),
    "contiguous": all(w.is_contiguous() for w in weights),
    "own_storage": all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in weights),
    "text_tokens": out["text_tokens"].tolist(), "score": out["score"].tolist()}))
"""


def test_uio_accel_0_builds_a_plain_model_on_the_reference_path_with_the_same_outputs(tiny_runner, tiny_runner_options,
                                                                                       conformance, test_image):
    """With ``UIO_ACCEL=0`` a model is built with the reference operations and plain weights (each
    contiguous in a tensor of its own: no fused matrix, no transposed layout) and generates the
    tokens the accelerated model generates."""
    prompt = "what is on the left ?"
    child = subprocess.run([sys.executable, "-c", PLAIN_RUN, json.dumps(tiny_runner_options),
                            str(conformance / "golden" / "test_image.png"), prompt],
                           env={**os.environ, "UIO_ACCEL": "0"}, capture_output=True, text=True, timeout=300,
                           check=False)
    assert child.returncode == 0, child.stderr
    plain = json.loads(child.stdout.strip().splitlines()[-1])
    assert plain["enabled"] is False and plain["registered"] == []
    assert plain["contiguous"] and plain["own_storage"]
    accelerated = tiny_runner.run([test_image], [prompt], output_text_len=8, num_decodes=2)
    mlp = tiny_runner.model.decoder.layers[0].mlp
    assert ops.registered() and transformer_ops.fused([mlp.wi_0.weight, mlp.wi_1.weight]) is not None
    np.testing.assert_array_equal(plain["text_tokens"], accelerated["text_tokens"])
    np.testing.assert_allclose(plain["score"], accelerated["score"], rtol=1e-5)


def reaches_past_the_seam(source: Path) -> list[str]:
    """What ``source`` imports or names of the acceleration layer: uio.accel, uio's CPU kernels,
    oneDNN's operators, or torch.compile's state (the model's math must not depend on how it runs)."""
    tree = ast.parse(source.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [name for name in names if "accel" in name.split(".") or name.endswith("cpu_kernels")]
    text = source.read_text()
    found += [word for word in ("torch.ops.mkldnn", "cpu_kernels", "is_compiling") if word in text]
    return found


@pytest.mark.parametrize("source", MODEL_SOURCES, ids=lambda path: path.name)
def test_model_code_reaches_nothing_past_the_seam(source):
    assert reaches_past_the_seam(source) == []


def test_the_seam_rule_catches_what_it_forbids(tmp_path):
    source = tmp_path / "module.py"
    for line in ("from uio.accel import layout", "from ..accel.packing import pack_weight", "import uio.accel",
                 "from . import cpu_kernels", "y = torch.ops.mkldnn._linear_pointwise(x)",
                 "fast = torch.compiler.is_compiling()"):
        source.write_text(line + "\n")
        assert reaches_past_the_seam(source), line
    source.write_text("from . import ops\nfrom ..config import UnifiedIOConfig\n")
    assert reaches_past_the_seam(source) == []

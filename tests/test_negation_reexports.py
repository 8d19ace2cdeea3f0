"""``fedunlearn.negation`` still exports the names that moved to ``fedunlearn.layers`` and
``fedunlearn.param_specs`` (kept for one release), as the very same objects."""

from __future__ import annotations

import pytest

from fedunlearn import layers, negation, param_specs


@pytest.mark.parametrize("module, name", [
    (layers, "LayerInfo"), (layers, "example_input_for"), (layers, "first_layer"),
    (layers, "is_affine_layer"), (layers, "is_norm_layer"), (layers, "trace_layers"),
    (param_specs, "spec_view"), (param_specs, "split_spec"),
])
def test_moved_name_is_reexported(module, name):
    assert name in negation.__all__
    assert getattr(negation, name) is getattr(module, name)

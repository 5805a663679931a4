"""The one activation table (fusednorm/activations.py): the ids every backend compiles in, and the
native torch forms that models, conversion and benchmarks take from it."""
import pytest
import torch

from fusednorm import ops
from fusednorm.activations import (ACTIVATIONS, activation_module, activation_of_module,
                                   native_activation, parse_activation)

TABLE_IDS = {name: parse_activation(name)[0].id for name in ACTIVATIONS}
SPECS = ["identity", "relu", "silu", "gelu", "gelu_tanh", ("leaky_relu", 0.2)]


def test_ids_are_distinct_and_dense():
    assert sorted(TABLE_IDS.values()) == list(range(len(ACTIVATIONS)))


def test_triton_kernels_use_the_table_ids():
    if not ops.triton_available():
        pytest.skip(f"triton is not importable: {ops.TRITON_IMPORT_ERROR}")
    from fusednorm.kernels import activations as triton_activations

    compiled_in = {name: getattr(triton_activations, name.upper()).value for name in ACTIVATIONS}
    assert compiled_in == TABLE_IDS


def test_extension_uses_the_table_ids():
    if ops.EXTENSION_IMPORT_ERROR is not None:
        pytest.skip(f"the C++ extension is not built: {ops.EXTENSION_IMPORT_ERROR}")
    from fusednorm import _C

    assert dict(_C.activation_ids) == TABLE_IDS


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_native_forms_compute_the_table_formula(spec):
    act, slope = parse_activation(spec)
    z = torch.linspace(-6, 6, 101, dtype=torch.float64)
    expected = act.value(z, slope)
    torch.testing.assert_close(native_activation(spec)(z), expected)
    torch.testing.assert_close(activation_module(spec)(z), expected)


@pytest.mark.parametrize("spec", [s for s in SPECS if s != "identity"], ids=str)
def test_activation_of_module_inverts_activation_module(spec):
    assert activation_of_module(activation_module(spec)) == spec


def test_activation_of_module_is_none_for_other_modules():
    assert activation_of_module(torch.nn.Identity()) is None
    assert activation_of_module(torch.nn.Tanh()) is None

"""Activation value and derivative as Triton device functions.

``ACT`` is an id of the table in ``fusednorm/activations.py`` (imported below as constexprs);
``slope`` is used by leaky_relu only. Both take and return the compute dtype.
"""
import triton
import triton.language as tl

from .. import activations as _table

# The table's ids as constexprs (a jitted function may only read constexpr globals).
IDENTITY = tl.constexpr(_table.IDENTITY)
RELU = tl.constexpr(_table.RELU)
SILU = tl.constexpr(_table.SILU)
GELU = tl.constexpr(_table.GELU)
GELU_TANH = tl.constexpr(_table.GELU_TANH)
LEAKY_RELU = tl.constexpr(_table.LEAKY_RELU)

# Globals that a jitted function reads must be tl.constexpr: the compiler rejects plain floats
# (the interpreter does not notice). Each is written right of a tensor operand: the interpreter
# cannot multiply a constexpr on the left by a tensor.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh via the logistic function: exact limits at +-inf, no libdevice (runs in the interpreter).
    return 2.0 * _sigmoid(2.0 * z) - 1.0


@triton.jit
def act_value(z,                 # tensor in the compute dtype
              ACT: tl.constexpr,  # activation id (IDENTITY .. LEAKY_RELU)
              slope):             # leaky_relu's negative slope, a scalar of z's dtype
    if ACT == RELU:
        # where(z < 0, 0, z) rather than maximum: keeps NaN as NaN
        out = tl.where(z < 0, 0.0, z)
    elif ACT == SILU:
        out = z * _sigmoid(z)
    elif ACT == GELU:
        out = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT_2))
    elif ACT == GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACT == LEAKY_RELU:
        out = tl.where(z > 0, z, z * slope)
    else:
        out = z
    return out


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):  # the derivative of act_value, same arguments
    if ACT == RELU:
        out = tl.where(z > 0, 1.0, 0.0)
    elif ACT == SILU:
        sig = _sigmoid(z)
        out = sig * (1.0 + z * (1.0 - sig))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT_2))
        out = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == GELU_TANH:
        t = _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * 3.0 * _GELU_TANH_C)
    elif ACT == LEAKY_RELU:
        # "+ 0 * z" keeps the select in z's dtype (a bare scalar select would round to fp32)
        out = tl.where(z > 0, 1.0 + 0.0 * z, slope + 0.0 * z)
    else:
        out = z * 0.0 + 1.0
    return out.to(z.dtype)

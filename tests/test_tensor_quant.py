"""tensor_quant against a numpy reference and torch's fused fake-quant kernels."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from qcourse import tensor_quant as tq
from qcourse.tensor_quant import QuantDescriptor, fake_tensor_quant, tensor_quant

from oracles import np_quant


# ------------------------------------------------------------------ the course's example
def test_seed_example_exact():
    torch.manual_seed(12345)
    x = torch.rand(10)
    codes, scale = tensor_quant(x, x.abs().max())
    assert codes.tolist() == [126, 113, 127, 59, 11, 23, 47, 73, 43, 27]
    assert round(float(scale), 4) == 128.0057
    fq = fake_tensor_quant(x, x.abs().max())
    expected = [0.9843, 0.8828, 0.9921, 0.4609, 0.0859, 0.1797, 0.3672, 0.5703, 0.3359, 0.2109]
    assert [round(v, 4) for v in fq.tolist()] == expected


# ------------------------------------------------------------------ against numpy
@pytest.mark.parametrize("num_bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
def test_matches_numpy_reference(num_bits, unsigned, narrow):
    g = torch.Generator().manual_seed(num_bits * 7 + unsigned * 3 + narrow)
    x = torch.randn(4096, generator=g) * 3
    if unsigned:
        x = x.abs()
    amax = 2.5  # clips part of the tail
    codes, scale = tensor_quant(x, amax, num_bits, unsigned, narrow)
    fq = fake_tensor_quant(x, amax, num_bits, unsigned, narrow)
    ref_codes, ref_fq, step = np_quant(x.numpy(), amax, num_bits, unsigned, narrow)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    np.testing.assert_array_equal(fq.numpy(), ref_fq)
    assert float(scale) == pytest.approx((2 ** (num_bits - 1 + unsigned) - 1) / amax, rel=1e-6)
    lo, hi = tq.quant_bounds(num_bits, unsigned, narrow)
    assert codes.min() >= lo and codes.max() <= hi
    assert codes.max() == hi and (unsigned or codes.min() == lo)  # the tails really were clipped


def test_large_tensor_chunked_path_matches_numpy():
    # > 1M elements takes the cache-blocked path
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * (1 << 20) + 17, generator=g)
    fq = fake_tensor_quant(x, 2.0, narrow_range=False)
    np.testing.assert_array_equal(fq.numpy(), np_quant(x.numpy(), 2.0, 8, False, False)[1])


def test_per_channel_matches_numpy():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=g)
    amax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    amax[3] = 0.0  # a dead channel quantizes to zero
    fq = fake_tensor_quant(w, amax)
    ref = np_quant(w.numpy(), amax.numpy())[1]
    np.testing.assert_array_equal(fq.numpy(), ref)
    assert torch.all(fq[3] == 0)


# ------------------------------------------------------------------ against torch's kernels
def _assert_close_to_torch(ours, theirs, step):
    """torch multiplies by 1/scale, ONNX and qcourse divide by scale: they may differ by one
    step on the rare elements that sit within an ulp of a rounding tie."""
    diff = (ours - theirs).abs()
    n_bad = int((diff > 0).sum())
    assert n_bad <= max(2, ours.numel() // 100000), n_bad
    if n_bad:
        assert float((diff / step).max()) <= 1.0 + 1e-5


@pytest.mark.parametrize("narrow", [False, True])
def test_per_tensor_matches_torch_fused_kernel(narrow):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=g) * 2
    amax = 3.0
    ours = fake_tensor_quant(x, amax, narrow_range=narrow)
    step = amax / 127
    theirs = torch.fake_quantize_per_tensor_affine(x, step, 0, -127 if narrow else -128, 127)
    _assert_close_to_torch(ours, theirs, step)


def test_per_channel_matches_torch_fused_kernel():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 16, 3, 3, generator=g)
    amax = w.abs().amax(dim=(1, 2, 3)) * 0.8
    ours = fake_tensor_quant(w, amax.view(-1, 1, 1, 1), narrow_range=False)
    step = amax / 127
    theirs = torch.fake_quantize_per_channel_affine(w, step, torch.zeros(32, dtype=torch.int32), 0, -128, 127)
    _assert_close_to_torch(ours, theirs, step.view(-1, 1, 1, 1).expand_as(w))


def test_unsigned_matches_torch_fused_kernel():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(4)) * 5
    ours = fake_tensor_quant(x, 4.0, unsigned=True)
    theirs = torch.fake_quantize_per_tensor_affine(x, 4.0 / 255, 0, 0, 255)
    _assert_close_to_torch(ours, theirs, 4.0 / 255)


# ------------------------------------------------------------------ properties
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=finite),
       amax=st.floats(0.0009765625, 8192.0, width=32), num_bits=st.integers(2, 16), narrow=st.booleans())
def test_properties(x, amax, num_bits, narrow):
    t = torch.from_numpy(x)
    lo, hi = tq.quant_bounds(num_bits, False, narrow)
    codes, _ = tensor_quant(t, amax, num_bits, False, narrow)
    assert codes.min() >= lo and codes.max() <= hi
    assert torch.equal(codes, codes.round())
    fq = fake_tensor_quant(t, amax, num_bits, False, narrow)
    # idempotent: values already on the grid stay put
    assert torch.equal(fake_tensor_quant(fq, amax, num_bits, False, narrow), fq)
    # inside the range the error is at most half a step (plus float rounding)
    step = np.float32(amax) / np.float32(hi)
    inside = t.abs() <= amax
    err = (fq - t).abs()[inside]
    if err.numel():
        assert float(err.max()) <= step / 2 * (1 + 1e-5) + 1e-6 * abs(float(t.abs().max()))
    # bounds of the dequantized values
    assert float(fq.max()) <= hi * step * (1 + 1e-6)


# ------------------------------------------------------------------ dtype and special values
def test_fp16_computed_in_fp32():
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 2).half()
    out = fake_tensor_quant(x, 2.0)
    assert out.dtype == torch.float16
    ref = torch.from_numpy(np_quant(x.float().numpy(), 2.0)[1]).half()
    assert torch.equal(out, ref)


def test_tiny_amax_gives_zero():
    x = torch.randn(100)
    assert torch.all(fake_tensor_quant(x, 2.0 ** -25) == 0)
    codes, scale = tensor_quant(x, 0.0)
    assert torch.all(codes == 0) and float(scale) == 1.0


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_bad_amax_rejected(bad):
    with pytest.raises(ValueError, match="amax"):
        fake_tensor_quant(torch.ones(3), bad)
    with pytest.raises(ValueError, match="amax"):
        tensor_quant(torch.ones(3), torch.tensor([1.0, bad]).view(2, 1).expand(2, 1))


def test_unsigned_rejects_negative_inputs():
    with pytest.raises(ValueError, match="negative"):
        fake_tensor_quant(torch.tensor([-1.0, 1.0]), 1.0, unsigned=True)


def test_fp16_scale_overflow_reported():
    with pytest.raises(ValueError, match="overflows FP16"):
        fake_tensor_quant(torch.ones(4).half(), torch.tensor(1e-3).half())
    # the same amax in float32 is fine
    fake_tensor_quant(torch.ones(4).half(), torch.tensor(1e-3))


@pytest.mark.parametrize("bits", [1, 17, 8.0, True])
def test_bad_num_bits(bits):
    with pytest.raises((TypeError, ValueError), match="num_bits"):
        fake_tensor_quant(torch.ones(3), 1.0, bits)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating point"):
        fake_tensor_quant(torch.ones(3, dtype=torch.int32), 1.0)


# ------------------------------------------------------------------ gradients
def test_ste_with_clipping():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    y = fake_tensor_quant(x, 2.0)
    y.backward(torch.full_like(x, 0.5))
    expected = torch.where(x.detach().abs() <= 2.0, 0.5, 0.0)
    assert torch.equal(x.grad, expected)


def test_pact_gradient_for_amax():
    x = torch.tensor([-3.0, -1.0, 0.5, 2.5, 4.0], requires_grad=True)
    amax = torch.tensor(2.0, requires_grad=True)
    y = tq.learnable_fake_tensor_quant(x, amax)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y.backward(g)
    # d clip(x,-a,a)/da: -1 below, +1 above, 0 inside
    assert float(amax.grad) == pytest.approx(-1.0 + 4.0 + 5.0)
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0]))


def test_pact_gradient_per_channel_shape():
    x = torch.randn(4, 3, 5, 5)
    amax = torch.full((4, 1, 1, 1), 0.5, requires_grad=True)
    tq.learnable_fake_tensor_quant(x, amax).sum().backward()
    assert amax.grad.shape == amax.shape
    ref = torch.sign(x) * (x.abs() > 0.5)
    torch.testing.assert_close(amax.grad.flatten(), ref.sum(dim=(1, 2, 3)))


def _range_mask(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The independent oracle: the STE passes the gradient exactly where lo <= x <= hi."""
    return ((x >= lo) & (x <= hi)).astype(np.float32)


@pytest.mark.parametrize("fn", ["tensor_quant", "fake_tensor_quant"])
def test_amax_gets_no_gradient(fn):
    # the reference's quantize functions are not differentiable in amax
    x = torch.randn(50, generator=torch.Generator().manual_seed(3), requires_grad=True)
    amax = torch.tensor(0.7, requires_grad=True)
    out = getattr(tq, fn)(x, amax)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert amax.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), _range_mask(x.detach().numpy(), -0.7, 0.7))


@pytest.mark.parametrize("divisor", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("fn", ["tensor_quant", "fake_tensor_quant"])
def test_amax_from_the_input_leaks_no_gradient(fn, divisor):
    # amax = max|x| / d: the element that sets the maximum lies outside the range for
    # d > 1 and must get gradient 0, as every other clipped element (200 random trials)
    gen = torch.Generator().manual_seed(11)
    for _ in range(200):
        x = (torch.randn(32, generator=gen) * 3).requires_grad_(True)
        amax = x.abs().max() / divisor
        out = getattr(tq, fn)(x, amax)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        a = float(amax.detach())
        np.testing.assert_array_equal(x.grad.numpy(), _range_mask(x.detach().numpy(), -a, a))


def test_ste_boundaries_and_unsigned():
    x = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, 1.0000001, 2.0], requires_grad=True)
    tq.fake_tensor_quant(x, 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), _range_mask(x.detach().numpy(), -1.0, 1.0))
    u = torch.tensor([0.0, 0.25, 1.0, 1.5], requires_grad=True)
    tq.fake_tensor_quant(u, 1.0, unsigned=True).sum().backward()
    np.testing.assert_array_equal(u.grad.numpy(), _range_mask(u.detach().numpy(), 0.0, 1.0))


def test_ste_dtype_follows_input():
    x = torch.tensor([0.5, 2.0], dtype=torch.float16, requires_grad=True)
    codes, _ = tq.tensor_quant(x, 1.0, num_bits=16)
    codes.sum().backward()
    assert x.grad.dtype == torch.float16 and x.grad.tolist() == [1.0, 0.0]


def test_affine_ste_from_the_issue():
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    tq.fake_affine_tensor_quant(x, torch.tensor(-1.0), torch.tensor(1.5), 8).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), _range_mask(x.detach().numpy(), -1.0, 1.5))


def test_affine_ste_random_ranges_and_range_widened_to_zero():
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        x = (torch.randn(64, generator=gen) * 2).requires_grad_(True)
        lo, hi = sorted((torch.randn(2, generator=gen) * 1.5).tolist())
        up = torch.randn(64, generator=gen)
        tq.fake_affine_tensor_quant(x, lo, hi).backward(up)
        mask = _range_mask(x.detach().numpy(), min(lo, 0.0), max(hi, 0.0))
        np.testing.assert_array_equal(x.grad.numpy(), up.numpy() * mask)


def test_affine_range_from_the_input_gets_no_gradient():
    x = torch.randn(20, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lo, hi = x.min() / 2, x.max() / 2          # computed from x, so they carry autograd history
    tq.fake_affine_tensor_quant(x, lo, hi).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(),
                                  _range_mask(x.detach().numpy(), lo.item(), hi.item()))


def test_gradcheck_is_ste_not_true_derivative():
    # the true derivative of round() is 0 almost everywhere; STE passes 1 through
    x = torch.tensor([0.3], requires_grad=True)
    fake_tensor_quant(x, 1.0).backward()
    assert float(x.grad) == 1.0


# ------------------------------------------------------------------ affine (lesson 1)
def test_affine_seed_example():
    x = torch.tensor([-0.61, -0.52, 1.62])
    codes, scale, zp = tq.affine_tensor_quant(x, x.min(), x.max())
    assert float(scale) == pytest.approx(2.23 / 255, rel=1e-6)
    assert float(zp) == 70.0  # round(0.61 / 0.0087451) = round(69.75)
    assert codes.tolist() == [0.0, 11.0, 255.0]
    deq = tq.fake_affine_tensor_quant(x, x.min(), x.max())
    assert float((deq - x).abs().max()) <= float(scale) / 2 + 1e-6


def test_affine_matches_torch():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(6)) + 0.7
    lo, hi = float(x.min()), float(x.max())
    ours = tq.fake_affine_tensor_quant(x, lo, hi)
    scale, zp, _, _, _ = tq._affine_params(lo, hi, 8)
    theirs = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 255)
    _assert_close_to_torch(ours, theirs, float(scale))


def test_affine_bad_range():
    with pytest.raises(ValueError, match="min_range"):
        tq.affine_tensor_quant(torch.ones(3), 2.0, 1.0)


# ------------------------------------------------------------------ descriptors
def test_descriptor_defaults_and_copy():
    d = QuantDescriptor()
    assert (d.num_bits, d.axis, d.amax, d.calib_method, d.unsigned, d.narrow_range, d.fake_quant) == \
        (8, None, None, "max", False, False, True)
    d2 = QuantDescriptor(num_bits=4, axis=(0,), amax=[1.0, 2.0], calib_method="histogram", unsigned=True)
    assert d2.axis == 0 and d2.amax.dtype == np.float32
    assert QuantDescriptor(**d2.dict()) == d2
    assert d2.replace(num_bits=8).num_bits == 8
    assert tq.QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL.axis == 0
    assert tq.QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL.axis == 1
    assert "num_bits=4" in repr(d2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_bits=8.0), TypeError, "num_bits"),
    (dict(num_bits=0), ValueError, "num_bits"),
    (dict(name=3), TypeError, "name"),
    (dict(axis="0"), TypeError, "axis"),
    (dict(axis=()), ValueError, "axis"),
    (dict(axis=(0, 0)), ValueError, "axis"),
    (dict(amax="1"), TypeError, "amax"),
    (dict(amax=-1.0), ValueError, "amax"),
    (dict(amax=[1.0, float("nan")]), ValueError, "NaN"),
    (dict(amax=float("inf")), ValueError, "finite"),
    (dict(learn_amax=True, axis=0), TypeError, "per-tensor"),
    (dict(scale_amax=0.0), ValueError, "scale_amax"),
    (dict(calib_method="entropy"), ValueError, "load_calib_amax"),
    (dict(unsigned=1), TypeError, "unsigned"),
    (dict(narrow_range="yes"), TypeError, "narrow_range"),
    (dict(fake_quant=None), TypeError, "fake_quant"),
    (dict(bogus=1), TypeError, "bogus"),
])
def test_descriptor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantDescriptor(**kwargs)


# ------------------------------------------------------------------ silent wrong results (adversarial)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_bits", [8, 12, 16])
def test_half_inputs_never_exceed_the_largest_code(dtype, num_bits):
    x = torch.tensor([1.0, -1.0, 0.999, 0.5], dtype=dtype)
    codes, _ = tensor_quant(x, 1.0, num_bits=num_bits)
    ref, _, _ = np_quant(x.float().numpy(), 1.0, num_bits, unsigned=False, narrow_range=True)
    np.testing.assert_array_equal(codes.float().numpy(), ref)
    assert float(codes.max()) <= 2 ** (num_bits - 1) - 1


def test_half_codes_keep_their_dtype_where_exact():
    codes, _ = tensor_quant(torch.tensor([1.0], dtype=torch.float16), 1.0, num_bits=8)
    assert codes.dtype == torch.float16 and codes.tolist() == [127.0]
    codes, _ = tensor_quant(torch.tensor([1.0], dtype=torch.float16), 1.0, num_bits=16)
    assert codes.dtype == torch.float32 and codes.tolist() == [32767.0]


@pytest.mark.parametrize("fn", [tensor_quant, fake_tensor_quant])
@pytest.mark.parametrize("amax", [math.inf, torch.tensor([1.0, math.inf])])
def test_inf_amax_is_refused(fn, amax):
    with pytest.raises(ValueError, match="finite"):
        fn(torch.ones(2), amax)


@pytest.mark.parametrize("shape", [(3, 1), (2, 4), (4, 1)])
def test_amax_that_broadcasts_up_is_refused(shape):
    with pytest.raises(ValueError, match="does not broadcast"):
        fake_tensor_quant(torch.ones(4), torch.ones(shape))


def test_amax_that_broadcasts_down_still_works():
    x = torch.randn(4, 3, 2, 2)
    out = fake_tensor_quant(x, torch.ones(4, 1, 1, 1))
    assert out.shape == x.shape


# ------------------------------------------------------------------ FP8 E4M3 (num_bits=(4, 3))
def test_fp8_bounds_and_descriptor():
    assert tq.quant_bounds((4, 3)) == (-448, 448) == tq.quant_bounds((4, 3), narrow_range=False)
    d = QuantDescriptor(num_bits=[4, 3])
    assert d.num_bits == (4, 3) and QuantDescriptor(**d.dict()) == d
    with pytest.raises(ValueError, match="signed"):
        tq.quant_bounds((4, 3), unsigned=True)


def test_fp8_values_are_exactly_representable_and_saturate():
    x = torch.linspace(-600, 600, 4001)
    y = fake_tensor_quant(x, torch.tensor(448.0), (4, 3))     # step 1: y is E4M3 itself
    assert torch.equal(y, y.to(torch.float8_e4m3fn).float())
    assert float(y.max()) == 448.0 and float(y.min()) == -448.0
    assert torch.all(fake_tensor_quant(x, 2.0 ** -25, (4, 3)) == 0)


def test_fp8_straight_through_gradient():
    x = torch.tensor([-5.0, -1.0, 0.3, 3.9, 4.5], requires_grad=True)
    fake_tensor_quant(x, torch.tensor(4.0), (4, 3)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_quant_scale_follows_the_input_dtype(dtype):
    _, scale = tensor_quant(torch.ones(3, dtype=dtype), torch.tensor(2.0))
    assert scale.dtype == dtype and float(scale) == 63.5


def test_descriptor_yaml_keeps_tuples_and_refuses_text_that_is_not_a_mapping():
    d = QuantDescriptor(axis=(0, 1), num_bits=(4, 3), name="x")
    assert "axis:\n- 0\n- 1" in d.to_yaml()
    assert QuantDescriptor.from_yaml(d.to_yaml()) == d
    with pytest.raises(TypeError, match="read the file first"):
        QuantDescriptor.from_yaml(b"num_bits: 8")

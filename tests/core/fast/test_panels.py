"""core.fast.panels: the decoding-step product from column panels equals torch's linear layer."""

import copy

import pytest
import torch

from core.fast.panels import MAX_ROWS, Panels, kernels, quantize_int8, to_panels
from kernel_marks import needs_kernels

pytestmark = needs_kernels(kernels, "panel kernel")


def test_panels_hold_the_weight_column_by_column():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    panels = to_panels(weight)
    assert panels.shape == (2, 3, 16)
    assert torch.equal(panels[0, :, 5], weight[5]) and torch.equal(panels[1, :, 3], weight[19])
    assert torch.equal(panels[1, :, 4:], torch.zeros(3, 12))  # padding rows
    # bf16: each cache line holds two consecutive k, interleaved per column.
    weight = torch.arange(20 * 4, dtype=torch.float32).view(20, 4).bfloat16()
    pairs = to_panels(weight).view(2, 2, 16, 2)
    assert torch.equal(pairs[0, 1, 5], weight[5, 2:4]) and torch.equal(pairs[1, 0, 3], weight[19, 0:2])
    with pytest.raises(ValueError, match="even"):
        to_panels(torch.ones(4, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (37, 50), (200, 768), (16, 3)])
def test_fp32_equals_linear_to_rounding(rows, out_features, in_features):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        out = Panels().linear(x, linear.weight, linear.bias)
        ref = linear(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # fp32 sums in another order: a few units in the last place of the largest terms.
    assert torch.allclose(out, ref, atol=1e-5 * in_features**0.5, rtol=1e-5)


def test_sums_are_exact_where_fp32_is_exact():
    # Small integers: every product and partial sum is exact in fp32, so any order gives the same bits.
    weight = torch.randint(-8, 8, (50, 40)).float()
    x = torch.randint(-8, 8, (3, 2, 40)).float()
    bias = torch.randint(-8, 8, (50,)).float()
    with torch.inference_mode():
        assert torch.equal(Panels().linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_bf16_weights_are_read_exactly_and_outputs_round_to_nearest_even(rows, x_dtype):
    torch.manual_seed(0)
    weight = torch.randn(70, 48).bfloat16()
    bias = torch.randn(70).bfloat16()
    x = torch.randn(rows, 48).to(x_dtype)
    with torch.inference_mode():
        out = Panels(torch.bfloat16 if x_dtype == torch.float32 else None).linear(x, weight, bias)
        # The same sums in fp64 (no rounding but the last).
        ref = (x.double() @ weight.double().T + bias.double()).float()
    assert out.dtype == x_dtype
    # fp32 sums, then for a bf16 output one rounding to bf16 (half a unit of 2^-8, relative).
    assert torch.allclose(out.float(), ref, rtol=2**-8 if x_dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    # The rounding itself: fp32 sums exactly halfway between two bf16 neighbours go to the even one,
    # as torch's own conversion does: 1 + 2^-8 -> 1, (1 + 2^-7) + 2^-8 -> 1 + 2^-6.
    x = torch.tensor([[1.0, 2**-8], [1.0 + 2**-7, 2**-8]]).bfloat16()
    ones = torch.ones(1, 2, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = Panels().linear(x, ones)
    assert out.flatten().tolist() == [1.0, 1.0 + 2**-6]
    assert torch.equal(out, (x.float() @ ones.float().T).bfloat16())


def test_int8_quantization_is_absmax_per_row():
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0], [3.0, 1.5, -0.75, 2.9], [0.0, 0.0, 0.0, 0.0]])
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert q[0].tolist() == [64, -127, 32, 0] and q[1].tolist() == [127, 64, -32, 123]  # to the nearest step, ties to even (63.5 -> 64)
    assert torch.allclose(scales[:2], torch.tensor([1.0, 3.0]) / 127) and q[2].tolist() == [0, 0, 0, 0]
    # Each weight is within half a step of its row's scale.
    assert ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (37, 200), (16, 4)])
def test_int8_panels_give_the_dequantized_product(rows, out_features, in_features):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features)
    q, scales = quantize_int8(linear.weight)
    with torch.inference_mode():
        out = Panels(torch.int8).linear(x, linear.weight, linear.bias)
    # fp32 sums of x * q, times the row's scale, plus the bias: the product with the dequantized weight.
    ref = (x.double() @ q.double().T * scales.double() + linear.bias.double()).float()
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * in_features**0.5)
    # And about the fp32 layer: int8 is a draft's precision, half a step per weight.
    assert torch.allclose(out, linear(x).detach(), atol=0.05 * in_features**0.5)


def test_batch_dimensions_and_more_rows_than_the_kernel_takes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    panels = Panels()
    x = torch.randn(2, 4, 32)
    with torch.inference_mode():
        assert panels.applies(x, linear.weight) and not panels.applies(torch.randn(9, 32), linear.weight)
        assert torch.allclose(panels.linear(x, linear.weight, linear.bias), linear(x), atol=1e-5)


def test_what_the_kernel_does_not_take():
    linear = torch.nn.Linear(32, 24)
    panels = Panels()
    x = torch.randn(1, 32)
    assert not panels.applies(x, linear.weight)  # autograd on, the weight trains
    with torch.inference_mode():
        assert panels.applies(x, linear.weight)
        assert not panels.applies(x.double(), linear.weight.double())
        assert not panels.applies(x.bfloat16(), linear.weight)  # activations in another dtype
        assert not panels.applies(x.half(), linear.weight.half())
    with pytest.raises(RuntimeError, match="rows"):
        kernels().linear(torch.randn(9, 32), [to_panels(linear.weight.detach())], None, 24)
    with pytest.raises(RuntimeError, match="panels"):
        kernels().linear(x, [to_panels(linear.weight.detach())[:, :16]], None, 24)
    q, scales = quantize_int8(linear.weight)
    with pytest.raises(RuntimeError, match="scales"):
        kernels().linear(x, [to_panels(q)], None, 24)  # int8 without its scales
    with pytest.raises(RuntimeError, match="scales must be 32"):
        kernels().linear(x, [to_panels(q), scales], None, 24)  # not padded to the panels
    int8 = Panels(torch.int8)
    with torch.inference_mode():
        assert int8.applies(x, linear.weight) and not int8.applies(x.bfloat16(), linear.weight.bfloat16())
        assert not int8.applies(torch.randn(1, 30), torch.randn(24, 30))  # int8 k are read in fours


def test_the_copy_follows_the_weight_and_is_rebuilt_by_copies():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 40)
    panels = Panels()
    x = torch.randn(2, 16)
    with torch.inference_mode():
        panels.linear(x, linear.weight)
    with torch.no_grad():
        linear.weight.mul_(3.0)  # e.g. load_state_dict after make_fast
    twin = copy.deepcopy(panels)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, linear.weight)
        assert torch.allclose(panels.linear(x, linear.weight), ref, atol=1e-5)
        assert torch.allclose(twin.linear(x, linear.weight), ref, atol=1e-5)
    assert twin.panels is not panels.panels

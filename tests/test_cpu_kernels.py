"""The compiled CPU kernels: the grouped product against per-group products and torch's grouped_mm; the
sorted routing against the model's tensor ops; the kernels traced with fake tensors; their build switch,
fallback and errors. (tests/test_few_token_kernels.py checks the few-token routed linear.)"""

import pytest
import torch
import torch.utils.cpp_extension
from conftest import few_token_operands
from torch._subclasses.fake_tensor import FakeTensorMode

from parameternet_llm import cpu_kernels, modeling_parameternet_llama

# Uneven groups, an empty one inside and one at the end, and rows past the last group (in no group).
SIZES = [70, 0, 131, 9, 96, 0]
END = sum(SIZES)
ROWS = END + 13


@pytest.fixture(autouse=True)
def built():
    """Every test here needs the kernels: where the tests run, they must build."""
    assert cpu_kernels.load(), "the CPU kernels did not build"


@pytest.fixture
def threads(request):
    """Intra-op threads for the test (the kernel cuts its work into one share per thread), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def fresh_load(monkeypatch):
    """`load` and the model's lookup decide afresh in the test and again after it."""
    def clear():
        cpu_kernels.load.cache_clear()
        modeling_parameternet_llama.package_kernels.cache_clear()
    clear()
    yield
    monkeypatch.undo()
    clear()


def offsets(sizes):
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


def bounds(sizes):
    ends = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return list(zip(ends[:-1], ends[1:]))


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_of_rows_match_per_group_products(threads, dtype):
    a = torch.randn(ROWS, 48).to(dtype)
    b = torch.randn(len(SIZES), 40, 48).to(dtype).transpose(1, 2)  # [E, in, out] view of [E, out, in]
    got = cpu_kernels.grouped_mm(a, b, offsets(SIZES))
    assert got.shape == (ROWS, 40)
    for e, (start, stop) in enumerate(bounds(SIZES)):
        torch.testing.assert_close(got[start:stop], a[start:stop] @ b[e])
    torch.testing.assert_close(got[:END], torch.nn.functional.grouped_mm(a, b, offs=offsets(SIZES))[:END])


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_groups_along_the_reduced_dimension_match_per_group_products(threads):
    a = torch.randn(ROWS, 40).t()  # [out, T], as the weight gradient's transposed output gradient
    b = torch.randn(ROWS, 48)
    got = cpu_kernels.grouped_mm(a, b, offsets(SIZES))
    assert got.shape == (len(SIZES), 40, 48)
    for e, (start, stop) in enumerate(bounds(SIZES)):
        torch.testing.assert_close(got[e], a[:, start:stop] @ b[start:stop])
    assert torch.all(got[1] == 0) and torch.all(got[5] == 0)  # empty groups
    torch.testing.assert_close(got, torch.nn.functional.grouped_mm(a, b, offs=offsets(SIZES)))


def tensor_ops_route(monkeypatch, *args):
    """The model's sorted `route` by its tensor ops (the compiled kernels out of its reach)."""
    with monkeypatch.context() as patch:
        patch.setattr(modeling_parameternet_llama, "compiled_cpu_kernels", lambda: None)
        return modeling_parameternet_llama.route(*args)


def routing_tensors(routing):
    """A sorted `route`'s results by name, the dispatch order's two tensors among them."""
    logits, probs, scale, expert, keep, rows, group_ends = routing
    return dict(logits=logits, probs=probs, scale=scale, expert=expert, keep=keep, row_token=rows.row_token,
                token_row=rows.token_row, group_ends=group_ends)


@pytest.mark.parametrize("capacity_factor,min_capacity", [(None, 4), (1.25, 4), (0.5, 4), (0.1, 9), (1.0, 0)])
@pytest.mark.parametrize("padding", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("skew", [0.0, 4.0])  # 4: most tokens choose expert 0, many dropped
def test_sorted_routing_is_the_tensor_ops_exactly(monkeypatch, capacity_factor, min_capacity, padding, skew):
    tokens, width, experts = 300, 24, 6
    x = torch.randn(tokens, width)
    router_weight = torch.randn(experts, width) * 0.3
    router_weight[0] += skew * x.mean(0) / x.mean(0).norm().square()
    valid = torch.rand(tokens) >= padding
    row_token = torch.randperm(tokens)  # router input rows in another order than the tokens', as a down projection's
    rows = modeling_parameternet_llama.RowOrder(row_token, torch.argsort(row_token))
    for dtype, row_order in ((torch.float32, None), (torch.bfloat16, rows)):
        args = (router_weight, x if row_order is None else x[row_order.row_token], valid, capacity_factor,
                min_capacity, dtype, True, row_order)
        got = modeling_parameternet_llama.route(*args)
        want = tensor_ops_route(monkeypatch, *args)
        for name, want_tensor in routing_tensors(want).items():
            got_tensor = routing_tensors(got)[name]
            assert got_tensor.dtype == want_tensor.dtype and torch.equal(got_tensor, want_tensor), name
    keep = got[4]
    assert not keep[~valid].any()
    if padding < 1.0 and capacity_factor is not None and skew:
        assert (valid & ~keep).any()  # the test drops tokens


def test_sorted_routing_takes_the_top_1_as_torch_max():
    """Equal maxima: the first; a token with NaN logits (a diverged router) has NaN probabilities: expert 0."""
    logits = torch.randn(5, 12)
    logits[3] = logits[1] = logits.max(0).values + 1  # experts 1 and 3 tie for every token
    logits[4, 5] = float("nan")
    _, scale, expert, *_ = cpu_kernels.route_sorted(logits, torch.ones(12, dtype=torch.bool), None, 4)
    top_prob, want = logits.softmax(0).max(0)
    assert torch.equal(expert, want)
    assert expert[5] == 0 and torch.all(expert[torch.arange(12) != 5] == 1)
    torch.testing.assert_close(scale, top_prob, rtol=0, atol=0, equal_nan=True)


def test_sorted_routing_refuses_bad_operands_by_name():
    valid = torch.ones(10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="logits must be a \\[E, T\\] float32"):
        cpu_kernels.route_sorted(torch.randn(4, 10, dtype=torch.float64), valid, None, 4)
    with pytest.raises(RuntimeError, match="valid must be a \\[10\\] bool"):
        cpu_kernels.route_sorted(torch.randn(4, 10), valid[:9], None, 4)
    with pytest.raises(RuntimeError, match="valid must be a \\[10\\] bool"):
        cpu_kernels.route_sorted(torch.randn(4, 10), valid.int(), 1.0, 4)


def test_traced_with_fake_tensors_to_the_real_shapes():
    a, b, b_2d, offs = torch.randn(ROWS, 48), torch.randn(len(SIZES), 48, 40), torch.randn(ROWS, 40), offsets(SIZES)
    operands = few_token_operands(torch.float32, bias=True, tokens=3)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (a, b, b_2d, offs)]
        rows, reduction = cpu_kernels.grouped_mm(*fakes[:2], fakes[3]), cpu_kernels.grouped_mm(fakes[0].t(), *fakes[2:])
        few_token_fakes = cpu_kernels.routed_few_tokens(*[mode.from_tensor(t) for t in operands])
        routing_fakes = cpu_kernels.route_sorted(mode.from_tensor(torch.randn(len(SIZES), ROWS)),
                                                 mode.from_tensor(torch.ones(ROWS, dtype=torch.bool)), 1.25, 4)
    assert rows.shape == cpu_kernels.grouped_mm(a, b, offs).shape == (ROWS, 40)
    assert reduction.shape == cpu_kernels.grouped_mm(a.t(), b_2d, offs).shape == (len(SIZES), 48, 40)
    for fake, real in zip(few_token_fakes, cpu_kernels.routed_few_tokens(*operands), strict=True):
        assert fake.shape == real.shape and fake.dtype == real.dtype
    routing = cpu_kernels.route_sorted(torch.randn(len(SIZES), ROWS), torch.ones(ROWS, dtype=torch.bool), 1.25, 4)
    for fake, real in zip(routing_fakes, routing, strict=True):
        assert fake.shape == real.shape and fake.dtype == real.dtype


@pytest.mark.parametrize("a_shape,b_shape,offs,message", [
    ((8, 4), (2, 4, 4), torch.tensor([4, 8]), "int32"),
    ((8, 4), (2, 4, 4), torch.tensor([5, 3], dtype=torch.int32), "non-decreasing"),
    ((8, 4), (2, 4, 4), torch.tensor([4, 9], dtype=torch.int32), "non-decreasing"),
    ((8, 4), (3, 4, 4), torch.tensor([4, 8], dtype=torch.int32), "do not match"),
    ((8, 4), (2, 5, 4), torch.tensor([4, 8], dtype=torch.int32), "do not match"),
    ((4, 8), (7, 4), torch.tensor([4, 8], dtype=torch.int32), "do not match"),
])
def test_bad_operands_are_refused_by_name(a_shape, b_shape, offs, message):
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.grouped_mm(torch.randn(a_shape), torch.randn(b_shape), offs)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernels.grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 4, dtype=torch.float64), offs)


def test_switched_off_by_environment(fresh_load, monkeypatch):
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    assert not cpu_kernels.load()
    assert modeling_parameternet_llama.compiled_cpu_kernels() is None


def test_build_failure_warns_and_falls_back_to_torch(fresh_load, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found.*torch's grouped_mm"):
        assert modeling_parameternet_llama.compiled_cpu_kernels() is None
    layer = modeling_parameternet_llama.RoutedLinear(16, 32, 4, backend="grouped_mm")
    x = torch.randn(20, 16)
    torch.testing.assert_close(layer(x), modeling_parameternet_llama.loop_experts(
        x, layer.weight, None, layer.routing.expert, layer.routing.probs.max(0).values))

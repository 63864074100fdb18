"""A complete torch.func training loop, eager and inside the user's torch.compile."""

import pytest
import torch

import lowbit_fn
from helpers import batches, loss_fn, mlp


def make_step(model, opt):
    grad_and_value = torch.func.grad_and_value(loss_fn(model))

    def step(params, state, x, y):
        grads, loss = grad_and_value(params, x, y)
        updates, state = opt.update(grads, state, params)
        return lowbit_fn.apply_updates(params, updates), state, loss

    return step


@pytest.mark.parametrize("fmt", ["fp32", "8bit", "4bit", "fp8"])
def test_func_loop_eager_trains(fmt):
    model = mlp()
    params = lowbit_fn.params_from_module(model)
    opt = lowbit_fn.adamw(1e-2, state_format=fmt)
    state = opt.init(params)
    step = make_step(model, opt)
    x, y = batches(1)[0]
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp32", "8bit"])
def test_func_loop_inside_user_torch_compile(fmt):
    model = mlp()
    start = lowbit_fn.params_from_module(model).clone()
    opt = lowbit_fn.adamw(1e-2, state_format=fmt, min_quant_size=0)
    step = make_step(model, opt)
    compiled_step = torch.compile(step)
    data = batches(5)
    results = []
    for fn in (step, compiled_step):
        params, state = start.clone(), opt.init(start)
        for x, y in data:
            params, state, loss = fn(params, state, x, y)
        results.append((params, state))
    (p_eager, s_eager), (p_comp, s_comp) = results
    assert int(s_comp["0", "count"]) == 5
    for k in p_eager.keys(include_nested=True, leaves_only=True):
        assert torch.allclose(p_comp[k], p_eager[k], rtol=1e-5, atol=1e-7)

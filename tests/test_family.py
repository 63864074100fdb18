"""The optimizer family (Lion, SGD, RMSprop, AdEMAMix): the full-precision paths against references (torch.optim's
SGD and RMSprop; Lion and AdEMAMix written here from their papers' pseudo-code) in float64, the quantized paths
against the same optimizer's fp32-state trajectory with measured budgets, bad input, and the state's bytes.

Checkpoints are in ``test_family_checkpoints.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lowbit_fn
from helpers import as_torch, batches, loss_fn, mlp


def train(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def max_rel(got, want):
    """Largest relative error over the tensors: max |a - b| / max |b| per tensor (pairs of modules or of lists of
    tensors); per tensor, not per element, so that an element near zero does not turn rounding into a failure."""
    pairs = zip(got.parameters(), want.parameters()) if isinstance(got, nn.Module) else zip(got, want)
    return max(float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max()) for a, b in pairs)


def twins():
    """A float64 MLP (two quantizable 2-D weights, a small 2-D weight, three 1-D biases) and a copy of it."""
    model = mlp(torch.float64)
    return model, copy.deepcopy(model)


# --------------------------------------------------------------------------------------------------------------
# references written from the papers, float64, plain torch ops (torch.optim.Optimizer only for the param groups, so
# that torch's schedulers drive them as they drive the optimizers under test)


class LionReference(torch.optim.Optimizer):
    """Chen et al., arXiv:2302.06675, Algorithm 2 (Lion with decoupled weight decay):

        c_t = b1 * m_{t-1} + (1 - b1) * g_t
        theta_t = theta_{t-1} - lr_t * (sign(c_t) + wd * theta_{t-1})
        m_t = b2 * m_{t-1} + (1 - b2) * g_t
    """

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                c = b1 * m + (1 - b1) * g
                p.sub_(lr * (torch.sign(c) + wd * p))
                m.copy_(b2 * m + (1 - b2) * g)


class AdEMAMixReference(torch.optim.Optimizer):
    """Pagliardini, Ablin, Grangier, arXiv:2409.03137, Algorithm 1, with the paper's warm-up schedulers
    (``t`` counts from 1):

        alpha(t) = min(t * alpha / T_alpha, alpha)
        b3(t) = min(exp(ln(b1) ln(b3) / ((1 - t / T_b3) ln(b3) + (t / T_b3) ln(b1))), b3)
        m1 = b1 m1 + (1 - b1) g;  m2 = b3(t) m2 + (1 - b3(t)) g;  nu = b2 nu + (1 - b2) g^2
        m1_hat = m1 / (1 - b1^t);  nu_hat = nu / (1 - b2^t)
        theta = theta - lr * ((m1_hat + alpha(t) m2) / (sqrt(nu_hat) + eps) + wd theta)

    (A schedule that moves b1, like OneCycleLR's momentum cycling, uses the current b1 everywhere, as torch's Adam
    does.)"""

    def __init__(self, params, lr, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None, eps=1e-8,
                 weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2, b3), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st.update(t=0, m1=torch.zeros_like(p), m2=torch.zeros_like(p), nu=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                alpha = group["alpha"]
                if group["t_alpha"]:
                    alpha = min(t * alpha / group["t_alpha"], alpha)
                b3_t = b3
                if group["t_beta3"]:
                    f = t / group["t_beta3"]
                    b3_t = min(math.exp(math.log(b1) * math.log(b3) / ((1 - f) * math.log(b3) + f * math.log(b1))), b3)
                st["m1"] = b1 * st["m1"] + (1 - b1) * g
                st["m2"] = b3_t * st["m2"] + (1 - b3_t) * g
                st["nu"] = b2 * st["nu"] + (1 - b2) * g * g
                m1_hat = st["m1"] / (1 - b1**t)
                nu_hat = st["nu"] / (1 - b2**t)
                p.sub_(lr * ((m1_hat + alpha * st["m2"]) / (torch.sqrt(nu_hat) + eps) + wd * p))


def test_references_follow_the_papers_on_a_hand_computed_step():
    """The references themselves, on numbers worked out by hand (so that a shared mistake cannot hide)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    ref = LionReference([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    for g in ([3.0, -0.5], [-1.0, 1.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        ref.step()
    # step 1: m=0, c=0.1g -> sign (1,-1); p = (1,-2) - 0.1*((1,-1) + 0.5*(1,-2)) = (0.85, -1.8); m = 0.01g = (0.03,-0.005)
    # step 2: c = 0.9*(0.03,-0.005) + 0.1*(-1, 1) = (-0.073, 0.0955) -> (-1, 1); p = (0.85,-1.8) - 0.1*((-1,1) + 0.5*(0.85,-1.8))
    torch.testing.assert_close(p.detach(), torch.tensor([0.85 + 0.1 - 0.0425, -1.8 - 0.1 + 0.09], dtype=torch.float64))

    q = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    ref = AdEMAMixReference([q], lr=0.1, betas=(0.5, 0.75, 0.875), alpha=2.0, t_alpha=4, t_beta3=4, eps=0.0)
    q.grad = torch.tensor([2.0], dtype=torch.float64)
    ref.step()
    # t=1: alpha = 0.5; b3(1) = exp(ln .5 ln .875 / (.75 ln .875 + .25 ln .5)); m1 = 1, m2 = (1-b3)*2, nu = 1
    b3 = math.exp(math.log(0.5) * math.log(0.875) / (0.75 * math.log(0.875) + 0.25 * math.log(0.5)))
    assert 0.5 < b3 < 0.875
    m1_hat, m2, nu_hat = 1.0 / 0.5, (1 - b3) * 2.0, 1.0 / 0.25
    torch.testing.assert_close(q.detach(), torch.tensor([1.0 - 0.1 * (m1_hat + 0.5 * m2) / math.sqrt(nu_hat)], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# 1. full-precision state: equal to the references in float64


SGD_CASES = {
    "plain": dict(momentum=0.0),
    "plain_wd": dict(momentum=0.0, weight_decay=0.05),
    "momentum": dict(momentum=0.9),
    "momentum_wd": dict(momentum=0.9, weight_decay=0.05),
    "dampening": dict(momentum=0.9, dampening=0.1),
    "dampening_wd": dict(momentum=0.9, dampening=0.1, weight_decay=0.05),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=0.05),
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_matches_torch_in_float64(case):
    model, reference = twins()
    start = copy.deepcopy(model)
    kw = SGD_CASES[case]
    ours = lowbit_fn.SGD(model.parameters(), lr=0.05, **kw)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.05, **kw)
    data = batches(20, torch.float64)
    train(model, ours, data)
    train(reference, theirs, data)
    assert max_rel(model, reference) < 1e-10
    assert max_rel(model, start) > 1e-2, "the parameters moved"
    if kw["momentum"]:
        buf = ours.state[model[2].weight]["momentum_buffer"]
        assert buf.dtype == torch.float64
        assert max_rel([buf], [theirs.state[reference[2].weight]["momentum_buffer"]]) < 1e-10
    else:
        assert set(ours.state[model[2].weight]) == {"step"}


SCHEDULERS = {
    "steplr": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    # cycle_momentum edits the group's momentum (SGD, RMSprop) or betas[0] (Lion, AdEMAMix) at every step
    # (max_lr the optimizer's own lr: 50x RMSprop's makes the run chaotic, float64 rounding grows to 1e-6 in 20 steps)
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=o.defaults["lr"], total_steps=25, cycle_momentum=True),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("case", ["momentum_wd", "nesterov", "dampening"])
def test_sgd_with_scheduler_matches_torch_in_float64(case, scheduler):
    model, reference = twins()
    kw = SGD_CASES[case]
    ours = lowbit_fn.SGD(model.parameters(), lr=0.05, **kw)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.05, **kw)
    data = batches(20, torch.float64)
    train(model, ours, data, SCHEDULERS[scheduler](ours))
    train(reference, theirs, data, SCHEDULERS[scheduler](theirs))
    assert max_rel(model, reference) < 1e-10
    group, want = ours.param_groups[0], theirs.param_groups[0]
    assert group["lr"] == want["lr"] and group["momentum"] == want["momentum"]
    if scheduler == "onecycle":
        assert group["momentum"] != kw["momentum"], "OneCycleLR moved the momentum"


RMS_CASES = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "centered": dict(centered=True),
    "centered_momentum": dict(centered=True, momentum=0.9),
}


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("case", sorted(RMS_CASES))
def test_rmsprop_matches_torch_in_float64(case, weight_decay):
    model, reference = twins()
    kw = dict(RMS_CASES[case], weight_decay=weight_decay)
    ours = lowbit_fn.RMSprop(model.parameters(), lr=1e-3, **kw)
    theirs = torch.optim.RMSprop(reference.parameters(), lr=1e-3, **kw)
    data = batches(20, torch.float64)
    train(model, ours, data)
    train(reference, theirs, data)
    assert max_rel(model, reference) < 1e-10
    stored, torch_state = ours.state[model[2].weight], theirs.state[reference[2].weight]
    centered = case.startswith("centered")  # centered: we keep the variance, not square_avg
    assert ("grad_var" in stored) == centered and ("square_avg" in stored) != centered
    mine = as_torch(stored)
    assert sorted(mine) == sorted(torch_state)  # square_avg, grad_avg (centered), momentum_buffer (momentum), step
    for name in torch_state:
        if name != "step":
            assert max_rel([mine[name]], [torch_state[name]]) < 1e-10, name
    assert int(mine["step"]) == int(torch_state["step"]) == 20


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_rmsprop_with_scheduler_matches_torch_in_float64(scheduler):
    model, reference = twins()
    kw = dict(momentum=0.9, centered=True, weight_decay=0.05)
    ours = lowbit_fn.RMSprop(model.parameters(), lr=1e-3, **kw)
    theirs = torch.optim.RMSprop(reference.parameters(), lr=1e-3, **kw)
    data = batches(20, torch.float64)
    train(model, ours, data, SCHEDULERS[scheduler](ours))
    train(reference, theirs, data, SCHEDULERS[scheduler](theirs))
    assert max_rel(model, reference) < 1e-10
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"]


LION_CASES = {"plain": dict(), "wd": dict(weight_decay=0.5)}


@pytest.mark.parametrize("scheduler", [None, "steplr", "onecycle"])
@pytest.mark.parametrize("case", sorted(LION_CASES))
def test_lion_matches_the_paper_in_float64(case, scheduler):
    model, reference = twins()
    kw = LION_CASES[case]
    ours = lowbit_fn.Lion(model.parameters(), lr=3e-3, betas=(0.9, 0.99), **kw)
    theirs = LionReference(reference.parameters(), lr=3e-3, betas=(0.9, 0.99), **kw)
    data = batches(20, torch.float64)
    train(model, ours, data, SCHEDULERS[scheduler](ours) if scheduler else None)
    train(reference, theirs, data, SCHEDULERS[scheduler](theirs) if scheduler else None)
    assert max_rel(model, reference) < 1e-10
    assert ours.param_groups[0]["betas"] == theirs.param_groups[0]["betas"]
    assert max_rel([ours.state[model[0].weight]["exp_avg"]], [theirs.state[reference[0].weight]["m"]]) < 1e-10


ADEMAMIX_CASES = {
    "plain": dict(weight_decay=0.0),
    "wd": dict(weight_decay=0.1),
    # warm-ups shorter than the run, so that both the ramps and the plateaus are compared
    "warmup": dict(weight_decay=0.0, t_alpha=12, t_beta3=8),
    "warmup_wd": dict(weight_decay=0.1, t_alpha=12, t_beta3=8),
}


@pytest.mark.parametrize("scheduler", [None, "steplr", "onecycle"])
@pytest.mark.parametrize("case", sorted(ADEMAMIX_CASES))
def test_ademamix_matches_the_paper_in_float64(case, scheduler):
    model, reference = twins()
    kw = dict(ADEMAMIX_CASES[case], betas=(0.9, 0.999, 0.999), alpha=5.0)
    ours = lowbit_fn.AdEMAMix(model.parameters(), lr=1e-3, **kw)
    theirs = AdEMAMixReference(reference.parameters(), lr=1e-3, **kw)
    data = batches(20, torch.float64)
    train(model, ours, data, SCHEDULERS[scheduler](ours) if scheduler else None)
    train(reference, theirs, data, SCHEDULERS[scheduler](theirs) if scheduler else None)
    assert max_rel(model, reference) < 1e-10
    assert ours.param_groups[0]["betas"] == theirs.param_groups[0]["betas"]
    assert len(ours.param_groups[0]["betas"]) == 3
    mine, ref = ours.state[model[2].weight], theirs.state[reference[2].weight]
    for name, theirs_name in (("exp_avg", "m1"), ("exp_avg_slow", "m2"), ("exp_avg_sq", "nu")):
        assert max_rel([mine[name]], [ref[theirs_name]]) < 1e-10, name


def test_ademamix_warmups_change_the_trajectory():
    """Each warm-up changes the run (so the comparisons above check the schedulers, not just their plateaus): after
    20 steps the params differ from the constant-alpha/b3 run by a part of the distance moved (measured: t_alpha=12
    0.008, t_beta3=8 0.139, both 0.102)."""
    start = mlp(torch.float64)

    def run(**warm):
        model = copy.deepcopy(start)
        train(model, lowbit_fn.AdEMAMix(model.parameters(), lr=1e-3, betas=(0.9, 0.999, 0.999), **warm), batches(20, torch.float64))
        return flat(model).double()

    constant = run()
    moved = (constant - flat(start).double()).norm()
    for warm, least in ((dict(t_alpha=12), 2e-3), (dict(t_beta3=8), 0.05), (dict(t_alpha=12, t_beta3=8), 0.05)):
        assert float((run(**warm) - constant).norm() / moved) > least, warm


# the functional aliases through apply_gradients, state_format="fp32"


def run_apply(model, opt, data):
    params = lowbit_fn.params_from_module(model)
    state = opt.init(params)
    grad = torch.func.grad(loss_fn(model))
    for x, y in data:
        params, state = lowbit_fn.apply_gradients(opt, grad(params, x, y), state, params)
    return params, state


def functional_vs(params, reference):
    return max_rel([params[tuple(n.split("."))] for n, _ in reference.named_parameters()], list(reference.parameters()))


def decay_schedule(base):
    """lr(count) = base * 0.9**count for the functional API (the count as a 0-d int64 tensor), and LambdaLR's."""
    return (lambda count: base * 0.9 ** count.double()), (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9**s))


FUNCTIONAL = {
    "sgd": (lowbit_fn.sgd, dict(momentum=0.9, dampening=0.1, weight_decay=0.05), torch.optim.SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.05), 0.05),
    "sgd_nesterov": (lowbit_fn.sgd, dict(momentum=0.9, nesterov=True), torch.optim.SGD, dict(momentum=0.9, nesterov=True), 0.05),
    "rmsprop": (lowbit_fn.rmsprop, dict(momentum=0.9, centered=True, weight_decay=0.05), torch.optim.RMSprop, dict(momentum=0.9, centered=True, weight_decay=0.05), 1e-3),
    "rmsprop_plain": (lowbit_fn.rmsprop, dict(), torch.optim.RMSprop, dict(), 1e-3),
    "lion": (lowbit_fn.lion, dict(b1=0.9, b2=0.99, weight_decay=0.5), LionReference, dict(betas=(0.9, 0.99), weight_decay=0.5), 3e-3),
    "lion_plain": (lowbit_fn.lion, dict(), LionReference, dict(), 3e-3),
    "ademamix_plain": (lowbit_fn.ademamix, dict(), AdEMAMixReference, dict(), 1e-3),  # no warm-up, no decay
    "ademamix": (lowbit_fn.ademamix, dict(b3=0.999, t_alpha=12, t_beta3=8, weight_decay=0.1), AdEMAMixReference,
                 dict(betas=(0.9, 0.999, 0.999), t_alpha=12, t_beta3=8, weight_decay=0.1), 1e-3),
}


@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_alias_matches_reference_in_float64(name, schedule):
    factory, kw, reference_cls, ref_kw, lr = FUNCTIONAL[name]
    model, reference = twins()
    data = batches(20, torch.float64)
    sched = None
    learning_rate = lr
    theirs = reference_cls(reference.parameters(), lr=lr, **ref_kw)
    if schedule:
        learning_rate, make = decay_schedule(lr)
        sched = make(theirs)
    params, state = run_apply(model, factory(learning_rate, **kw, state_format="fp32"), data)
    train(reference, theirs, data, sched)
    assert functional_vs(params, reference) < 1e-10
    core = "0" if name.startswith(("lion", "ademamix")) else "1"  # the chain position of the moments' state
    assert int(state[core, "count"]) == 20
    assert all(v.dtype == torch.float64 for v in params.values(include_nested=True, leaves_only=True))


# --------------------------------------------------------------------------------------------------------------
# 2. quantized state against the same optimizer's fp32-state trajectory


def regression(seed=0):
    """A student MLP (48-96-96-1) fitting a fixed teacher (48-32-1) plus noise: 256 samples, 8 batches of 32."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 100)
    teacher = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 1))
    torch.manual_seed(seed)
    student = mlp()
    x = torch.randn(256, 48, generator=g)
    with torch.no_grad():
        y = teacher(x) + 0.05 * torch.randn(256, 1, generator=g)
    return student, x, y


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def fit(cls, kw, steps=80, seed=0):
    """``steps`` steps of ``cls`` (every 2-D weight quantized); the final full-data loss, the initial one and the
    parameters after every 10 steps."""
    model, x, y = regression(seed)
    kw = dict(kw, min_quant_size=0) if cls._state_format != "fp32" else kw
    opt = cls(model.parameters(), **kw)
    with torch.no_grad():
        initial = float(((model(x) - y) ** 2).mean())
    trajectory = [flat(model)]
    for i in range(steps):
        b = slice((i % 8) * 32, (i % 8 + 1) * 32)
        opt.zero_grad()
        ((model(x[b]) - y[b]) ** 2).mean().backward()
        opt.step()
        if (i + 1) % 10 == 0:
            trajectory.append(flat(model))
    if cls._state_format != "fp32":
        assert opt.state[model[2].weight]["state_format"] == cls._state_format
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean()), initial, trajectory


# Per family: the drop-in classes (fp32 first) and one setting that exercises every moment of the family.
QUALITY = {
    "sgd": ((lowbit_fn.SGD, lowbit_fn.SGD8bit, lowbit_fn.SGD4bit, lowbit_fn.SGDFp8), dict(lr=0.05, momentum=0.9)),
    "rmsprop": ((lowbit_fn.RMSprop, lowbit_fn.RMSprop8bit, lowbit_fn.RMSprop4bit, lowbit_fn.RMSpropFp8),
                dict(lr=1e-3, momentum=0.5, centered=True)),
    "lion": ((lowbit_fn.Lion, lowbit_fn.Lion8bit, lowbit_fn.Lion4bit, lowbit_fn.LionFp8), dict(lr=3e-4, weight_decay=0.1)),
    "ademamix": ((lowbit_fn.AdEMAMix, lowbit_fn.AdEMAMix8bit, lowbit_fn.AdEMAMix4bit, lowbit_fn.AdEMAMixFp8),
                 dict(lr=1e-3, betas=(0.9, 0.999, 0.999), t_alpha=40, t_beta3=40)),
}
# RMSprop runs centered in every format: its state is the variance (Welford's update), not square_avg - grad_avg**2
# of two quantized moments, which took single steps of up to 25 (fp32: 0.01) in 4-bit and drifted 2.1-17x the
# distance fp32 moved; test_centered_rmsprop_steps_stay_bounded_with_a_steady_gradient shows the worst case.

# Budgets after 80 steps, seed 0 as tested. "loss": |loss - fp32 loss| / fp32 loss at the end; "trajectory": the
# largest over the run (every 10 steps) of ||params - fp32 params|| / ||fp32 params - initial params||. Measured
# worst over seeds 0-4 (seed 0 in brackets), budgets about twice the worst:
#   sgd       8bit loss 0.001 (0.001) traj 0.026 (0.023); 4bit 0.033 (0.033) / 0.491 (0.440); fp8 0.003 (0.003) / 0.063 (0.062)
#   rmsprop   8bit 0.002 (0.001) / 0.015 (0.015); 4bit 0.009 (0.007) / 0.163 (0.154); fp8 0.013 (0.004) / 0.043 (0.043)
#   lion      8bit 0.010 (0.006) / 0.086 (0.072); 4bit 0.162 (0.036) / 0.646 (0.601); fp8 0.014 (0.014) / 0.147 (0.145)
#   ademamix  8bit 0.037 (0.022) / 0.110 (0.062); 4bit 0.120 (0.012) / 0.587 (0.557); fp8 0.107 (0.038) / 0.124 (0.104)
# 4-bit trajectories drift by about half the distance moved in every family (Adam's 4-bit: 0.52 in
# test_equivalence), Lion's sign makes its trajectories the most sensitive; final losses stay close.
QUALITY_BUDGET = {
    ("sgd", "8bit"): (0.01, 0.05), ("sgd", "4bit"): (0.07, 0.9), ("sgd", "fp8"): (0.01, 0.12),
    ("rmsprop", "8bit"): (0.005, 0.03), ("rmsprop", "4bit"): (0.02, 0.33), ("rmsprop", "fp8"): (0.03, 0.09),
    ("lion", "8bit"): (0.02, 0.15), ("lion", "4bit"): (0.3, 1.2), ("lion", "fp8"): (0.03, 0.25),
    ("ademamix", "8bit"): (0.07, 0.2), ("ademamix", "4bit"): (0.25, 1.1), ("ademamix", "fp8"): (0.2, 0.25),
}


@pytest.mark.slow  # 1-5 s each (the native kernel; the compiled path where it is unavailable)
@pytest.mark.parametrize("state_format", ["8bit", "4bit", "fp8"])
@pytest.mark.parametrize("family", sorted(QUALITY))
def test_quantized_state_tracks_the_fp32_trajectory(family, state_format):
    classes, kw = QUALITY[family]
    cls = {c._state_format: c for c in classes}[state_format]
    fp32_loss, initial, fp32_path = fit(classes[0], kw)
    loss, initial_q, path = fit(cls, kw)
    assert initial_q == initial and torch.equal(path[0], fp32_path[0])  # the same start
    assert fp32_loss < 0.1 * initial, "the problem is learned"
    loss_budget, trajectory_budget = QUALITY_BUDGET[family, state_format]
    assert abs(loss - fp32_loss) / fp32_loss < loss_budget
    drift = max(float((a - b).norm() / (b - path[0]).norm()) for a, b in zip(path[1:], fp32_path[1:]))
    assert drift < trajectory_budget
    assert drift > 0, "the quantized state is not the fp32 one"


@pytest.mark.parametrize("cls", [lowbit_fn.RMSprop8bit, lowbit_fn.RMSprop4bit, lowbit_fn.RMSpropFp8],
                         ids=lambda c: c.__name__)
def test_centered_rmsprop_steps_stay_bounded_with_a_steady_gradient(cls):
    """A gradient with a steady part (variance about 1% of square_avg): quantized square_avg and grad_avg would
    each carry errors larger than that variance, and their difference reached 0 (steps of g / eps, up to 3e6 here
    in every format). The variance kept as a state of its own keeps the steps within 2x fp32's (0.10 here)."""
    gen = torch.Generator().manual_seed(0)
    steady = torch.randn(64, 128, generator=gen)
    noise = [0.1 * torch.randn(64, 128, generator=gen) for _ in range(200)]
    largest = []
    for make in (lowbit_fn.RMSprop, cls):
        p = nn.Parameter(torch.zeros(64, 128))
        opt = make([p], lr=1e-2, centered=True, **({} if make is lowbit_fn.RMSprop else dict(min_quant_size=0)))
        worst = 0.0
        for n in noise:
            p.grad = steady + n
            before = p.detach().clone()
            opt.step()
            worst = max(worst, float((p.detach() - before).abs().max()))
        largest.append(worst)
    assert 0.05 < largest[0] < 0.2 and largest[1] < 2 * largest[0], largest


# --------------------------------------------------------------------------------------------------------------
# 4. bad input


def test_bad_arguments_raise_clear_errors():
    params = [nn.Parameter(torch.randn(8, 8))]
    with pytest.raises(ValueError, match="nesterov momentum requires a momentum"):
        lowbit_fn.SGD8bit(params, nesterov=True)
    with pytest.raises(ValueError, match="nesterov momentum requires a momentum and zero dampening"):
        lowbit_fn.SGD(params, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        lowbit_fn.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov momentum requires dampening=0"):
        lowbit_fn.trace(0.9, nesterov=True, dampening=0.5)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        lowbit_fn.sgd(0.1, momentum=0.9, nesterov=1)
    for cls in (lowbit_fn.SGD8bit, lowbit_fn.SGD, lowbit_fn.RMSprop8bit, lowbit_fn.RMSprop):
        with pytest.raises(ValueError, match="invalid momentum -0.5"):
            cls(params, momentum=-0.5)
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        lowbit_fn.sgd(0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="invalid dampening"):
        lowbit_fn.SGD8bit(params, momentum=0.9, dampening=-0.1)
    for cls, kw in ((lowbit_fn.RMSprop4bit, {}), (lowbit_fn.AdEMAMix8bit, {})):
        with pytest.raises(ValueError, match="invalid alpha -1"):
            cls(params, alpha=-1.0, **kw)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        lowbit_fn.rmsprop(alpha=1.5)  # (the drop-in, like torch.optim.RMSprop, only refuses alpha < 0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        lowbit_fn.ademamix(alpha=-1.0)
    for cls in (lowbit_fn.Lion8bit, lowbit_fn.SGD4bit, lowbit_fn.RMSpropFp8, lowbit_fn.AdEMAMix, lowbit_fn.Lion):
        with pytest.raises(ValueError, match="invalid lr -0.001"):
            cls(params, lr=-1e-3)
    for betas in ((0.9, 0.999), (0.9, 0.999, 0.9999, 0.5), 0.9):
        with pytest.raises(ValueError, match=r"betas must be a tuple of 3 \(beta1, \.\.\., beta3\)"):
            lowbit_fn.AdEMAMix8bit(params, betas=betas)
    with pytest.raises(ValueError, match=r"betas must be a pair"):
        lowbit_fn.Lion8bit(params, betas=(0.9, 0.99, 0.999))
    with pytest.raises(ValueError, match="invalid beta parameter at index 2"):
        lowbit_fn.AdEMAMixFp8(params, betas=(0.9, 0.999, 1.0))
    for t in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="t_alpha must be None or an int > 0"):
            lowbit_fn.AdEMAMix8bit(params, t_alpha=t)
        with pytest.raises(ValueError, match="t_beta3 must be None or an int > 0"):
            lowbit_fn.ademamix(t_beta3=t)
    with pytest.raises(ValueError, match="b3 must be in"):
        lowbit_fn.scale_by_ademamix(b3=1.0)
    with pytest.raises(ValueError, match="b2 must be in"):
        lowbit_fn.scale_by_lion(b2=1.5)
    with pytest.raises(TypeError, match="centered must be a bool"):
        lowbit_fn.rmsprop(centered="yes")


def test_bad_param_group_is_refused_and_the_optimizer_keeps_its_groups():
    p, q = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = lowbit_fn.SGD8bit([p], lr=0.1, momentum=0.9)
    for bad, match in (({"momentum": -1.0}, "invalid momentum"), ({"nesterov": True, "dampening": 0.5}, "nesterov"),
                       ({"betas": (0.9, 0.99)}, "this optimizer has no betas")):
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [q], **bad})
        assert len(opt.param_groups) == 1
    ademamix = lowbit_fn.AdEMAMix8bit([p])
    with pytest.raises(ValueError, match="betas must be a tuple of 3"):
        ademamix.add_param_group({"params": [q], "betas": (0.9, 0.999)})
    with pytest.raises(ValueError, match="t_alpha"):
        ademamix.add_param_group({"params": [q], "t_alpha": 0})
    assert len(ademamix.param_groups) == 1


def test_sgd_without_momentum_keeps_only_the_step_count():
    for cls in (lowbit_fn.SGD8bit, lowbit_fn.SGD4bit, lowbit_fn.SGDFp8, lowbit_fn.SGD):
        w, b = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64))
        kw = {} if cls is lowbit_fn.SGD else dict(min_quant_size=0)
        opt = cls([w, b], lr=0.1, **kw)  # torch's default momentum=0
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        before = w.detach().clone()
        opt.step()
        assert torch.equal(w.detach(), before - 0.1), "plain SGD: p - lr * g"
        for p in (w, b):
            assert set(opt.state[p]) == {"step"} and int(opt.state[p]["step"]) == 1, cls.__name__
        assert all(not isinstance(v, torch.Tensor) or k == "step" for e in opt.state_dict()["state"].values() for k, v in e.items())
    with_momentum = lowbit_fn.SGD8bit([w], lr=0.1, momentum=0.9, min_quant_size=0)
    w.grad = torch.ones_like(w)
    with_momentum.step()
    assert "momentum_buffer_codes" in with_momentum.state[w]


# --------------------------------------------------------------------------------------------------------------
# 5. the state's bytes


def state_bytes(opt, p):
    return sum(v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor))


def layout_bytes(shape, state_format, moments):
    """Bytes of ``moments`` moments of a 2-D parameter of ``shape`` plus its int64 step, from the row layout: per
    row ceil(R / codes per byte) code bytes and ceil(R / block) float32 scales (float32 moments for fp32)."""
    rows, cols = shape
    if state_format == "fp32":
        return moments * rows * cols * 4 + 8
    per_byte, block = {"8bit": (1, 256), "fp8": (1, 256), "4bit": (2, 128)}[state_format]
    return moments * rows * (math.ceil(cols / per_byte) + 4 * math.ceil(cols / block)) + 8


STATE_BYTES = [  # class, arguments, moments, bytes per element of a whole number of blocks (per moment: 1 + 4/256,
    # half a byte + 4/128, or 4)
    (lowbit_fn.Lion8bit, {}, 1, 1 + 1 / 64), (lowbit_fn.SGD8bit, dict(momentum=0.9), 1, 1 + 1 / 64),
    (lowbit_fn.RMSprop8bit, {}, 1, 1 + 1 / 64), (lowbit_fn.RMSprop8bit, dict(centered=True), 2, 2 + 2 / 64),
    (lowbit_fn.RMSprop8bit, dict(centered=True, momentum=0.9), 3, 3 + 3 / 64), (lowbit_fn.AdEMAMix8bit, {}, 3, 3 + 3 / 64),
    (lowbit_fn.Lion4bit, {}, 1, 0.5 + 1 / 32), (lowbit_fn.SGD4bit, dict(momentum=0.9), 1, 0.5 + 1 / 32),
    (lowbit_fn.RMSprop4bit, dict(centered=True), 2, 1 + 2 / 32), (lowbit_fn.AdEMAMix4bit, {}, 3, 1.5 + 3 / 32),
    (lowbit_fn.LionFp8, {}, 1, 1 + 1 / 64), (lowbit_fn.SGDFp8, dict(momentum=0.9), 1, 1 + 1 / 64),
    (lowbit_fn.RMSpropFp8, dict(centered=True), 2, 2 + 2 / 64), (lowbit_fn.AdEMAMixFp8, {}, 3, 3 + 3 / 64),
    (lowbit_fn.Lion, {}, 1, 4.0), (lowbit_fn.SGD, dict(momentum=0.9), 1, 4.0),
    (lowbit_fn.RMSprop, dict(centered=True), 2, 8.0), (lowbit_fn.AdEMAMix, {}, 3, 12.0),
]


@pytest.mark.parametrize("cls,kw,moments,per_element", STATE_BYTES, ids=lambda v: getattr(v, "__name__", None))
def test_state_bytes_follow_the_layout(cls, kw, moments, per_element, monkeypatch):
    # the layout is the codec's, not the step's: the eager step (LOWBIT_FN_COMPILE=0, the same math) spares this
    # test a compilation per class
    monkeypatch.setenv("LOWBIT_FN_COMPILE", "0")
    fmt = cls._state_format
    # 256 x 1024: whole blocks, bytes per element exactly as stated; 256 x 1000: the last block of each row short
    for shape in ((256, 1024), (256, 1000)):
        p = nn.Parameter(torch.zeros(shape))
        opt = cls([p], lr=1e-4, **kw)  # 256000 elements >= the default min_quant_size: quantized by default
        p.grad = torch.randn(shape)
        opt.step()
        assert state_bytes(opt, p) == layout_bytes(shape, fmt, moments)
        codes = [k for k in opt.state[p] if k.endswith("_codes")]
        assert len(codes) == (moments if fmt != "fp32" else 0)
        if fmt == "4bit":  # half the code bytes of 8-bit: two codes per byte
            assert all(opt.state[p][k].shape == (shape[0], math.ceil(shape[1] / 2)) for k in codes)
        elif fmt != "fp32":
            assert all(opt.state[p][k].shape == shape and opt.state[p][k].dtype == torch.uint8 for k in codes)
        if shape[1] == 1024:
            assert (state_bytes(opt, p) - 8) / p.numel() == per_element

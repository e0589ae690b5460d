"""SophiaG: reference vs formula, fast paths vs reference, official state dicts, estimators, errors."""

import copy
import io
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sophia  # noqa: E402
from sophia import SophiaG, hutchinson_hessian, sampled_label_loss  # noqa: E402

# How close each fast path must come to the reference, from how it computes:
# - foreach runs the reference's ATen ops on lists of tensors: bitwise equal in fp32 and bf16.
# - the fused CPU kernel performs the reference's IEEE operations per element, in its order, rounds
#   to the storage dtype where ATen rounds and fuses multiply-adds where ATen fuses them: bitwise
#   equal as well (NaN where the reference has NaN). The one exception is ATen's own: in bf16,
#   add_(other, alpha=a) rounds self + a*other once (FMA) in ATen's vector loop, but the scalar loop
#   that finishes each thread's range (numel mod 64 elements with AVX-512) rounds a*other to bf16
#   first; the kernel rounds once everywhere. So the bf16 comparisons use betas whose 1 - beta is a
#   power of two (a*other exact: both loops agree), or sizes ATen's vector loop covers entirely.
# - the CUDA kernels may fuse multiply-adds differently from ATen: a few fp32 ulps; in bf16 a few
#   elements end up one rounding (2^-8 relative) apart, and that carries through the following steps.
CUDA_TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3)}
DEFAULT_BETAS = (0.965, 0.99)
BF16_EXACT_BETAS = (1 - 2 ** -5, 1 - 2 ** -7)  # near the defaults; (1 - beta) * x is exact in bf16 short of underflow


@pytest.fixture(scope="module")
def fused_cpu():
    """Build (or load from the cache) the fused CPU kernel once; skip where there is no compiler."""
    kernels = sophia._fused_kernels("cpu")
    if isinstance(kernels, str):
        pytest.skip(kernels)
    return kernels


def make_params(dtype, device="cpu"):
    """Tensors covering the cases: matrices, a vector, a zero-size tensor, a frozen one."""
    g = torch.Generator().manual_seed(0)
    shapes = [(9, 7), (7,), (0, 3), (300,), (5, 5)]
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    params[4].requires_grad_(False)  # frozen: never has a gradient
    return params


def run_trajectory(dtype, maximize, steps=8, device="cpu", betas=DEFAULT_BETAS, **flags):
    """Two param groups with different lr/rho/wd, GNB and Hutchinson-style (signed) Hessian updates,
    a step where one gradient is None. Returns params and state (step counters included) after every step."""
    params = make_params(dtype, device)
    groups = [dict(params=params[:2], lr=0.02, rho=0.05, weight_decay=0.2),
              dict(params=params[2:], lr=0.005, rho=0.01, weight_decay=0.0)]
    opt = SophiaG(groups, betas=betas, maximize=maximize, **flags)
    g = torch.Generator().manual_seed(1)
    history = []
    for it in range(steps):
        for p in params:
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
        if it == 3:
            params[1].grad = None  # skipped this step: its state must stay as it is
        if it % 2 == 1:
            opt.update_hessian()
        if it == 4:  # estimates of either sign, as Hutchinson gives; None skips the frozen param
            estimates = [torch.randn(p.shape, generator=g).to(device=device, dtype=dtype) for p in params]
            estimates[4] = None
            opt.update_hessian(estimates)
        opt.step(bs=50)
        history.append([p.detach().clone() for p in params]
                       + [opt.state[p][key].clone() for p in params if p in opt.state
                          for key in ("exp_avg", "hessian", "step")])
    assert params[4] not in opt.state
    return history


def assert_bitwise_equal(actual, expected):
    """The same bits, zeros' signs included; NaN where expected has NaN (whatever its payload)."""
    nan = expected.isnan()
    assert actual.dtype == expected.dtype and torch.equal(actual.isnan(), nan)
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[expected.dtype]
    assert torch.equal(actual.view(as_int)[~nan], expected.view(as_int)[~nan])


def assert_same_trajectory(actual, expected, tolerance=None):
    """Every tensor after every step within tolerance (assert_close's arguments), or bitwise equal."""
    assert len(actual) == len(expected)
    for step_actual, step_expected in zip(actual, expected):
        assert len(step_actual) == len(step_expected)
        for a, e in zip(step_actual, step_expected):
            if tolerance is None:
                assert_bitwise_equal(a, e)
            else:
                torch.testing.assert_close(a, e, **tolerance)


def test_reference_matches_formula():
    """Two steps with a Hessian update in between, against the formula written out in float64."""
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5])
    g1 = torch.tensor([0.3, -0.1, 0.0, 2.0, -0.4])
    g2 = torch.tensor([-0.2, 0.5, 0.1, 1.0, 0.3])
    estimate = torch.tensor([0.5, -0.3, 0.2, 0.05, 1.0])  # a negative entry: h+ = 0 there
    lr, b1, b2, rho, wd, bs = 0.1, 0.9, 0.8, 0.5, 0.1, 4
    p = theta.clone().requires_grad_()
    opt = SophiaG([p], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, foreach=False)
    p.grad = g1.clone()
    opt.step(bs=bs)
    opt.update_hessian([estimate])
    p.grad = g2.clone()
    opt.step(bs=bs)

    t, m, h = theta.double(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for grad, h_after in ((g1, None), (g2, (1 - b2) * estimate.double())):
        if h_after is not None:
            h = b2 * h + h_after
        t = t * (1 - lr * wd)
        m = b1 * m + (1 - b1) * grad.double()
        t = t - lr * torch.clamp(m / (rho * bs * h.clamp(min=0) + 1e-15), -1, 1)
    torch.testing.assert_close(p.detach().double(), t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["hessian"].double(), h, rtol=1e-6, atol=1e-7)
    assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("flags", [dict(foreach=True), dict(fused=True)], ids=["foreach", "fused"])
def test_fast_paths_match_reference(fused_cpu, flags, dtype, maximize):
    # the trajectory's tensors are all smaller than ATen's vector loop, or end in its scalar loop
    betas = BF16_EXACT_BETAS if dtype == torch.bfloat16 and "fused" in flags else DEFAULT_BETAS
    expected = run_trajectory(dtype, maximize, betas=betas, foreach=False)
    actual = run_trajectory(dtype, maximize, betas=betas, **flags)
    assert_same_trajectory(actual, expected)



@pytest.mark.parametrize("flags", [dict(foreach=True), dict(fused=True)], ids=["foreach", "fused"])
def test_fast_paths_update_each_dtype_in_a_bucket_of_its_own(fused_cpu, flags):
    """float32 and bfloat16 parameters interleaved in one optimizer: the fast paths split them by
    dtype, and every tensor ends bit for bit as the reference leaves it."""
    def run(**implementation):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=g).to(dtype).requires_grad_()
                  for n, dtype in ((5, torch.float32), (6, torch.bfloat16), (7, torch.float32), (3, torch.bfloat16))]
        opt = SophiaG(params, lr=0.1, rho=0.05, betas=BF16_EXACT_BETAS, **implementation)
        for it in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            if it == 1:
                opt.update_hessian()
            opt.step(bs=10)
        return [p.detach() for p in params] + [opt.state[p][key] for p in params for key in ("exp_avg", "hessian")]
    for actual, expected in zip(run(**flags), run(foreach=False)):
        assert_bitwise_equal(actual, expected)

def mixed_values(n, scale, generator, special=()):
    """n values around `scale` over six decades, both signs, with about one in eight replaced by zeros,
    subnormals, the largest floats or `special`."""
    values = scale * torch.randn(n, generator=generator) * 10.0 ** torch.empty(n).uniform_(-3, 3, generator=generator)
    extremes = [0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, *special]
    pick = torch.randint(0, 8 * len(extremes), (n,), generator=generator)
    for i, value in enumerate(extremes):
        values[pick == i] = value
    return values


# sizes that end in the kernel's remainder loop, and one that spans three of its thread chunks
ODD_SIZES = (1, 7, 15, 17, 33, 63, 65, 1000, 2 * 65536 + 3)
ALIGNED_SIZES = (64, 192, 1024, 32768)  # whole multiples of ATen's bf16 vector loop, each one ATen thread


@pytest.mark.parametrize("dtype, betas, sizes", [
    (torch.float32, DEFAULT_BETAS, ODD_SIZES),
    (torch.bfloat16, DEFAULT_BETAS, ALIGNED_SIZES),
    (torch.bfloat16, BF16_EXACT_BETAS, ODD_SIZES),
], ids=["fp32", "bf16-aligned", "bf16-exact-betas"])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_cpu_equals_reference_on_extreme_values(fused_cpu, dtype, betas, sizes, maximize):
    """Magnitudes from subnormal to the largest float, zeros of both signs, NaN and ±inf in the
    Hessian estimates; GNB and signed updates between steps. Every tensor and the step counter
    after every step equal the reference's to the bit (NaN where it has NaN)."""
    g = torch.Generator().manual_seed(2)

    def state():  # θ, m, h, step
        return ([mixed_values(n, 0.02, g).to(dtype) for n in sizes], [mixed_values(n, 1e-3, g).to(dtype) for n in sizes],
                [mixed_values(n, 1e-6, g).abs().to(dtype) for n in sizes], [torch.tensor(0.0) for _ in sizes])

    reference = state()
    fused = [[t.clone() for t in tensors] for tensors in reference]
    hyper = dict(lr=6e-4, beta1=betas[0], rho=0.05, weight_decay=0.2, bs=491_520, maximize=maximize)
    for it in range(4):
        square = it % 2 == 0  # GNB estimates are gradients; Hutchinson's are Hessian entries of either sign
        estimates = [mixed_values(n, 1e-3 if square else 1e-6, g, special=(math.nan, math.inf, -math.inf)).to(dtype)
                     for n in sizes]
        grads = [mixed_values(n, 1e-3, g).to(dtype) for n in sizes]
        for (params, exp_avgs, hessians, steps), update_hessian, step in (
                (reference, sophia._single_tensor_update_hessian, sophia._single_tensor_step),
                (fused, sophia._fused_update_hessian, sophia._fused_step)):
            update_hessian(hessians, estimates, beta2=betas[1], square=square)
            step(params, grads, exp_avgs, hessians, steps, **hyper)
        assert_same_trajectory([sum(fused, [])], [sum(reference, [])])
    assert fused[3][0].item() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flags", [dict(foreach=True), dict(fused=True)], ids=["foreach", "fused"])
def test_cuda_paths_match_cpu_reference(flags, dtype):
    expected = run_trajectory(dtype, maximize=False, foreach=False)
    actual = run_trajectory(dtype, maximize=False, device="cuda", **flags)
    assert_same_trajectory([[t.cpu() for t in step] for step in actual], expected, CUDA_TOLERANCE[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_fused_and_capturable_keeps_step_on_device():
    p = torch.zeros(3, device="cuda", requires_grad=True)
    opt = SophiaG([p], capturable=True)
    assert opt._implementation(opt.param_groups[0], [p, p, p, p]) == "fused"
    p.grad = torch.ones(3, device="cuda")
    opt.step()
    assert opt.state[p]["step"].device.type == "cuda"


class OfficialSophiaG(torch.optim.Optimizer):
    """The official algorithm as a plain per-parameter loop, with the official state layout."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay,
                                      maximize=False, capturable=False))

    def _state(self, p):
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    beta2 = group["betas"][1]
                    self._state(p)["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, bs=5120):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(group["betas"][0]).add_(p.grad, alpha=1 - group["betas"][0])
                ratio = (state["exp_avg"].abs() / (group["rho"] * bs * state["hessian"] + 1e-15)).clamp(None, 1)
                p.addcmul_(state["exp_avg"].sign(), ratio, value=-group["lr"])


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for it in range(steps):
        x = torch.randn(16, 4, generator=g)
        if it % 2 == 0:  # GNB Hessian update on sampled labels
            model.zero_grad()
            sampled_label_loss(model(x), generator=g).backward()
            opt.update_hessian()
        model.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=g)).backward()
        opt.step(bs=16)


@pytest.mark.parametrize("flags", [dict(foreach=False), dict()], ids=["reference", "default"])
def test_official_state_dict_loads_and_continues(fused_cpu, flags):
    official_model, model = tiny_model(), tiny_model()
    official = OfficialSophiaG(official_model.parameters(), lr=0.01, rho=0.05)
    train_steps(official_model, official, 3, seed=1)
    model.load_state_dict(official_model.state_dict())
    ours = SophiaG(model.parameters(), lr=0.01, rho=0.05, **flags)
    ours.load_state_dict(copy.deepcopy(official.state_dict()))  # state_dict() shares the tensors
    assert ours.param_groups[0]["fused"] is None and ours.param_groups[0]["foreach"] == flags.get("foreach")
    train_steps(official_model, official, 4, seed=2)
    train_steps(model, ours, 4, seed=2)
    for a, b in zip(model.parameters(), official_model.parameters()):
        assert torch.equal(a, b)  # fp32: every path agrees with the official ops bit for bit here
    for p, q in zip(model.parameters(), official_model.parameters()):
        for key in ("step", "exp_avg", "hessian"):
            assert torch.equal(ours.state[p][key], official.state[q][key])


def test_state_dict_round_trip_through_torch_save(fused_cpu):
    model, resumed = tiny_model(), tiny_model()
    opt = SophiaG(model.parameters(), lr=0.01, rho=0.05)
    train_steps(model, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = SophiaG(resumed.parameters())
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.param_groups[0]["lr"] == 0.01
    # the bs of the last step travels: diagnostics() works before the resumed run's first step
    assert {key: value.item() for key, value in resumed_opt.diagnostics().items()} == \
        {key: value.item() for key, value in opt.diagnostics().items()}
    official = {key: value for key, value in checkpoint["optimizer"].items() if key != "last_bs"}
    resumed_opt.load_state_dict(official)  # the official class's state dicts have none: keep ours
    assert resumed_opt.last_bs == opt.last_bs is not None
    train_steps(model, opt, 4, seed=2)
    train_steps(resumed, resumed_opt, 4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_old_state_dict_with_float_step_loads():
    p = torch.ones(3, requires_grad=True)
    opt = SophiaG([p], foreach=False)
    p.grad = torch.ones(3)
    opt.step()
    state_dict = opt.state_dict()
    state_dict["state"][0]["step"] = 1.0  # a plain float, as very old checkpoints hold
    for group in state_dict["param_groups"]:
        del group["foreach"], group["fused"], group["maximize"], group["capturable"]
    opt.load_state_dict(state_dict)
    opt.step()
    assert opt.state[p]["step"].item() == 2 and opt.state[p]["step"].dtype == torch.float32
    group = opt.param_groups[0]
    assert (group["fused"], group["foreach"], group["maximize"], group["capturable"]) == (None, False, False, False)


def test_a_copied_optimizer_steps_and_knows_it_has_not_stepped():
    """Pickling keeps an optimizer's defaults, state and groups (Optimizer.__getstate__), not the bs
    of its last step: a copy steps as the original does and asks for bs before its own first step."""
    p = torch.ones(3, requires_grad=True)
    opt = SophiaG([p], lr=0.1, foreach=False)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.update_hessian()
    opt.step(bs=2)
    copied = copy.deepcopy(opt)
    with pytest.raises(ValueError, match="no step"):
        copied.diagnostics()
    twin = copied.param_groups[0]["params"][0]
    twin.grad = p.grad.clone()
    opt.step(bs=2)
    copied.step(bs=2)
    assert torch.equal(twin, p) and torch.equal(copied.state[twin]["exp_avg"], opt.state[p]["exp_avg"])


def test_quadratic_converges(fused_cpu):
    """f(x) = ½ Σ a_i x_i² with curvatures over four orders of magnitude; Hutchinson estimates."""
    a = torch.logspace(-2, 2, 20)
    x = torch.ones(20, requires_grad=True)
    opt = SophiaG([x], lr=0.2, betas=(0.9, 0.9), rho=1.0, weight_decay=0.0)
    start = (0.5 * a * x.detach() ** 2).sum().item()
    for it in range(150):
        loss = (0.5 * a * x ** 2).sum()
        if it % 5 == 0:
            opt.update_hessian(hutchinson_hessian(loss, [x]))
        opt.zero_grad()
        loss.backward()
        opt.step(bs=1)
    assert (0.5 * a * x.detach() ** 2).sum().item() < 1e-3 * start
    # the curvature scaling moves every coordinate alike, whatever its a_i (plain SGD would not)
    assert x.detach().abs().max() < 0.1


def test_mlp_trains(fused_cpu):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()  # 3 classes, not linearly separable
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = SophiaG(model.parameters(), lr=0.02, rho=0.05, weight_decay=0.0)
    start = F.cross_entropy(model(x), y).item()
    for it in range(300):
        if it % 10 == 0:
            model.zero_grad()
            sampled_label_loss(model(x)).backward()
            opt.update_hessian()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(bs=len(x))
    assert F.cross_entropy(model(x), y).item() < 0.3 * start


def assert_unbiased(samples, exact, sigmas=5.0):
    """The sample mean is within `sigmas` standard errors (from the samples' own spread) of exact."""
    samples = torch.stack(samples).double()
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert torch.all((mean - exact).abs() <= sigmas * stderr + 1e-9), (mean, exact, stderr)
    assert torch.all(stderr < 0.2 * exact.abs().max())  # enough samples that a wrong scale would show


def test_gnb_estimate_is_gauss_newton_diagonal():
    """Softmax regression: diag GN of the mean CE over B rows is mean_n p_nc (1 - p_nc) x_nd²;
    B ĝ ⊙ ĝ with ĝ the gradient of sampled_label_loss (the sampler the training loop runs) has
    that expectation. 200,000 draws make the standard error under 1% of every entry, so an
    estimate off in scale by 10% lies more than 5 standard errors away."""
    g = torch.Generator().manual_seed(0)
    B, D, C, K = 6, 3, 8, 200_000
    x, w = torch.randn(B, D, generator=g), torch.randn(C, D, generator=g, requires_grad=True)
    logits = x @ w.T
    probs = torch.softmax(logits.detach(), dim=-1)
    exact = torch.einsum("nc,nd->cd", probs * (1 - probs), x ** 2).double() / B
    # a few draws through autograd: the gradient of sampled_label_loss is (p - onehot(y))ᵀ x / B
    for _ in range(3):
        state = g.get_state()
        (grad,) = torch.autograd.grad(sampled_label_loss((x @ w.T).view(2, 3, C), generator=g), [w])
        g.set_state(state)
        labels = sophia.sample_labels(logits.view(2, 3, C), generator=g).reshape(B)
        torch.testing.assert_close(grad, (probs - F.one_hot(labels, C)).T @ x / B)
    # the same closed form over K independent draws of all B labels at once
    labels = sophia.sample_labels(logits.detach().expand(K, B, C), generator=g)  # (K, B)
    grads = torch.einsum("kbc,bd->kcd", probs - F.one_hot(labels, C).double(), x.double()) / B
    samples = B * grads * grads
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(K)
    assert torch.all(stderr < 0.01 * exact), (stderr / exact)
    assert torch.all((mean - exact).abs() <= 5 * stderr), ((mean - exact) / stderr)


def test_sampled_label_loss_follows_the_model():
    logits = torch.tensor([[0.0, -1e4, -1e4], [-1e4, -1e4, 0.0]], requires_grad=True)
    loss = sampled_label_loss(logits)  # the only likely labels are 0 and 2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 2])))
    loss.backward()
    assert logits.grad.abs().max() < 1e-6  # the model already predicts its own labels


def test_hutchinson_estimate_is_hessian_diagonal():
    """A tanh network (indefinite Hessian): the mean of u ⊙ (H u) approaches diag(H)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    w1, w2 = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)

    def loss_fn(w1, w2):
        return ((torch.tanh(x @ w1.T) @ w2 - y) ** 2).mean()

    hessian = torch.autograd.functional.hessian(loss_fn, (w1.detach(), w2.detach()))
    exact_w1 = torch.diagonal(hessian[0][0].reshape(12, 12)).reshape(4, 3).double()
    exact_w2 = torch.diagonal(hessian[1][1]).double()
    assert (exact_w1 < 0).any() and (exact_w1 > 0).any()  # indefinite: Hutchinson must keep the sign
    samples = [hutchinson_hessian(loss_fn(w1, w2), [w1, w2, unused], generator=g) for _ in range(2000)]
    assert all(torch.equal(s[2], torch.zeros(2)) for s in samples)  # not in the graph: zeros
    assert_unbiased([s[0] for s in samples], exact_w1)
    assert_unbiased([s[1] for s in samples], exact_w2)


def test_hutchinson_gives_zeros_where_the_loss_is_linear_in_a_param():
    """Zeros for a param whose gradient has no path back to it (it depends on an input that
    requires grad, not on a param) and when no param has curvature at all."""
    x = torch.randn(3, requires_grad=True)  # an input, not a param: grad of a is x
    a, c = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    estimates = hutchinson_hessian((a * x).sum() + (c ** 2).sum(), [a, c], generator=torch.Generator())
    assert torch.equal(estimates[0], torch.zeros(3))
    assert torch.equal(estimates[1], torch.full((2,), 2.0))  # u * (2 u) with u = ±1
    linear = hutchinson_hessian((2 * a).sum() + c.sum(), [a, c], generator=torch.Generator())
    assert torch.equal(linear[0], torch.zeros(3)) and torch.equal(linear[1], torch.zeros(2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(betas=(1.0, 0.99)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(rho=-1.0), "Invalid rho value: -1.0"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(foreach=True, fused=True), "^SophiaG: fused=True and foreach=True cannot be combined; pick one$"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SophiaG([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("betas", [(0.9, 1.0), (0.9, 1.5)])
def test_beta2_of_one_or_more_is_refused(betas):
    with pytest.raises(ValueError, match=f"Invalid beta parameter at index 1: {betas[1]}"):
        SophiaG([torch.zeros(2, requires_grad=True)], betas=betas)


def test_documented_defaults_and_the_closed_ends_of_each_range():
    opt = SophiaG([torch.zeros(2, requires_grad=True)])
    assert opt.defaults == dict(lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, maximize=False,
                                capturable=False, foreach=None, fused=None)
    p = torch.ones(2, requires_grad=True)
    edge = SophiaG([p], lr=0.0, betas=(0.0, 0.0), rho=0.0, weight_decay=0.0, foreach=False)  # all allowed
    p.grad = torch.tensor([1.0, -1.0])
    edge.update_hessian()
    edge.step()
    assert torch.equal(p, torch.ones(2))  # lr 0 moves nothing
    torch.testing.assert_close(edge.state[p]["exp_avg"], p.grad)  # beta1 0: the gradient itself


def test_default_implementation_is_the_fused_kernel_where_it_applies(fused_cpu):
    """fused for contiguous fp32 or bf16 tensors of one dtype, foreach otherwise (fp16, fp64, mixed
    dtypes, a non-contiguous tensor); foreach=False is the reference, fused=True falls back likewise."""
    opt = SophiaG([torch.zeros(2, requires_grad=True)])
    def choice(dtypes, contiguous=(True, True, True, True), **flags):
        group = dict(opt.param_groups[0], **flags)
        tensors = [torch.zeros(6, 4, dtype=d) if c else torch.zeros(4, 6, dtype=d).t()
                   for d, c in zip(dtypes, contiguous)]
        return opt._implementation(group, tensors)
    f32, bf16 = [torch.float32] * 4, [torch.bfloat16] * 4
    assert choice(f32) == "fused" and choice(bf16) == "fused"
    assert choice([torch.float16] * 4) == "foreach" and choice([torch.float64] * 4) == "foreach"
    assert choice([torch.float32, torch.bfloat16, torch.float32, torch.float32]) == "foreach"
    assert choice(f32, contiguous=(False, True, True, True)) == "foreach"
    assert choice(f32, contiguous=(True, False, True, True)) == "foreach"
    assert choice(f32, foreach=False) == "reference" and choice(f32, foreach=True) == "foreach"
    assert choice(f32, fused=True) == "fused" and choice([torch.float16] * 4, fused=True) == "foreach"


def test_default_path_on_a_transposed_parameter_equals_the_reference(fused_cpu):
    """A parameter stored transposed with a contiguous gradient: the fused kernel, which walks memory
    linearly, must not take it; the result is the reference's, bit for bit."""
    results = []
    for flags in (dict(), dict(foreach=False)):
        g = torch.Generator().manual_seed(0)
        p = torch.randn(7, 9, generator=g).t().detach().requires_grad_()
        opt = SophiaG([p], lr=0.05, rho=0.02, **flags)
        for it in range(4):
            p.grad = torch.randn(9, 7, generator=g)
            if it % 2 == 0:
                opt.update_hessian()
            opt.step(bs=10)
        results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["hessian"].clone()))
    for a, b in zip(*results):
        assert_bitwise_equal(a, b)


def test_bad_inputs_at_step_time():
    p = torch.zeros(4, requires_grad=True)
    opt = SophiaG([p])
    p.grad = torch.zeros(4)
    with pytest.raises(ValueError, match="Invalid bs value: 0"):
        opt.step(bs=0)
    with pytest.raises(ValueError, match="hessian_estimates has 2 entries but the optimizer has 1"):
        opt.update_hessian([torch.zeros(4), torch.zeros(4)])
    with pytest.raises(ValueError, match="no step.. taken since construction or loading; pass bs="):
        opt.diagnostics()
    with pytest.raises(ValueError, match="no parameter has optimizer state yet"):
        opt.diagnostics(bs=10)
    opt.update_hessian()  # state now, but no step to take bs from
    with pytest.raises(ValueError, match="no step.. taken since construction or loading; pass bs="):
        opt.diagnostics()
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="SophiaG does not support sparse gradients"):
        opt.step()


def test_update_hessian_before_step_creates_state():
    p = torch.ones(3, requires_grad=True)
    opt = SophiaG([p], betas=(0.9, 0.5), foreach=False)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.update_hessian()
    assert opt.state[p]["step"].item() == 0
    torch.testing.assert_close(opt.state[p]["hessian"], torch.tensor([0.5, 2.0, 4.5]))
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))


def test_lr_schedule_on_fused_path_matches_reference_without_recompiling(fused_cpu, monkeypatch):
    compiles = []
    monkeypatch.setattr(sophia.subprocess, "run", lambda *args, **kwargs: compiles.append(args))
    results = []
    for flags in (dict(foreach=False), dict(fused=True)):
        p = torch.linspace(-1, 1, 1000).requires_grad_()
        opt = SophiaG([p], lr=1e-3, rho=0.05, **flags)
        g = torch.Generator().manual_seed(0)
        for it in range(6):
            opt.param_groups[0]["lr"] = 1e-3 * (it + 1) / 6  # warmup
            p.grad = torch.randn(1000, generator=g)
            if it % 2 == 0:
                opt.update_hessian()
            opt.step(bs=10)
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1]) and not compiles


def test_default_falls_back_to_foreach_with_one_warning_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sophia, "_kernels", {})
    monkeypatch.setattr(sophia, "_warned_fallback", set())
    p = torch.ones(5, requires_grad=True)
    opt = SophiaG([p])
    p.grad = torch.ones(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    assert len(caught) == 1 and "no-such-compiler" in str(caught[0].message)
    assert opt._implementation(opt.param_groups[0], [p, p.grad, p, p]) == "foreach"
    with pytest.raises(RuntimeError, match="fused kernel unavailable on cpu"):
        SophiaG([p], fused=True).step()


def test_diagnostics_on_device_match_direct_computation():
    params = make_params(torch.float32)[:4]
    opt = SophiaG([dict(params=params[:2], rho=0.05), dict(params=params[2:], rho=0.5)])
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.update_hessian()
        opt.step(bs=7)
    stats = opt.diagnostics()
    assert all(v.dim() == 0 and v.device == params[0].device for v in stats.values())
    hessians = [opt.state[p]["hessian"] for p in params]
    avgs = [opt.state[p]["exp_avg"] for p in params]
    rhos = [0.05, 0.05, 0.5, 0.5]
    not_clipped = sum(int((m.abs() < rho * 7 * h).sum()) for m, h, rho in zip(avgs, hessians, rhos))
    total = sum(m.numel() for m in avgs)
    torch.testing.assert_close(stats["win_rate"].item(), not_clipped / total)
    assert 0 < not_clipped < total
    flat_h, flat_m = torch.cat([h.flatten() for h in hessians]), torch.cat([m.flatten() for m in avgs])
    torch.testing.assert_close(stats["hessian_norm"], flat_h.abs().sum())
    torch.testing.assert_close(stats["hessian_norm2"], flat_h.norm())
    torch.testing.assert_close(stats["momentum_norm"], flat_m.norm())

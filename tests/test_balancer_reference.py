"""Every registered balancer against its reference's definition, on a toy problem.

The toy: a shared layer (Linear 4→5 + tanh) and one linear head per task, three tasks with real task names
(semseg: a classification task for uncertainty weighting; depth, normals: regression tasks) and squared-error
losses of different scales. For each balancer and each of a few SGD steps, the test compares the gradients the
balancer leaves on the shared layer and on the heads, and the balancer's weights, with what the reference's
*formula* gives (written below from the paper / repository, not from this project's code), then compares the
parameters after the steps. ``CASES`` must hold a case for every name in the balancer registry: a new balancer
without a reference fails :func:`test_every_registered_balancer_has_a_reference`.

Versions: the papers as published (conference versions); the repositories named in each docstring at their
default branch as reviewed for issue 32 (no commit is pinned here: none was recorded in that review).
"""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from downstream.mtl.balancers import SharedParts, balancer_names, build_balancer

TASKS = ("semseg", "depth", "normals")
SCALES = (1.0, 3.0, 0.5)  # the tasks' loss scales: unequal on purpose
LR = 0.1
STEPS = 6  # two steps per epoch: three epochs (DWA's weights move in the third)
KPIS = torch.tensor([[0.30, 0.80, 0.55], [0.40, 0.70, 0.50], [0.45, 0.75, 0.60],
                     [0.50, 0.60, 0.65], [0.55, 0.85, 0.35], [0.60, 0.90, 0.40]])  # DTP's per-step KPIs


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})

    def losses(self, step):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 4, generator=g)
        z = self.shared(x)
        return {t: s * (self.heads[t](z) - torch.randn(8, 1, generator=g)).pow(2).mean() for t, s in zip(TASKS, SCALES)}


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def grad_of(loss, params, retain=True):
    return flat(torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=False))


class Reference:
    """One reference step: the gradients of every model parameter and the weights after the step."""

    def __init__(self, model):
        self.model = model
        self.shared = list(model.shared.parameters())
        self.heads = list(model.heads.parameters())
        self.params = self.shared + self.heads

    def step(self, losses, step, epoch):  # -> (gradient of every parameter [flat], weights [T] or None)
        raise NotImplementedError

    def update(self):  # the reference's own parameters (uncertainty's log σ²), SGD like the model
        pass


def plain(losses, weights, params):
    return grad_of(sum(w * losses[t] for w, t in zip(weights, TASKS)), params)


def shared_then_heads(shared_grad, head_weights, ref, losses):
    return torch.cat([shared_grad, plain(losses, head_weights, ref.heads)])


# ------------------------------------------------------------------------------------------ loss weighting
class FixedRef(Reference):
    """Equal weights: the gradient of Σ_t L_t on every parameter."""

    def step(self, losses, step, epoch):
        return plain(losses, [1.0] * 3, self.params), torch.ones(3)


class UncertaintyRef(Reference):
    """Kendall, Gal & Cipolla, "Multi-task learning using uncertainty to weigh losses", CVPR 2018, Eq. 7 and 10:
    ``1/(2σ²) L`` for a regression task, ``1/σ² L`` for a classification task, ``+ log σ`` each.
    ``libmtl``: LibMTL (median-research-group/LibMTL, ``LibMTL/weighting/UW.py``) and lorenmt/mtan
    (``im2im_pred/model_segnet_mtan.py``, weight "uncert"): ``1/(2σ²) L + log σ`` for every task, log σ² from −0.5."""

    def __init__(self, model, convention="paper"):
        super().__init__(model)
        self.log_var = torch.full((3,), 0.0 if convention == "paper" else -0.5, requires_grad=True)
        self.factor = [0.5 if convention == "libmtl" or t != "semseg" else 1.0 for t in TASKS]

    def step(self, losses, step, epoch):
        sigma2 = torch.exp(self.log_var)
        total = sum(self.factor[i] / sigma2[i] * losses[t] + torch.log(torch.sqrt(sigma2[i])) for i, t in enumerate(TASKS))
        grads = torch.autograd.grad(total, self.params + [self.log_var], retain_graph=True)
        self._log_var_grad = grads[-1]
        return flat(grads[:-1]), torch.tensor(self.factor) / sigma2.detach()

    def update(self):
        with torch.no_grad():
            self.log_var -= LR * self._log_var_grad


class GradNormRef(Reference):
    """Chen et al., "GradNorm", ICML 2018, Algorithm 1: G_i = ‖∇_W w_i L_i‖₂ on the last shared layer W,
    Ḡ = mean_i G_i, r_i = L̃_i / mean L̃ with L̃_i = L_i(t)/L_i(0), L_grad = Σ_i |G_i − Ḡ r_i^α| with the targets
    constant; the network steps on Σ w_i L_i, w on ∇_w L_grad (plain gradient step ``lr``; ``normalized``: that
    gradient divided by the mean of ‖∇_W L_i‖), then Σ w = T."""

    def __init__(self, model, alpha=1.5, lr=0.025, convention="paper"):
        super().__init__(model)
        self.w, self.alpha, self.lr, self.convention, self.L0 = torch.ones(3), alpha, lr, convention, None
        self.W = list(model.shared[0].parameters())

    def step(self, losses, step, epoch):
        L = torch.stack([losses[t] for t in TASKS]).detach()
        if self.L0 is None:
            self.L0 = L.clone()
        grads = plain(losses, self.w.tolist(), self.params)
        w = self.w.clone().requires_grad_(True)
        n = torch.stack([grad_of(losses[t], self.W).norm() for t in TASKS])
        G = w * n
        ratio = (L / self.L0) / (L / self.L0).mean()
        target = (G.mean() * ratio ** self.alpha).detach()
        (dw,) = torch.autograd.grad((G - target).abs().sum(), w)
        if self.convention == "normalized":
            dw = dw / n.mean()
        new = (self.w - self.lr * dw).clamp(min=1e-3)
        self.w = 3 * new / new.sum()
        return grads, self.w.clone()


class DWARef(Reference):
    """Liu, Johns & Davison, "End-to-end multi-task learning with attention" (MTAN), CVPR 2019, Eq. 7:
    λ_k(t) = K exp(w_k(t−1)/T) / Σ_i exp(w_i(t−1)/T), w_k(t−1) = L_k(t−1)/L_k(t−2) on epoch-mean losses,
    λ = 1 for the first two epochs; T = 2 (lorenmt/mtan's default)."""

    def __init__(self, model, temperature=2.0):
        super().__init__(model)
        self.temp, self.means, self.current, self.sums, self.w = temperature, [], None, [], torch.ones(3)

    def step(self, losses, step, epoch):
        if epoch != self.current:
            if self.sums:
                self.means.append(torch.stack(self.sums).mean(0))
                if len(self.means) >= 2:
                    r = self.means[-1] / self.means[-2]
                    self.w = 3 * torch.exp(r / self.temp) / torch.exp(r / self.temp).sum()
            self.current, self.sums = epoch, []
        self.sums.append(torch.stack([losses[t] for t in TASKS]).detach())
        return plain(losses, self.w.tolist(), self.params), self.w.clone()


class DTPRef(Reference):
    """Guo et al., "Dynamic task prioritization for multitask learning", ECCV 2018, Sec. 3.3 (task level):
    L = Σ_t FL(κ̄_t; γ_t) L_t with FL(κ; γ) = −(1 − κ)^γ log κ and κ̄_t^(τ) = α κ_t^(τ) + (1 − α) κ̄_t^(τ−1).
    α = 1 − momentum = 0.1 (the paper gives no value); the first KPI starts the average; γ = 1."""

    def __init__(self, model, alpha=0.1, gamma=1.0):
        super().__init__(model)
        self.alpha, self.gamma, self.kappa = alpha, gamma, None

    def step(self, losses, step, epoch):
        k = KPIS[step]
        self.kappa = k.clone() if self.kappa is None else self.alpha * k + (1 - self.alpha) * self.kappa
        w = -(1 - self.kappa) ** self.gamma * torch.log(self.kappa)
        return plain(losses, w.tolist(), self.params), w


class AutoMagnitudeRef(Reference):
    """The thesis heuristic (SPEC §2, auto_magnitude): weights 1 while the mean losses m_t of the first ``iters``
    steps are measured, then fixed λ_t = mean_s(m_s)/m_t (equal average weighted magnitudes)."""

    def __init__(self, model, iters=2):
        super().__init__(model)
        self.iters, self.seen, self.w = iters, [], torch.ones(3)

    def step(self, losses, step, epoch):
        grads = plain(losses, self.w.tolist(), self.params)
        if len(self.seen) < self.iters:
            self.seen.append(torch.stack([losses[t] for t in TASKS]).detach())
            if len(self.seen) == self.iters:
                m = torch.stack(self.seen).mean(0)
                self.w = m.mean() / m
        return grads, self.w.clone()


# ------------------------------------------------------------------------------------ gradient manipulation
def min_norm_exact(G):
    """argmin_{α ∈ simplex} αᵀGα by enumerating the active sets (KKT on each face; exact for few tasks)."""
    G = G.double()
    best, best_alpha = math.inf, None
    T = G.shape[0]
    for k in range(1, T + 1):
        for face in itertools.combinations(range(T), k):
            idx = list(face)
            Gs = G[idx][:, idx]
            try:
                x = torch.linalg.solve(Gs, torch.ones(k, dtype=torch.float64))
            except RuntimeError:
                continue
            if x.sum() <= 0:
                continue
            a = x / x.sum()
            if (a < -1e-12).any():
                continue
            alpha = torch.zeros(T, dtype=torch.float64)
            alpha[idx] = a.clamp(min=0)
            value = float(alpha @ G @ alpha)
            if value < best:
                best, best_alpha = value, alpha
    return best_alpha


class MGDARef(Reference):
    """Sener & Koltun, "Multi-task learning as multi-objective optimization", NeurIPS 2018, Algorithm 2:
    α = argmin_{α ∈ simplex} ‖Σ_t α_t ∇_θsh L_t‖², θ_sh ← θ_sh − η Σ_t α_t ∇_θsh L_t, θ_t ← θ_t − η ∇_θt L_t.
    ``upper_bound`` (MGDA-UB, Sec. 3.3): the gradients w.r.t. the shared representation z instead.
    ``published`` (isl-org/MultiObjectiveOptimization, ``multi_task/train_multi_task.py``): backward of Σ α_t L_t,
    so the heads' gradients are scaled by α too. ``normalize`` (its ``gradient_normalizers``): the gradients are
    divided by 1 / ‖g_t‖ / L_t / L_t‖g_t‖ (none / l2 / loss / loss+) to solve; α multiply the raw losses."""

    def __init__(self, model, upper_bound=False, convention="paper", normalize="none"):
        super().__init__(model)
        self.ub, self.convention, self.normalize = upper_bound, convention, normalize
        self.z = None
        model.shared.register_forward_hook(lambda m, i, o: setattr(self, "z", o))

    def step(self, losses, step, epoch):
        wrt = [self.z] if self.ub else self.shared
        g = torch.stack([grad_of(losses[t], wrt) for t in TASKS]).double()
        L = torch.stack([losses[t] for t in TASKS]).detach().double()
        norm = {"none": torch.ones(3, dtype=torch.float64), "l2": g.norm(dim=1), "loss": L,
                "loss+": L * g.norm(dim=1)}[self.normalize]
        gn = g / norm[:, None]
        alpha = min_norm_exact(gn @ gn.T).float()
        shared = plain(losses, alpha.tolist(), self.shared)
        heads = alpha.tolist() if self.convention == "published" else [1.0] * 3
        return torch.cat([shared, plain(losses, heads, self.heads)]), alpha


class PCGradRef(Reference):
    """Yu et al., "Gradient surgery for multi-task learning", NeurIPS 2020, Algorithm 1: for each task i,
    g_i^PC ← g_i, then for each other task j in a random order: if g_i^PC · g_j < 0,
    g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j; the shared update is Σ_i g_i^PC (the paper's sum;
    ``reduction: mean``: WeiChengTseng/Pytorch-PCGrad's default mean). The heads get ∇ Σ L_t. The random order
    is the one this project documents: per step a generator seeded with seed·1000003 + step, one ``randperm(T)`` per task."""

    def __init__(self, model, seed=0, reduction="sum"):
        super().__init__(model)
        self.seed, self.reduction = seed, reduction

    def step(self, losses, step, epoch):
        g = torch.stack([grad_of(losses[t], self.shared) for t in TASKS]).double()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        total = torch.zeros_like(g[0])
        for i in range(3):
            pc = g[i].clone()
            for j in [j for j in torch.randperm(3, generator=gen).tolist() if j != i]:
                if float(pc @ g[j]) < 0:
                    pc = pc - (pc @ g[j]) / (g[j] @ g[j]) * g[j]
            total += pc
        if self.reduction == "mean":
            total = total / 3
        return torch.cat([total.float(), plain(losses, [1.0] * 3, self.heads)]), None


class CAGradRef(Reference):
    """Liu et al., "Conflict-averse gradient descent for multi-task learning", NeurIPS 2021, Eq. 3 (the primal):
    d* = argmax_d min_i g_iᵀ d subject to ‖d − g_0‖ ≤ c‖g_0‖, g_0 = mean_i g_i; solved here in d-space (an
    epigraph program), not through the paper's dual. The update (Algorithm 1 and Cranial-XIX/CAGrad
    ``nyuv2/utils.py``: rescale 1 divides by 1 + c², ``overwrite_grad`` multiplies by T "to match the sum loss"):
    T·d*/(1 + c²) on the shared parameters, ∇ Σ L_t on the heads. ``libmtl`` (LibMTL ``weighting/CAGrad.py``):
    without the factor T."""

    def __init__(self, model, c=0.4, convention="paper"):
        super().__init__(model)
        self.c, self.convention = c, convention

    def step(self, losses, step, epoch):
        g = torch.stack([grad_of(losses[t], self.shared) for t in TASKS]).double().numpy()
        g0 = g.mean(0)
        radius = self.c * np.linalg.norm(g0)
        scale = 1.0 / np.linalg.norm(g0)  # a well-conditioned program: work in units of ‖g_0‖
        gs, g0s, r = g * scale, g0 * scale, radius * scale
        n = g.shape[1]
        x0 = np.concatenate([g0s, [float((gs @ g0s).min())]])  # d = g_0 is feasible
        cons = [{"type": "ineq", "fun": lambda x: gs @ x[:n] - x[n], "jac": lambda x: np.hstack([gs, -np.ones((3, 1))])},
                {"type": "ineq", "fun": lambda x: r ** 2 - np.sum((x[:n] - g0s) ** 2),
                 "jac": lambda x: np.concatenate([-2 * (x[:n] - g0s), [0.0]])}]
        res = minimize(lambda x: -x[n], x0, jac=lambda x: np.concatenate([np.zeros(n), [-1.0]]), method="SLSQP",
                       constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
        assert res.success, res.message
        d = torch.from_numpy(res.x[:n] / scale) / (1 + self.c ** 2)
        if self.convention == "paper":
            d = d * 3
        return torch.cat([d.float(), plain(losses, [1.0] * 3, self.heads)]), None


# name -> list of (balancer_args, reference factory, tolerance)
CASES = {
    "fixed": [({}, FixedRef, 1e-6)],
    "uncertainty": [({}, UncertaintyRef, 1e-6),
                    ({"convention": "libmtl"}, lambda m: UncertaintyRef(m, "libmtl"), 1e-6)],
    "gradnorm": [({}, GradNormRef, 1e-6),
                 ({"convention": "normalized"}, lambda m: GradNormRef(m, convention="normalized"), 1e-6)],
    "dwa": [({}, DWARef, 1e-6)],
    "dtp": [({}, DTPRef, 1e-6)],
    "auto_magnitude": [({"iters": 2}, AutoMagnitudeRef, 1e-6)],
    "mgda": [({}, MGDARef, 1e-4),
             ({"convention": "published", "normalize": "loss+"},
              lambda m: MGDARef(m, convention="published", normalize="loss+"), 1e-4),
             ({"normalize": "l2"}, lambda m: MGDARef(m, normalize="l2"), 1e-4)],
    "mgda_ub": [({}, lambda m: MGDARef(m, upper_bound=True), 1e-4),
                ({"convention": "published"}, lambda m: MGDARef(m, upper_bound=True, convention="published"), 1e-4),
                ({"normalize": "loss"}, lambda m: MGDARef(m, upper_bound=True, normalize="loss"), 1e-4)],
    "pcgrad": [({}, PCGradRef, 1e-6), ({"reduction": "mean"}, lambda m: PCGradRef(m, reduction="mean"), 1e-6)],
    "cagrad": [({}, CAGradRef, 1e-4),
               ({"convention": "libmtl"}, lambda m: CAGradRef(m, convention="libmtl"), 1e-4),
               ({"c": 0.0}, lambda m: CAGradRef(m, c=0.0), 1e-6)],
}


def test_every_registered_balancer_has_a_reference():
    missing = sorted(set(balancer_names()) - set(CASES))
    assert not missing, f"balancers without a reference test in {__file__}: {missing}"


def _run_pair(name, args, factory):
    """The balancer and its reference side by side, each on its own copy of the same toy."""
    torch.manual_seed(0)
    model, ref_model = Toy(), Toy()
    ref_model.load_state_dict(model.state_dict())
    bal = build_balancer(name, tasks=TASKS, args=args)
    shared = SharedParts(params=list(model.shared.parameters()), last_layer=list(model.shared[0].parameters()),
                         other=list(model.heads.parameters()))
    if bal.needs_representation:
        shared.capture_output_of(model.shared)
    ref = factory(ref_model)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=LR)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
    for step in range(STEPS):
        epoch = step // 2
        opt.zero_grad()
        bal.backward(model.losses(step), shared=shared, step=step, epoch=epoch,
                     kpi=KPIS[step] if bal.needs_kpi else None)
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        expected, weights = ref.step(ref_model.losses(step), step, epoch)
        yield step, bal, got, expected, weights
        opt.step()
        ref_opt.zero_grad()
        offset = 0
        for p in ref_model.parameters():
            p.grad = expected[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        ref_opt.step()
        ref.update()
    yield None, bal, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), \
        torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()]), ref


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(CASES))
def test_balancer_matches_its_reference(name):
    if name not in balancer_names():
        pytest.fail(f"{name} has a reference case but is not registered")
    n_shared = sum(p.numel() for p in Toy().shared.parameters())
    for args, factory, tol in CASES[name]:
        for step, bal, got, expected, weights in _run_pair(name, args, factory):
            what = f"{name} {args} step {step}"
            scale = expected.abs().max().clamp(min=1e-3)
            if step is None:  # the parameters after the steps
                assert torch.allclose(got, expected, rtol=0, atol=10 * tol * scale), f"{what}: parameters after {STEPS} steps"
                if isinstance(weights, UncertaintyRef):
                    assert torch.allclose(bal.log_vars.detach(), weights.log_var.detach(), atol=1e-6)
                continue
            assert torch.allclose(got[:n_shared], expected[:n_shared], rtol=0, atol=tol * scale), f"{what}: shared gradients"
            assert torch.allclose(got[n_shared:], expected[n_shared:], rtol=0, atol=tol * scale), f"{what}: head gradients"
            if weights is not None:
                assert torch.allclose(bal.lambdas, weights.float(), rtol=0, atol=max(tol, 1e-6) * 10), \
                    f"{what}: weights {bal.lambdas.tolist()} vs the reference's {weights.tolist()}"


@pytest.mark.timeout(60)
def test_cagrad_with_c0_equals_fixed_on_every_parameter():
    """The issue's measurement: the ratio of CAGrad(c = 0)'s to fixed's gradient norm on the encoder is 1.0."""
    grads = {}
    for name, args in (("fixed", {}), ("cagrad", {"c": 0.0}), ("cagrad_libmtl", {"c": 0.0, "convention": "libmtl"})):
        torch.manual_seed(0)
        model = Toy()
        bal = build_balancer(name.split("_")[0], tasks=TASKS, args=args)
        shared = SharedParts(params=list(model.shared.parameters()), last_layer=[], other=list(model.heads.parameters()))
        bal.backward(model.losses(0), shared=shared)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    n = len(list(Toy().shared.parameters()))
    for a, b in zip(grads["cagrad"], grads["fixed"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    encoder_ratio = float(flat(grads["cagrad"][:n]).norm() / flat(grads["fixed"][:n]).norm())
    assert encoder_ratio == pytest.approx(1.0, abs=1e-6)
    libmtl_ratio = float(flat(grads["cagrad_libmtl"][:n]).norm() / flat(grads["fixed"][:n]).norm())
    assert libmtl_ratio == pytest.approx(1 / len(TASKS), rel=1e-5)  # LibMTL's mean: the encoder at 1/T
    for a, b in zip(grads["cagrad_libmtl"][n:], grads["fixed"][n:]):  # the heads get the sum in both
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

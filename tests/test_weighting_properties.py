"""Invariants of every weighting method (hypothesis), the present-mask semantics, edge cases (M = 0,
T = 1, empty modules, NaN / Inf), option validation, per-module state and bitwise re-runs."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgs_kernels import _settings
from mgs_kernels import MGSInputError
from mgs_kernels.weighting import get_weighting, methods
from test_weighting_families import FAMILIES, direction, gram_of, jacobians

# One configuration per method (the required options set); every default is exercised elsewhere.
CONFIGS = {
    "sum": {}, "mean": {}, "constant": None, "random": {}, "upgrad": {}, "dualproj": {}, "mgda": {},
    "cagrad": dict(c=0.5), "imtl_g": {}, "aligned_mtl": {}, "config": {}, "fairgrad": dict(alpha=1.5),
    "nash_mtl": dict(max_norm=0.0), "gradvac": {}, "krum": dict(n_byzantine=1, n_selected=2),
}
EXTRA = {"mgda_exact": ("mgda", dict(solver="exact")), "aligned_mtl_median": ("aligned_mtl", dict(scale_mode="median")),
         "aligned_mtl_rmse": ("aligned_mtl", dict(scale_mode="rmse")), "upgrad_enumerate": ("upgrad", dict(solver="enumerate")),
         "dualproj_enumerate": ("dualproj", dict(solver="enumerate")), "nash_mtl_clip": ("nash_mtl", {})}
ALL = sorted(CONFIGS) + sorted(EXTRA)
# Deterministic given the Gram and the Gram's task order (no random draws).
DETERMINISTIC = [k for k in ALL if k not in ("random", "gradvac")]
# MGS_HYPOTHESIS_SCALE=N multiplies the examples per test (a local soak for rare cases; CI runs 1).
HYP = settings(max_examples=12 * _settings.get("MGS_HYPOTHESIS_SCALE"), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def make(key, T=None):
    name, opts = EXTRA.get(key, (key, CONFIGS.get(key)))
    if name == "constant":
        opts = dict(weights=[0.5 + 0.25 * k for k in range(T)])
    return get_weighting(name, opts)


def call(w, G, seed=0, state=None, info=None):
    if w.stateful and state is None:
        state = w.init_state(G.shape[0], G.shape[1], G.device)
    return w(G, state=state, generator=torch.Generator().manual_seed(seed), info=info if info is not None else {},
             dtype=torch.float64)


def min_tasks(key):
    return 4 if key == "krum" else 1  # krum here: n_byzantine=1 needs T >= 4


def grams(seed, family, M, T, scale=1.0):
    J = jacobians(family, M, T, torch.Generator().manual_seed(seed))
    return J, gram_of(J) * scale


def test_every_method_is_registered():
    assert set(CONFIGS) <= set(methods())  # (pcgrad, the integrator's, may be registered too)
    assert set(methods()) - set(CONFIGS) <= {"pcgrad"}


# ----------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("key", ALL)
@HYP
@given(seed=st.integers(0, 2 ** 31), T=st.integers(1, 8), log_c=st.floats(-12, 12),
       family=st.sampled_from(["gaussian", "conflicting", "heterogeneous", "zero_row"]))
def test_scale(key, seed, T, log_c, family):
    """Scale-invariant methods: W(c G) = W(G). FairGrad: W(c G) = c^(-a/(a+1)) W(G); Nash-MTL without
    its clip: W(c G) = W(G) / sqrt(c); GradVac's absolute eps makes it neither."""
    T = max(T, min_tasks(key))
    w = make(key, T)
    if key == "gradvac":
        return
    _, G = grams(seed, family, 3, T)
    c = 10.0 ** log_c
    a, b = call(w, G), call(make(key, T), G * c)
    if key == "fairgrad":
        a = a * c ** (-1.5 / 2.5)
    elif key == "nash_mtl":
        a = a / c ** 0.5
    elif key == "nash_mtl_clip":
        return  # max_norm is absolute
    assert type(w).scale_invariant == (key not in ("fairgrad", "nash_mtl", "nash_mtl_clip", "gradvac"))
    tol = 1e-5 if key == "mgda" else 1e-8  # Frank-Wolfe's argmin may flip on rounding-level near-ties
    assert torch.allclose(b, a, rtol=tol, atol=tol * a.abs().max().item())


@pytest.mark.parametrize("key", [k for k in DETERMINISTIC if k not in ("constant", "mgda")])
@HYP
@given(seed=st.integers(0, 2 ** 31), T=st.integers(1, 8), family=st.sampled_from(FAMILIES), data=st.data())
def test_permutation_equivariance(key, seed, T, family, data):
    """Relabelling the tasks relabels the weights (directions for singular Grams, whose weights are
    defined by the regularisation; Krum compares selected scores, being tie-sensitive)."""
    T = max(T, min_tasks(key))
    perm = torch.tensor(data.draw(st.permutations(list(range(T)))))
    J, G = grams(seed, family, 3, T)
    ia, ib = {}, {}
    a = call(make(key, T), G, info=ia)
    b = call(make(key, T), G[:, perm][:, :, perm], info=ib)
    if key == "krum":
        return
    if key in ("fairgrad", "nash_mtl", "nash_mtl_clip"):
        # Pareto-stationary modules have no solution (zero weights); a nearly stationary one may end
        # the iteration cap converged in one task order and not the other: compare where both did.
        both = ia["converged"] & ib["converged"]
        J, a, b = J[both], a[both], b[both]
    da, db = direction(J, a), direction(J[:, perm], b)
    scale = J.double().norm(dim=(1, 2))[:, None]
    assert torch.allclose(da, db, rtol=0, atol=1e-6) or ((da - db).abs() <= 1e-7 * scale).all()
    if family in ("gaussian", "conflicting", "heterogeneous"):
        assert torch.allclose(b, a[:, perm], rtol=1e-7, atol=1e-9 * a.abs().max().item())


@pytest.mark.parametrize("key", DETERMINISTIC)
@HYP
@given(seed=st.integers(0, 2 ** 31), n=st.integers(1, 6), extra=st.integers(1, 3), family=st.sampled_from(FAMILIES),
       data=st.data())
def test_absent_tasks_are_left_out(key, seed, n, extra, family, data):
    """Inserting tasks with no gradient gives the compact problem's weights, and 0 for them."""
    n = max(n, min_tasks(key))
    T = n + extra
    J, G_small = grams(seed, family, 3, n)
    keep = sorted(data.draw(st.lists(st.integers(0, T - 1), min_size=n, max_size=n, unique=True)))
    idx = torch.tensor(keep)
    G = torch.zeros(3, T, T, dtype=torch.float64)
    G[:, idx[:, None], idx[None, :]] = G_small
    w_big = make(key, T)
    if key == "constant":  # the given weights of the kept tasks
        w_small = get_weighting("constant", dict(weights=[w_big.weights[k].item() for k in keep]))
    else:
        w_small = make(key, n)
    ia, ib = {}, {}
    a, b = call(w_big, G, info=ia), call(w_small, G_small, info=ib)
    absent = torch.ones(T, dtype=torch.bool)
    absent[idx] = False
    assert (a[:, absent] == 0).all()
    if key == "krum":
        return  # score ties may break differently
    if key in ("fairgrad", "nash_mtl", "nash_mtl_clip"):
        # Pareto-stationary modules have no solution (weights run off): compare the others.
        both = ia["converged"] & ib["converged"]
        if family in ("gaussian", "conflicting", "zero_row", "heterogeneous"):
            assert both.all()
        a, b, J = a[both], b[both], J[both]
    if family in ("rank_deficient", "few_dims", "parallel", "nearly_rank_deficient"):
        # Weights of (nearly) singular Grams are ill-conditioned; the directions are not.
        da, db = direction(J, a[:, idx]), direction(J, b)
        assert ((da - db).norm(dim=1) <= 1e-7 * J.double().norm(dim=(1, 2))).all()
        return
    # The larger problem runs other rotations / pivots: rounding differs by ~eps * condition number.
    tol = 1e-9 if family in ("gaussian", "conflicting", "zero_row") else 1e-6
    assert torch.allclose(a[:, idx], b, rtol=tol, atol=tol * 1e-3 * b.abs().max().item() + 1e-300)


def test_gradvac_absent_tasks_follow_the_compact_order(rng, monkeypatch):
    """GradVac skips pairs with a task that has no gradient: the result equals the compact problem
    visited in the induced order, and the targets of skipped pairs stay put."""
    import mgs_kernels.weighting.gradvac as gv

    T, keep = 6, [0, 2, 3, 5]
    J, G_small = grams(rng.randrange(1 << 30), "gaussian", 3, 4)
    G = torch.zeros(3, T, T, dtype=torch.float64)
    idx = torch.tensor(keep)
    G[:, idx[:, None], idx[None, :]] = G_small
    order = gv.draw_order(3, T, torch.Generator().manual_seed(1), G.device)
    pos = {k: i for i, k in enumerate(keep)}
    small_order = torch.tensor([[[pos[j] for j in order[m, i].tolist() if j in pos] for i in keep] for m in range(3)])
    w_big, w_small = get_weighting("gradvac"), get_weighting("gradvac")
    s_big, s_small = w_big.init_state(3, T, G.device), w_small.init_state(3, 4, G.device)
    s_big["phi"].fill_(0.3)
    s_small["phi"].fill_(0.3)
    monkeypatch.setattr(gv, "draw_order", lambda *a: order)
    a = w_big(G, state=s_big, dtype=torch.float64)
    monkeypatch.setattr(gv, "draw_order", lambda *a: small_order)
    b = w_small(G_small, state=s_small, dtype=torch.float64)
    assert torch.allclose(a[:, idx], b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(s_big["phi"][:, idx[:, None], idx[None, :]], s_small["phi"], rtol=1e-12, atol=1e-14)
    absent = [1, 4]
    assert (s_big["phi"][:, absent, :] == 0.3).all() and (s_big["phi"][:, :, absent] == 0.3).all()


def test_random_draws_do_not_depend_on_the_present_mask():
    G = torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()
    G2 = G.clone()
    G2[0, 1, 1] = 0.0
    a = call(get_weighting("random"), G, seed=7)
    b = call(get_weighting("random"), G2, seed=7)
    assert torch.equal(a[1], b[1])  # the other module saw the same draws
    assert b[0, 1] == 0 and torch.allclose(b[0].sum(), torch.tensor(1.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("key", ALL)
def test_no_modules(key):
    T = max(3, min_tasks(key))
    w = make(key, T)
    out = call(w, torch.zeros(0, T, T))
    assert out.shape == (0, T) and out.dtype == torch.float64


@pytest.mark.parametrize("key", ALL)
def test_empty_modules_get_zero_weights_and_do_not_disturb_others(key):
    T = max(3, min_tasks(key))
    _, G = grams(3, "gaussian", 4, T)
    G[1] = 0.0
    G[3] = 0.0
    info = {}
    out = call(make(key, T), G, info=info)
    assert torch.isfinite(out).all()
    assert (out[[1, 3]] == 0).all()
    ref = call(make(key, T), G[[0, 2]])
    if key not in ("random", "gradvac"):  # those draw per module: the draws of the others shift
        assert torch.equal(out[[0, 2]], ref)
    for v in info.values():
        assert v.shape[0] == 4


@pytest.mark.parametrize("key", [k for k in ALL if k != "krum"])
def test_single_task(key):
    G = torch.tensor([[[4.0]], [[0.25]], [[0.0]]], dtype=torch.float64)
    out = call(make(key, 1), G)
    expected = {"cagrad": 1.5, "fairgrad": None, "nash_mtl": None, "nash_mtl_clip": None, "constant": 0.5}
    e = expected.get(key, 1.0)
    if key == "fairgrad":  # G w = w^(-1/a): w = g^(-2a/(a+1))
        ref = torch.tensor([4.0 ** (-1.5 / 2.5), 0.25 ** (-1.5 / 2.5)], dtype=torch.float64)
    elif key in ("nash_mtl", "nash_mtl_clip"):  # w^2 G = 1, then the clip |J^T w| = 1 <= 1
        ref = torch.tensor([0.5, 2.0], dtype=torch.float64)
    else:
        ref = torch.full((2,), e, dtype=torch.float64)
    assert torch.allclose(out[:2, 0], ref, rtol=1e-12)
    assert out[2, 0] == 0


@pytest.mark.parametrize("key", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_modules_give_nan_and_leave_others_and_state_alone(key, bad):
    T = max(4, min_tasks(key))
    J, G = grams(5, "gaussian", 3, T)
    w = make(key, T)
    state = w.init_state(3, T, G.device) if w.stateful else None
    if state is not None:
        for v in state.values():
            v.copy_(torch.rand(v.shape, dtype=torch.float64).to(v.dtype) + 0.5)  # a non-trivial state
    before = copy.deepcopy(state)
    Gb = G.clone()
    Gb[1, 0, 2] = Gb[1, 2, 0] = bad
    Gb[1, 3, 3] = 0.0  # task 3 absent there: weight 0, not NaN
    out = call(w, Gb, state=state)
    assert torch.isnan(out[1, :3]).all() and out[1, 3] == 0
    if key not in ("random", "gradvac"):
        st2 = copy.deepcopy(before)
        if st2 is not None:  # the same state rows for the two finite modules
            st2 = {k: v[[0, 2]].clone() for k, v in st2.items()}
        ref = call(make(key, T), G[[0, 2]], state=st2)
        assert torch.equal(out[[0, 2]], ref)
    if state is not None:
        for k in state:
            if k != "step":  # a call counter counts every module
                assert torch.equal(state[k][1], before[k][1]), k


def test_output_dtype_and_validation():
    G = torch.eye(3).expand(2, 3, 3).clone()
    w = get_weighting("upgrad")
    assert w(G).dtype == torch.float32
    assert w(G, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(MGSInputError, match=r"\[M, T, T\]"):
        w(torch.zeros(3, 3))
    with pytest.raises(MGSInputError, match="at least one task"):
        w(torch.zeros(2, 0, 0))
    with pytest.raises(MGSInputError, match="floating point"):
        w(torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(MGSInputError, match="dtype"):
        w(G, dtype=torch.float16)


@pytest.mark.parametrize("method,options,word", [
    ("sum", dict(foo=1), "foo"),
    ("upgrad", dict(compat="jd"), "compat"),
    ("upgrad", dict(reg_eps=-1.0), "reg_eps"),
    ("upgrad", dict(norm_eps=1e-4), "norm_eps"),
    ("upgrad", dict(solver="magic"), "solver"),
    ("upgrad", dict(pref_vector=[[1.0]]), "pref_vector"),
    ("dualproj", dict(max_pivots=0), "max_pivots"),
    ("mgda", dict(epsilon=0.0), "epsilon"),
    ("mgda", dict(max_iters=0), "max_iters"),
    ("mgda", dict(solver="qp"), "solver"),
    ("cagrad", {}, "c"),
    ("cagrad", dict(c=-0.5), "c"),
    ("cagrad", dict(c=0.5, norm_eps=float("nan")), "norm_eps"),
    ("imtl_g", dict(compat=1), "compat"),
    ("aligned_mtl", dict(scale_mode="max"), "scale_mode"),
    ("config", dict(pref_vector=[1.0, float("inf")]), "pref_vector"),
    ("fairgrad", {}, "alpha"),
    ("fairgrad", dict(alpha=-1.0), "alpha"),
    ("nash_mtl", dict(max_norm=-1.0), "max_norm"),
    ("nash_mtl", dict(update_weights_every=0), "update_weights_every"),
    ("nash_mtl", dict(optim_niter=1.5), "optim_niter"),
    ("gradvac", dict(beta=1.5), "beta"),
    ("gradvac", dict(eps=-1.0), "eps"),
    ("krum", {}, "n_byzantine"),
    ("krum", dict(n_byzantine=-1), "n_byzantine"),
    ("krum", dict(n_byzantine=0, n_selected=0), "n_selected"),
    ("constant", {}, "weights"),
    ("constant", dict(weights="abc"), "weights"),
])
def test_bad_options_are_named(method, options, word):
    with pytest.raises(MGSInputError, match=word):
        get_weighting(method, options)


def test_shape_dependent_checks_name_the_problem():
    G = torch.eye(3).expand(2, 3, 3).clone()
    with pytest.raises(MGSInputError, match="weights"):
        get_weighting("constant", dict(weights=[1.0, 2.0]))(G)
    with pytest.raises(MGSInputError, match="pref_vector"):
        get_weighting("upgrad", dict(pref_vector=[1.0]))(G)
    with pytest.raises(MGSInputError, match="n_byzantine"):
        get_weighting("krum", dict(n_byzantine=1))(G)
    with pytest.raises(MGSInputError, match="n_tasks"):
        w = get_weighting("nash_mtl", dict(n_tasks=4))
        w(G, state=w.init_state(2, 3, G.device))
    with pytest.raises(MGSInputError, match="state"):
        get_weighting("gradvac")(G)
    with pytest.raises(MGSInputError, match="shape"):
        w = get_weighting("gradvac")
        w(G, state=w.init_state(3, 3, G.device))
    with pytest.raises(MGSInputError, match="unknown method"):
        get_weighting("pcgrad_v2")
    with pytest.raises(MGSInputError, match="either"):
        get_weighting(get_weighting("sum"), dict(x=1))


# ----------------------------------------------------------------------------------------- state, bits
@pytest.mark.parametrize("key", ALL)
def test_bitwise_reruns(key):
    T = max(5, min_tasks(key))
    _, G = grams(11, "conflicting", 6, T)
    w1, w2 = make(key, T), make(key, T)
    s1 = w1.init_state(6, T, G.device) if w1.stateful else None
    s2 = copy.deepcopy(s1)
    for step in range(3):
        Gs = G * (1.0 + 0.1 * step)
        a = w1(Gs, state=s1, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        b = w2(Gs, state=s2, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        assert torch.equal(a, b)
    if s1 is not None:
        for k in s1:
            assert torch.equal(s1[k], s2[k])


@pytest.mark.parametrize("key", ["upgrad", "dualproj", "mgda", "mgda_exact", "cagrad", "imtl_g", "aligned_mtl",
                                 "config", "fairgrad", "nash_mtl"])
def test_early_exit_on_cpu_equals_the_full_iteration_count(key, monkeypatch):
    """Iterative solvers freeze finished modules, so the CPU's early exit changes no bit (of the batched
    torch code: the native CPU solvers, which have no batch, are switched off here)."""
    import mgs_kernels.weighting._eig as eig
    import mgs_kernels.weighting._native_solvers as native_solvers
    import mgs_kernels.weighting._newton as newton
    import mgs_kernels.weighting._qp as qp
    import mgs_kernels.weighting.cagrad as cagrad
    import mgs_kernels.weighting.mgda as mgda

    monkeypatch.setattr(native_solvers, "NATIVE_SOLVERS", False)
    T = 5
    _, G = grams(13, "heterogeneous", 8, T)
    G[2] = 0.0
    a = call(make(key, T), G)
    for mod in (eig, newton, qp, cagrad, mgda):
        monkeypatch.setattr(mod, "all_done", lambda done: False)
    b = call(make(key, T), G)
    assert torch.equal(a, b)


def test_state_round_trips_through_a_copy():
    """A run resumed from a copied state (as state_dict / load_state_dict would) is bitwise the
    uninterrupted one, for both stateful methods."""
    for name, opts in (("gradvac", dict(beta=0.3)), ("nash_mtl", dict(update_weights_every=2))):
        _, G = grams(17, "gaussian", 5, 4)
        w = get_weighting(name, opts)
        state = w.init_state(5, 4, G.device)
        outs = [w(G * (1 + 0.05 * s), state=state, generator=torch.Generator().manual_seed(s)) for s in range(4)]
        w2 = get_weighting(name, opts)
        state2 = w2.init_state(5, 4, G.device)
        for s in range(2):
            w2(G * (1 + 0.05 * s), state=state2, generator=torch.Generator().manual_seed(s))
        saved = {k: v.clone() for k, v in state2.items()}
        resumed = get_weighting(name, opts)
        for s in range(2, 4):
            out = resumed(G * (1 + 0.05 * s), state=saved, generator=torch.Generator().manual_seed(s))
            assert torch.equal(out, outs[s])


def test_nash_mtl_reuses_weights_between_updates():
    _, G = grams(19, "gaussian", 3, 4)
    w = get_weighting("nash_mtl", dict(update_weights_every=3, max_norm=0.0))
    state = w.init_state(3, 4, G.device)
    first = w(G, state=state, dtype=torch.float64)
    info = {}
    second = w(G * 4.0, state=state, dtype=torch.float64, info=info)  # not a solve step: same weights
    assert torch.equal(first, second) and (info["iterations"] == 0).all()
    w(G * 4.0, state=state, dtype=torch.float64)
    fourth = w(G * 4.0, state=state, dtype=torch.float64)  # step 3: solved again on 4 G
    assert torch.allclose(fourth, first / 2.0, rtol=1e-10)
    assert (state["step"] == 4).all()


@pytest.mark.parametrize("key", ["upgrad", "dualproj", "mgda", "cagrad", "imtl_g", "aligned_mtl", "config",
                                 "fairgrad", "nash_mtl"])
def test_info_holds_per_module_flags(key):
    T = 4
    _, G = grams(23, "gaussian", 5, T)
    info = {}
    call(make(key, T), G, info=info)
    assert info["converged"].shape == (5,) and info["converged"].dtype == torch.bool
    if key != "mgda":  # Frank-Wolfe often ends at torchjd's cap of 100 iterations before epsilon
        assert info["converged"].all()
    if "iterations" in info:
        assert info["iterations"].dtype == torch.int64 and info["iterations"].shape == (5,)


@pytest.mark.parametrize("key", [k for k in ALL if k not in ("upgrad_enumerate", "dualproj_enumerate")])
@pytest.mark.parametrize("family", ["gaussian", "heterogeneous", "rank_deficient", "zero_row"])
def test_the_gpu_code_path_gives_the_cpu_answer(key, family, monkeypatch):
    """With the CPU shortcuts off, the CPU runs what a GPU runs (full iteration counts with masks, LCPs
    by enumeration for T <= 8, Jacobi for every pseudo-inverse, no host-side subsets): same weights."""
    import mgs_kernels.weighting._common as common

    T = 6
    J, G = grams(29, family, 5, T)
    G[2] = 0.0
    ia, ib = {}, {}
    a = call(make(key, T), G, info=ia)
    monkeypatch.setattr(common, "HOST_SHORTCUTS", False)
    b = call(make(key, T), G, info=ib)
    if "converged" in ia:
        assert torch.equal(ia["converged"], ib["converged"])
    if family == "rank_deficient":  # weights of singular Grams are ill-conditioned; directions are not
        da, db = direction(J, a), direction(J, b)
        assert ((da - db).norm(dim=1) <= 1e-7 * J.double().norm(dim=(1, 2))).all()
    else:
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10 * a.abs().max().item())

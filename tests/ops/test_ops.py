"""Every fused backend against the plain-PyTorch reference (pid_fast/reference.py).

The truth is the reference evaluated in float64 on the same (already rounded) inputs. Losses
are float32 from float32 accumulation, so their tolerance is tight for every storage dtype;
gradients and pred/target are stored in the input dtype, so theirs is a few roundings of it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pid_fast
from pid_fast.ops import reference
from pid_fast.ops.testing import make_case, rel_err

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |err| / max |value| allowed for tensors stored in each dtype (2-3 roundings).
STORE_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOSS_TOL = 2e-5
NORMS = [("l2", None), ("l1", None), ("huber", 0.05)]

CPU_BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]
GPU_BACKENDS = [pytest.param("cuda", marks=pytest.mark.cuda),
                pytest.param("triton", marks=[pytest.mark.cuda, pytest.mark.triton])]


def device_of(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def truth(case, norm, huber_c, weight=True, guide=None):
    """Loss and gradients of the float64 reference on the case's inputs (guide: an optional
    (guide_out, guide_scale) pair, the guided teacher)."""
    up = [x.detach().cpu().double().requires_grad_(i in (1, 2))
          for i, x in enumerate(case.streams())]
    t, t2, c_skip, c_out, w = (v.cpu().double() for v in (*case.coefs(), case.weight))
    a1, b1 = reference.boundary_coefficients(t, case.sigma_max)
    a2, b2 = reference.boundary_coefficients(t2, case.sigma_max)
    g_out, g_scale = (None, None) if guide is None else (x.cpu().double() for x in guide)
    loss = reference.loss_ref(*up, t, t2, a1, b1, a2, b2, c_skip, c_out, norm, huber_c,
                              w if weight else None, g_out, g_scale)
    g_out = torch.linspace(0.5, 1.5, loss.shape[0], dtype=torch.float64)
    loss.backward(g_out)
    return loss.detach(), up[1].grad, up[2].grad, g_out


def run_loss(case, backend, norm, huber_c, g_out, weight=True, guide=None):
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()
    guide_kw = {} if guide is None else dict(guide_out=guide[0], guide_scale=guide[1])
    loss = pid_fast.pid_loss(case.noise, f_t, f_t2, case.teacher_out, case.t, case.t2,
                             case.c_skip, case.c_out, sigma_max=case.sigma_max, norm=norm,
                             huber_c=huber_c, weight=case.weight if weight else None,
                             backend=backend, **guide_kw)
    loss.backward(g_out.to(loss))
    return loss.detach(), f_t.grad, f_t2.grad


def check_loss(case, backend, norm="l2", huber_c=None, weight=True, guide=None):
    ref_loss, ref_g1, ref_g2, g_out = truth(case, norm, huber_c, weight, guide)
    loss, g1, g2 = run_loss(case, backend, norm, huber_c, g_out.to(case.t.device), weight, guide)
    assert loss.dtype == torch.float32 and loss.shape == (case.noise.shape[0],)
    assert g1.dtype == case.f_t.dtype and g1.shape == case.f_t.shape
    tol = STORE_TOL[case.f_t.dtype]
    assert rel_err(loss.cpu(), ref_loss) < LOSS_TOL
    assert rel_err(g1.cpu(), ref_g1) < tol
    assert rel_err(g2.cpu(), ref_g2) < tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,huber_c", NORMS)
def test_loss_matches_reference(backend, dtype, norm, huber_c):
    case = make_case((6, 3, 8, 8), dtype, device_of(backend), seed=1)
    check_loss(case, backend, norm, huber_c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm,huber_c", NORMS)
def test_last_grid_index_where_t2_exceeds_t(backend, norm, huber_c):
    # i = N-1: the neighbour is N-2, so t2 > t and k = t/(t - t2) < 0.
    case = make_case((4, 2, 5, 3), torch.float32, device_of(backend), index=249, seed=2)
    assert bool((case.t2 > case.t).all())
    check_loss(case, backend, norm, huber_c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_grid_index_student_at_T_has_no_gradient_through_f_t(backend):
    # i = 0: t = T, y = n whatever F is, so dL/dF(t) = 0 exactly; F(t2) still gets gradient.
    case = make_case((3, 4, 4), torch.float32, device_of(backend), index=0, seed=3)
    ref_loss, _, ref_g2, g_out = truth(case, "l2", None)
    loss, g1, g2 = run_loss(case, backend, "l2", None, g_out.to(case.t.device))
    assert torch.count_nonzero(g1) == 0
    assert rel_err(g2.cpu(), ref_g2) < 1e-5 and float(g2.abs().max()) > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "channels_last", "mixed"])
def test_non_contiguous_inputs(backend, layout):
    case = make_case((5, 3, 6, 7), torch.float32, device_of(backend), layout=layout, seed=4)
    assert not case.f_t.is_contiguous()
    check_loss(case, backend, "huber", 0.03)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_channels_last_layout_is_kept_without_copies(backend):
    case = make_case((2, 3, 4, 5), torch.float32, device_of(backend), layout="channels_last")
    pred, target = pid_fast.pid_residual(*case.streams(), *case.coefs(), backend=backend)
    assert pred.stride() == case.noise.stride() and target.stride() == case.noise.stride()


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 5), inner=st.lists(st.integers(1, 9), min_size=0, max_size=3),
       dtype=st.sampled_from(DTYPES), norm=st.sampled_from(NORMS),
       layout=st.sampled_from(["contiguous", "strided", "mixed"]),
       index=st.one_of(st.none(), st.sampled_from([0, 1, 248, 249])),
       weight=st.booleans(), guided=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_random_shapes(B, inner, dtype, norm, layout, index, weight, guided, seed):
    case = make_case((B, *inner), dtype, "cpu", layout=layout, index=index, seed=seed)
    guide = make_guide(case, layout=layout, seed=seed) if guided else None
    check_loss(case, "cpu", *norm, weight=weight, guide=guide)


@pytest.mark.triton
@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 4), inner=st.lists(st.integers(1, 7), min_size=0, max_size=3),
       dtype=st.sampled_from(DTYPES), norm=st.sampled_from(NORMS),
       layout=st.sampled_from(["contiguous", "strided"]), seed=st.integers(0, 2**16))
def test_triton_random_shapes(B, inner, dtype, norm, layout, seed):
    case = make_case((B, *inner), dtype, device_of("triton"), layout=layout, seed=seed)
    check_loss(case, "triton", *norm)


def test_rows_longer_than_one_chunk():
    # 3 x 64 x 64 = 12288 elements per row: several chunks per row, partial sums combined.
    case = make_case((2, 3, 64, 64), torch.float32, "cpu", seed=5)
    check_loss(case, "cpu", "huber", 0.01)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_matches_reference(backend, dtype):
    case = make_case((4, 3, 5, 6), dtype, device_of(backend), seed=6)
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()
    pred, target = pid_fast.pid_residual(case.noise, f_t, f_t2, case.teacher_out, *case.coefs(),
                                         backend=backend)
    up = [x.detach().cpu().double().requires_grad_(i in (1, 2))
          for i, x in enumerate(case.streams())]
    t, t2, c_skip, c_out = (v.cpu().double() for v in case.coefs())
    a1, b1 = reference.boundary_coefficients(t, 80.0)
    a2, b2 = reference.boundary_coefficients(t2, 80.0)
    rp, rt = reference.residual_ref(*up, t, t2, a1, b1, a2, b2, c_skip, c_out)
    tol = STORE_TOL[dtype]
    assert pred.dtype == dtype and rel_err(pred.cpu(), rp) < tol and rel_err(target.cpu(), rt) < tol
    assert not target.requires_grad  # the target is detached: only pred carries gradient
    g = torch.randn(pred.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (pred.cpu().double() * g).sum().backward()
    (rp * g).sum().backward()
    assert rel_err(f_t.grad.cpu(), up[1].grad) < tol
    assert rel_err(f_t2.grad.cpu(), up[2].grad) < tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16)])
def test_assemble_matches_reference(backend, dtype, out_dtype):
    case = make_case((3, 2, 5, 5), dtype, device_of(backend), seed=7)
    a, b = reference.boundary_coefficients(case.t, 80.0)
    c_in = torch.rand_like(case.t)
    f = case.f_t.detach().requires_grad_()
    x, x_in = pid_fast.pid_assemble(case.noise, f, a, b, c_in, out_dtype=out_dtype,
                                    backend=backend)
    fd = f.detach().cpu().double().requires_grad_()
    rx, rxi = reference.assemble_ref(case.noise.cpu().double(), fd, a.cpu().double(),
                                     b.cpu().double(), c_in.cpu().double())
    assert x_in.dtype == (out_dtype or dtype) and not x_in.requires_grad
    assert rel_err(x.cpu(), rx) < STORE_TOL[dtype]
    assert rel_err(x_in.cpu(), rxi) < STORE_TOL[out_dtype or dtype]
    g = torch.randn(x.shape, dtype=torch.float64)
    (x.cpu().double() * g).sum().backward()
    (rx * g).sum().backward()
    assert rel_err(f.grad.cpu(), fd.grad) < STORE_TOL[dtype]


def test_explicit_coefficients_equal_boundary_default():
    case = make_case((3, 4, 4), torch.float32, "cpu", seed=8)
    a1, b1 = reference.boundary_coefficients(case.t, 80.0)
    a2, b2 = reference.boundary_coefficients(case.t2, 80.0)
    l_default = pid_fast.pid_loss(*case.streams(), *case.coefs(), backend="cpu")
    l_explicit = pid_fast.pid_loss(*case.streams(), *case.coefs(), a1=a1, b1=b1, a2=a2, b2=b2,
                                   backend="cpu")
    torch.testing.assert_close(l_default, l_explicit, rtol=1e-6, atol=0)


def test_scalar_coefficients_broadcast():
    case = make_case((3, 4), torch.float32, "cpu")
    l_vec = pid_fast.pid_loss(*case.streams(), case.t, case.t2, torch.full((3,), 0.2),
                              torch.full((3,), 0.7), backend="cpu")
    l_num = pid_fast.pid_loss(*case.streams(), case.t, case.t2, 0.2, 0.7, backend="cpu")
    torch.testing.assert_close(l_vec, l_num)


def test_mixed_input_dtypes_are_promoted():
    case = make_case((2, 3, 4), torch.float32, "cpu")
    f_t = case.f_t.to(torch.bfloat16).requires_grad_()
    loss = pid_fast.pid_loss(case.noise, f_t, case.f_t2, case.teacher_out, *case.coefs(),
                             backend="cpu")
    loss.sum().backward()
    assert f_t.grad.dtype == torch.bfloat16
    ref = pid_fast.pid_loss(case.noise, f_t.detach().float(), case.f_t2, case.teacher_out,
                            *case.coefs(), backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_no_grad_mode_writes_no_gradients():
    case = make_case((2, 3, 4), torch.float32, "cpu")
    out = torch.ops.pid_fast.loss(*case.streams(), case.t, case.t2, None, None, None, None,
                                  case.c_skip, case.c_out, None, 80.0, 0, 0.0, False)
    assert out[2].numel() == 0 and out[3].numel() == 0
    with torch.no_grad():
        loss = pid_fast.pid_loss(*case.streams(), *case.coefs(), backend="cpu")
    torch.testing.assert_close(loss, out[0])


def test_empty_batch():
    case = make_case((0, 3, 4), torch.float32, "cpu")
    loss = pid_fast.pid_loss(*case.streams(), *case.coefs(), backend="cpu")
    assert loss.shape == (0,)


# --- torch.library integration -------------------------------------------------------------

def op_args(case, need_grad):
    return (*case.streams(), case.t, case.t2, None, None, None, None, case.c_skip,
            case.c_out, case.weight, 80.0, 2, 0.05, need_grad)


def _opcheck_setup(ns, **case_kw):
    """(the op namespace, a case, its streams with F(t), F(t2) requiring grad, opcheck's utils)."""
    from pid_fast.ops import triton_kernels  # noqa: F401
    case = make_case((3, 2, 4, 4), torch.float32, "cuda" if HAS_CUDA else "cpu", **case_kw)
    streams = (case.noise, case.f_t.detach().requires_grad_(), case.f_t2.detach().requires_grad_(),
               case.teacher_out)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic"]
    if ns == "pid_fast_triton" and not HAS_CUDA:
        # AOT tracing runs triton_op bodies on functional tensors, which the interpreter
        # cannot read; on a GPU the full check runs.
        utils.remove("test_aot_dispatch_dynamic")
    return getattr(torch.ops, ns), case, streams, utils


@pytest.mark.parametrize("ns", ["pid_fast", pytest.param("pid_fast_triton", marks=pytest.mark.triton)])
def test_opcheck(ns):
    ops, case, streams, utils = _opcheck_setup(ns)
    f_t = streams[1]
    check = lambda op, args: torch.library.opcheck(op, args, test_utils=utils)  # noqa: E731
    check(ops.loss, (*streams, *op_args(case, True)[4:]))
    check(ops.loss, (*streams, *op_args(case, False)[4:]))
    check(ops.residual, (*streams, case.t, case.t2, None, None, None, None, case.c_skip,
                         case.c_out, 80.0))
    a, b = reference.boundary_coefficients(case.t, 80.0)
    check(ops.assemble, (case.noise, f_t, a, b, case.c_skip, torch.bfloat16))
    check(ops.scale_rows, (case.f_t, case.t, case.c_out))


def check_compiled_matches_eager(case, compile_backend=None, rtol=1e-6, atol=1e-7, **loss_kw):
    """torch.compile(fullgraph=True) of loss.mean() fwd+bwd gives the eager loss and grads."""
    def step(f_t, f_t2):
        return pid_fast.pid_loss(case.noise, f_t, f_t2, case.teacher_out, *case.coefs(),
                                 **loss_kw).mean()

    kw = {} if compile_backend is None else {"backend": compile_backend}
    compiled = torch.compile(step, fullgraph=True, **kw)
    results = []
    for fn in (step, compiled):
        f_t = case.f_t.detach().requires_grad_()
        f_t2 = case.f_t2.detach().requires_grad_()
        loss = fn(f_t, f_t2)
        loss.backward()
        results.append((loss.detach(), f_t.grad, f_t2.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=rtol, atol=atol)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile(compile_backend):
    case = make_case((4, 3, 8, 8), torch.float32, "cpu", seed=9)
    check_compiled_matches_eager(case, compile_backend, weight=case.weight, backend="cpu")


# --- backend choice and build info ---------------------------------------------------------

def test_build_info_reports_what_was_built():
    info = pid_fast.build_info()
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]
    assert "triton" in info and "torch" in info


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("PID_FAST_BACKEND", raising=False)
    assert pid_fast.resolve_backend(None, "cpu") == "cpu"
    monkeypatch.setenv("PID_FAST_BACKEND", "reference")
    assert pid_fast.resolve_backend(None, "cpu") == "reference"
    assert pid_fast.resolve_backend("cpu", "cpu") == "cpu"  # the argument wins
    monkeypatch.setenv("PID_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"PID_FAST_BACKEND"):
        pid_fast.resolve_backend(None, "cpu")


def test_unavailable_backend_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="not available for cpu tensors"):
        pid_fast.resolve_backend("cuda", "cpu")
    if not pid_fast.build_info()["cuda"]:
        with pytest.raises(ValueError, match="built without CUDA"):
            pid_fast.resolve_backend("cuda", "cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        pid_fast.resolve_backend("triton", "cpu")


# --- bad input -----------------------------------------------------------------------------

def bad(**changes):
    case = make_case((3, 2, 4), torch.float32, "cpu")
    kw = dict(noise=case.noise, f_t=case.f_t, f_t2=case.f_t2, teacher_out=case.teacher_out,
              t=case.t, t2=case.t2, c_skip=case.c_skip, c_out=case.c_out, backend="cpu")
    kw.update(changes)
    return kw


@pytest.mark.parametrize("changes,error,match", [
    (dict(f_t=torch.randn(3, 2, 5)), ValueError, "f_t has shape"),
    (dict(teacher_out=torch.randn(4, 2, 4)), ValueError, "teacher_out has shape"),
    (dict(t=torch.rand(4)), ValueError, r"t must be a per-sample vector of shape \(3,\)"),
    (dict(c_out=torch.rand(3, 1)), ValueError, "c_out must be a per-sample vector"),
    (dict(f_t2=torch.randn(3, 2, 4, device="meta")), ValueError, "f_t2 is on meta"),
    (dict(c_skip=torch.rand(3, device="meta")), ValueError, "c_skip is on meta"),
    (dict(noise=torch.ones(3, 2, 4, dtype=torch.int64)), TypeError, "noise must be a floating"),
    (dict(t2=torch.ones(3, dtype=torch.int32)), TypeError, "t2 must be a floating"),
    (dict(f_t="x"), TypeError, "f_t must be a torch.Tensor"),
    (dict(norm="l3"), ValueError, "norm must be one of"),
    (dict(norm="huber"), ValueError, "huber_c must be a positive number"),
    (dict(norm="huber", huber_c=-1.0), ValueError, "huber_c must be a positive number"),
    (dict(norm="l2", huber_c=0.1), ValueError, "huber_c is only used"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(sigma_max=0.0), ValueError, "sigma_max must be a positive number"),
    (dict(weight=torch.rand(2)), ValueError, "weight must be a per-sample vector"),
    (dict(a1=torch.rand(3)), ValueError, "give all of a1, b1, a2, b2"),
    (dict(noise=torch.randn(3, 2, 4, dtype=torch.float64), f_t=torch.randn(3, 2, 4, dtype=torch.float64)),
     TypeError, "backend='reference'"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        pid_fast.pid_loss(**bad(**changes))


def test_equal_times_rejected():
    kw = bad()
    kw["t2"] = kw["t"].clone()
    kw["t2"][1] = kw["t"][1] + 1.0
    kw["t2"][2] = kw["t"][2]
    with pytest.raises(ValueError, match="t and t2 must differ.*index 0"):
        pid_fast.pid_loss(**kw)


@pytest.mark.parametrize("ns", ["pid_fast", pytest.param("pid_fast_triton", marks=pytest.mark.triton)])
def test_direct_op_calls_with_bad_input_raise(ns):
    from pid_fast.ops import triton_kernels  # noqa: F401
    ops = getattr(torch.ops, ns)
    case = make_case((3, 2, 4), torch.float32, "cpu")
    args = list(op_args(case, True))
    args[1] = torch.randn(3, 2, 5)  # f_t of the wrong shape
    with pytest.raises((RuntimeError, ValueError), match="f_t"):
        ops.loss(*args)
    args = list(op_args(case, True))
    args[4] = torch.rand(2)  # t too short
    with pytest.raises((RuntimeError, ValueError), match="t"):
        ops.loss(*args)
    with pytest.raises((RuntimeError, ValueError), match="s1"):
        ops.scale_rows(case.f_t, torch.rand(5))




def test_backward_through_retained_graph_twice():
    case = make_case((2, 3, 4), torch.float32, "cpu")
    f_t = case.f_t.detach().requires_grad_()
    loss = pid_fast.pid_loss(case.noise, f_t, case.f_t2, case.teacher_out, *case.coefs(),
                             backend="cpu").sum()
    (g1,) = torch.autograd.grad(loss, f_t, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, f_t)
    ref = pid_fast.pid_loss(case.noise, f_t, case.f_t2, case.teacher_out, *case.coefs(),
                            backend="reference").sum()
    (g_ref,) = torch.autograd.grad(ref, f_t)
    assert torch.equal(g1, g2)  # the saved gradient directions are not consumed
    assert rel_err(g1, g_ref) < STORE_TOL[torch.float32]


# --- guided teachers: target = c_skip y + c_out (w G_m + (1 - w) G_g) ------------------------

def make_guide(case, layout="contiguous", seed=0, scale=None):
    """A guide teacher's output G_g shaped, typed and laid out like the case's teacher_out, and
    per-sample guidance scales w (default: spread over [-0.5, 3.5], 1 and 0 included)."""
    shape, dtype, device = case.noise.shape, case.noise.dtype, case.noise.device
    guide_out = make_case(shape, dtype, device, layout=layout, seed=seed + 1000).teacher_out
    if scale is None:
        B = shape[0]
        scale = torch.tensor([1.0, 0.0, 2.5, -0.5, 3.5, 1.5, 0.25, 7.5])[torch.arange(B) % 8]
    elif not isinstance(scale, torch.Tensor):
        scale = torch.full((shape[0],), float(scale))
    return guide_out, scale.to(device)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,huber_c", NORMS)
def test_guided_loss_matches_reference(backend, dtype, norm, huber_c):
    case = make_case((5, 3, 5, 7), dtype, device_of(backend), seed=21)
    check_loss(case, backend, norm, huber_c, guide=make_guide(case, seed=21))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "channels_last", "mixed"])
def test_guided_non_contiguous_inputs(backend, layout):
    case = make_case((4, 3, 5, 6), torch.bfloat16, device_of(backend), layout=layout, seed=22)
    guide = make_guide(case, layout=layout, seed=22)
    assert not guide[0].is_contiguous()
    check_loss(case, backend, "huber", 0.03, guide=guide)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm,huber_c", NORMS)
def test_guided_last_grid_index_where_t2_exceeds_t(backend, norm, huber_c):
    case = make_case((4, 2, 5, 3), torch.float32, device_of(backend), index=249, seed=23)
    assert bool((case.t2 > case.t).all())
    check_loss(case, backend, norm, huber_c, guide=make_guide(case, seed=23))


def test_guided_rows_longer_than_one_chunk():
    case = make_case((2, 3, 64, 64), torch.float32, "cpu", seed=24)
    check_loss(case, "cpu", "l2", guide=make_guide(case, seed=24, scale=2.0))


def residual_truth(case, guide):
    """pred, target and the gradients of sum(pred * g) from the float64 reference."""
    up = [x.detach().cpu().double().requires_grad_(i in (1, 2))
          for i, x in enumerate(case.streams())]
    t, t2, c_skip, c_out = (v.cpu().double() for v in case.coefs())
    a1, b1 = reference.boundary_coefficients(t, case.sigma_max)
    a2, b2 = reference.boundary_coefficients(t2, case.sigma_max)
    rp, rt = reference.residual_ref(*up, t, t2, a1, b1, a2, b2, c_skip, c_out,
                                    *(x.cpu().double() for x in guide))
    g = torch.randn(rp.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (rp * g).sum().backward()
    return rp, rt, up[1].grad, up[2].grad, g


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", [None, 249])
def test_guided_residual_matches_reference(backend, dtype, index):
    case = make_case((4, 3, 5, 6), dtype, device_of(backend), index=index, seed=25)
    guide = make_guide(case, seed=25)
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()
    pred, target = pid_fast.pid_residual(case.noise, f_t, f_t2, case.teacher_out, *case.coefs(),
                                         guide_out=guide[0], guide_scale=guide[1],
                                         backend=backend)
    rp, rt, rg1, rg2, g = residual_truth(case, guide)
    tol = STORE_TOL[dtype]
    assert pred.dtype == dtype and target.dtype == dtype
    assert rel_err(pred.cpu(), rp) < tol and rel_err(target.cpu(), rt) < tol
    assert not target.requires_grad
    (pred.cpu().double() * g).sum().backward()
    assert rel_err(f_t.grad.cpu(), rg1) < tol
    assert rel_err(f_t2.grad.cpu(), rg2) < tol


def test_guided_target_is_the_guided_teacher():
    # The reference itself against the formula D_w = D_g + w (D_m - D_g), D = c_skip y
    # + c_out G, written out independently in float64.
    case = make_case((3, 2, 4), torch.float64, "cpu", seed=26)
    guide_out, w = make_guide(case, seed=26)
    t, t2, c_skip, c_out = case.coefs()
    a1, b1 = reference.boundary_coefficients(t, 80.0)
    a2, b2 = reference.boundary_coefficients(t2, 80.0)
    _, target = reference.residual_ref(*case.streams(), t, t2, a1, b1, a2, b2, c_skip, c_out,
                                       guide_out, w.double())
    col = lambda v: v.double()[:, None, None]  # noqa: E731
    y = col(a1) * case.noise + col(b1) * case.f_t
    d_main = col(c_skip) * y + col(c_out) * case.teacher_out
    d_guide = col(c_skip) * y + col(c_out) * guide_out
    torch.testing.assert_close(target, d_guide + col(w) * (d_main - d_guide), rtol=1e-12, atol=1e-12)


GUIDED_EXACT_BACKENDS = ["reference", *CPU_BACKENDS]


def loss_and_grads(case, backend, **kw):
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()
    loss = pid_fast.pid_loss(case.noise, f_t, f_t2, kw.pop("teacher_out", case.teacher_out),
                             *case.coefs(), weight=case.weight, backend=backend, **kw)
    loss.backward(torch.linspace(0.5, 1.5, loss.shape[0], device=loss.device))
    return loss.detach(), f_t.grad, f_t2.grad


def residual_of(case, backend, **kw):
    return pid_fast.pid_residual(case.noise, case.f_t, case.f_t2,
                                 kw.pop("teacher_out", case.teacher_out), *case.coefs(),
                                 backend=backend, **kw)


def assert_all_equal(xs, ys):
    for x, y in zip(xs, ys):
        assert torch.equal(x, y), float((x.double() - y.double()).abs().max())


@pytest.mark.parametrize("backend", GUIDED_EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,huber_c", NORMS)
def test_guide_scale_one_equals_unguided_exactly(backend, dtype, norm, huber_c):
    # w = 1: c_out w = c_out and c_out (1 - w) = 0 exactly, so the guided op is the unguided
    # one bit for bit (loss, both gradients, pred and target).
    case = make_case((3, 2, 5, 3), dtype, device_of(backend), seed=27)
    guide_out, w = make_guide(case, seed=27, scale=1.0)
    guided = loss_and_grads(case, backend, norm=norm, huber_c=huber_c, guide_out=guide_out,
                            guide_scale=w)
    assert_all_equal(guided, loss_and_grads(case, backend, norm=norm, huber_c=huber_c))
    assert_all_equal(residual_of(case, backend, guide_out=guide_out, guide_scale=1.0),
                     residual_of(case, backend))


@pytest.mark.parametrize("backend", GUIDED_EXACT_BACKENDS)
def test_guide_scale_zero_equals_the_guide_alone(backend):
    # w = 0: the guide teacher alone, i.e. the unguided op with teacher_out = guide_out.
    case = make_case((3, 2, 5, 3), torch.float32, device_of(backend), seed=28)
    guide_out, _ = make_guide(case, seed=28)
    guided = loss_and_grads(case, backend, norm="huber", huber_c=0.05, guide_out=guide_out,
                            guide_scale=0.0)
    alone = loss_and_grads(case, backend, norm="huber", huber_c=0.05, teacher_out=guide_out)
    assert_all_equal(guided, alone)
    assert_all_equal(residual_of(case, backend, guide_out=guide_out, guide_scale=0.0),
                     residual_of(case, backend, teacher_out=guide_out))


@pytest.mark.parametrize("backend", GUIDED_EXACT_BACKENDS)
def test_guided_teacher_outputs_get_no_gradient(backend):
    case = make_case((3, 2, 4), torch.float32, device_of(backend), seed=29)
    guide_out, w = make_guide(case, seed=29)
    guide_out = guide_out.detach().requires_grad_()
    teacher_out = case.teacher_out.detach().requires_grad_()
    f_t = case.f_t.detach().requires_grad_()
    loss = pid_fast.pid_loss(case.noise, f_t, case.f_t2, teacher_out, *case.coefs(),
                             guide_out=guide_out, guide_scale=w, backend=backend)
    loss.sum().backward()
    assert guide_out.grad is None and teacher_out.grad is None
    assert f_t.grad is not None and float(f_t.grad.abs().max()) > 0


def test_guided_mixed_input_dtypes_are_promoted():
    case = make_case((2, 3, 4), torch.float32, "cpu", seed=30)
    guide_out, w = make_guide(case, seed=30)
    loss = pid_fast.pid_loss(*case.streams(), *case.coefs(), guide_out=guide_out.to(torch.bfloat16),
                             guide_scale=w.double(), backend="cpu")
    ref = pid_fast.pid_loss(*case.streams(), *case.coefs(),
                            guide_out=guide_out.to(torch.bfloat16).float(), guide_scale=w,
                            backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_guided_scalar_scale_broadcasts():
    case = make_case((3, 4), torch.float32, "cpu", seed=31)
    guide_out, _ = make_guide(case, seed=31)
    l_num = pid_fast.pid_loss(*case.streams(), *case.coefs(), guide_out=guide_out,
                              guide_scale=2.0, backend="cpu")
    l_vec = pid_fast.pid_loss(*case.streams(), *case.coefs(), guide_out=guide_out,
                              guide_scale=torch.full((3,), 2.0), backend="cpu")
    l_0d = pid_fast.pid_loss(*case.streams(), *case.coefs(), guide_out=guide_out,
                             guide_scale=torch.tensor(2.0), backend="cpu")
    assert torch.equal(l_num, l_vec) and torch.equal(l_num, l_0d)


def guided_op_args(case, need_grad, guide_out, guide_scale):
    return (*op_args(case, need_grad), guide_out, guide_scale)


@pytest.mark.parametrize("ns", ["pid_fast", pytest.param("pid_fast_triton", marks=pytest.mark.triton)])
def test_guided_opcheck(ns):
    ops, case, streams, utils = _opcheck_setup(ns, seed=32)
    guide_out, w = make_guide(case, seed=32)
    for need_grad in (True, False):
        torch.library.opcheck(ops.loss, (*streams, *guided_op_args(case, need_grad, guide_out, w)[4:]),
                              test_utils=utils)
    torch.library.opcheck(ops.residual, (*streams, case.t, case.t2, None, None, None, None,
                                         case.c_skip, case.c_out, 80.0, guide_out, w),
                          test_utils=utils)


def test_guided_torch_compile():
    case = make_case((4, 3, 8, 8), torch.float32, "cpu", seed=33)
    guide_out, w = make_guide(case, seed=33)
    check_compiled_matches_eager(case, "aot_eager", weight=case.weight, guide_out=guide_out,
                                 guide_scale=w, backend="cpu")


def test_guided_op_without_grad_recomputes_in_backward():
    # Called with need_grad=False yet differentiated: the backward recomputes with the guide.
    case = make_case((3, 2, 4), torch.float32, "cpu", seed=34)
    guide_out, w = make_guide(case, seed=34)
    f_t = case.f_t.detach().requires_grad_()
    args = list(guided_op_args(case, False, guide_out, w))
    args[1] = f_t
    loss = torch.ops.pid_fast.loss(*args)[0]
    (g,) = torch.autograd.grad(loss.sum(), f_t)
    ref = pid_fast.pid_loss(case.noise, f_t, case.f_t2, case.teacher_out, *case.coefs(),
                            weight=case.weight, norm="huber", huber_c=0.05, guide_out=guide_out,
                            guide_scale=w, backend="reference")
    (g_ref,) = torch.autograd.grad(ref.sum(), f_t)
    assert rel_err(g, g_ref) < STORE_TOL[torch.float32]


@pytest.mark.parametrize("changes,error,match", [
    (dict(guide_out=torch.randn(3, 2, 4)), ValueError, "guide_out was given without guide_scale"),
    (dict(guide_scale=2.0), ValueError, "guide_scale was given without guide_out"),
    (dict(guide_out=torch.randn(3, 2, 5), guide_scale=2.0), ValueError,
     r"guide_out has shape \(3, 2, 5\) but teacher_out has shape"),
    (dict(guide_out=torch.randn(3, 2, 4, device="meta"), guide_scale=2.0), ValueError,
     "guide_out is on meta"),
    (dict(guide_out=torch.ones(3, 2, 4, dtype=torch.int32), guide_scale=2.0), TypeError,
     "guide_out must be a floating"),
    (dict(guide_out="x", guide_scale=2.0), TypeError, "guide_out must be a torch.Tensor"),
    (dict(guide_out=torch.randn(3, 2, 4), guide_scale=torch.rand(2)), ValueError,
     r"guide_scale must be a per-sample vector of shape \(3,\)"),
    (dict(guide_out=torch.randn(3, 2, 4), guide_scale=torch.ones(3, dtype=torch.int64)),
     TypeError, "guide_scale must be a floating"),
    (dict(guide_out=torch.randn(3, 2, 4), guide_scale=True), TypeError,
     "guide_scale must be a tensor of shape"),
    (dict(guide_out=torch.randn(3, 2, 4), guide_scale=torch.rand(3, device="meta")), ValueError,
     "guide_scale is on meta"),
])
@pytest.mark.parametrize("fn", ["pid_loss", "pid_residual"])
def test_guided_bad_input_names_the_argument(changes, error, match, fn):
    kw = bad(**changes)
    if fn == "pid_residual":
        kw.pop("norm", None)
    with pytest.raises(error, match=match):
        getattr(pid_fast, fn)(**kw)


@pytest.mark.parametrize("ns", ["pid_fast", pytest.param("pid_fast_triton", marks=pytest.mark.triton)])
def test_guided_direct_op_calls_with_bad_input_raise(ns):
    from pid_fast.ops import triton_kernels  # noqa: F401
    ops = getattr(torch.ops, ns)
    case = make_case((3, 2, 4), torch.float32, "cpu", seed=35)
    guide_out, w = make_guide(case, seed=35)
    base = op_args(case, True)
    res = (*case.streams(), case.t, case.t2, None, None, None, None, case.c_skip, case.c_out, 80.0)
    for op, args in ((ops.loss, base), (ops.residual, res)):
        with pytest.raises((RuntimeError, ValueError), match="guide_scale"):
            op(*args, guide_out, None)
        with pytest.raises((RuntimeError, ValueError), match="guide_out"):
            op(*args, None, w)
        with pytest.raises((RuntimeError, ValueError), match="guide_out"):
            op(*args, guide_out.to(torch.bfloat16), w)
        with pytest.raises((RuntimeError, ValueError), match="guide_out"):
            op(*args, guide_out[:, :1], w)
        with pytest.raises((RuntimeError, ValueError), match="guide_scale"):
            op(*args, guide_out, w[:2])

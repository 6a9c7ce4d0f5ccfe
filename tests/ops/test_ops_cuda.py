"""CUDA and Triton-on-GPU kernels against the reference (skipped without a GPU; run first by
benchmarks/gpu_check.sh). Shares the checks of test_ops.py."""

import pytest
import torch

from pid_fast.ops.testing import make_case
from test_ops import (DTYPES, GPU_BACKENDS, NORMS, assert_all_equal, check_compiled_matches_eager,
                      check_loss, loss_and_grads, make_guide, residual_of)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,huber_c", NORMS)
@pytest.mark.parametrize("shape", [(6, 3, 8, 8), (5, 3, 7, 9), (2, 3, 64, 64), (3, 1)])
def test_gpu_loss_matches_reference(backend, dtype, norm, huber_c, shape):
    check_loss(make_case(shape, dtype, "cuda", seed=11), backend, norm, huber_c)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "channels_last", "mixed"])
def test_gpu_layouts_and_last_index(backend, layout):
    check_loss(make_case((4, 3, 8, 8), torch.bfloat16, "cuda", layout=layout, seed=12), backend)
    check_loss(make_case((4, 3, 8, 8), torch.float32, "cuda", index=249, seed=13), backend, "l1")


@pytest.mark.cuda
def test_gpu_misaligned_views_use_the_scalar_path():
    base = make_case((3, 3 * 8 * 8 + 1), torch.float32, "cuda", seed=14)
    case = make_case((3, 3 * 8 * 8), torch.float32, "cuda", seed=14)
    for name in ("noise", "f_t", "f_t2", "teacher_out"):
        setattr(case, name, getattr(base, name)[:, 1:])  # offset by 4 bytes: not 16-aligned
    check_loss(case, "cuda", "l2")


@pytest.mark.cuda
def test_gpu_int64_indexing():
    # 2^31 + 2^20 elements: offsets past int32 range (scale_rows streams one tensor).
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    n = 2**31 + 2**20
    x = torch.ones((2, n // 2), dtype=torch.bfloat16, device="cuda")
    x[1, -1] = 3.0
    out = torch.ops.pid_fast.scale_rows(x, torch.tensor([2.0, 0.5], device="cuda"))
    assert float(out[0, -1]) == 2.0 and float(out[1, -1]) == 1.5 and float(out[1, 0]) == 0.5
    del out, x
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_torch_compile(backend):
    case = make_case((8, 3, 16, 16), torch.bfloat16, "cuda", seed=15)
    check_compiled_matches_eager(case, rtol=1e-2, atol=1e-4, norm="huber", huber_c=0.03,
                                 backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,huber_c", NORMS)
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (2, 3, 64, 64), (3, 1)])
def test_gpu_guided_loss_matches_reference(backend, dtype, norm, huber_c, shape):
    case = make_case(shape, dtype, "cuda", seed=16)
    check_loss(case, backend, norm, huber_c, guide=make_guide(case, seed=16))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "channels_last", "mixed"])
def test_gpu_guided_layouts_and_last_index(backend, layout):
    case = make_case((4, 3, 8, 8), torch.bfloat16, "cuda", layout=layout, seed=17)
    check_loss(case, backend, guide=make_guide(case, layout=layout, seed=17))
    case = make_case((4, 3, 8, 8), torch.float32, "cuda", index=249, seed=18)
    check_loss(case, backend, "l1", guide=make_guide(case, seed=18))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_guide_scale_one_equals_unguided_exactly(backend):
    case = make_case((4, 3, 16, 16), torch.float32, "cuda", seed=19)
    guide_out, w = make_guide(case, seed=19, scale=1.0)
    assert_all_equal(loss_and_grads(case, backend, guide_out=guide_out, guide_scale=w),
                     loss_and_grads(case, backend))
    assert_all_equal(residual_of(case, backend, guide_out=guide_out, guide_scale=w),
                     residual_of(case, backend))
    guide_out, w = make_guide(case, seed=19, scale=0.0)
    assert_all_equal(loss_and_grads(case, backend, guide_out=guide_out, guide_scale=w),
                     loss_and_grads(case, backend, teacher_out=guide_out))


@pytest.mark.cuda
def test_gpu_guided_misaligned_views_use_the_scalar_path():
    base = make_case((3, 3 * 8 * 8 + 1), torch.float32, "cuda", seed=20)
    case = make_case((3, 3 * 8 * 8), torch.float32, "cuda", seed=20)
    for name in ("noise", "f_t", "f_t2", "teacher_out"):
        setattr(case, name, getattr(base, name)[:, 1:])
    guide_out, w = make_guide(base, seed=20)
    check_loss(case, "cuda", "l2", guide=(guide_out[:, 1:], w))

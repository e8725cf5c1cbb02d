"""The CUDA path of the engine: fused kernels against the generic ATen path, the CPU
engine and the autograd reference. Skipped without a GPU; bench/gpu_check.sh runs them on
the GPU machine."""
import copy

import pytest
import torch

import pyflat
from pyflat import reference
from pyflat.generic import GenericGGN, GenericHessian
from pyflat.precision import full_precision

from helpers import (
    ACTIVATION_MODULES,
    assert_within_float32_autograd,
    make_batch,
    make_mlp,
    num_params,
    random_block,
    relative_error,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)"),
]

PRODUCTS = {"ggn": (pyflat.GGN, GenericGGN, reference.ggn_matmat),
            "hessian": (pyflat.Hessian, GenericHessian, reference.hessian_matmat)}


@pytest.fixture(autouse=True)
def _no_tf32():
    """No TF32 for the float32 work outside pyflat's products either: pyflat's own guard
    around the test, which sets cuBLAS's and cuDNN's conv fp32_precision levels (never the
    legacy allow_tf32 switches, which raise on torch >= 2.9 once the levels disagree with
    them) and puts them back exactly after."""
    with full_precision(torch.device("cuda")):
        yield


def on_cuda(model, data):
    return model.cuda(), (data[0].cuda(), data[1].cuda())


def test_cuda_kernels_are_registered():
    for op in ("mlp_forward", "mlp_ggn_matmat", "mlp_hessian_matmat"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyflat::{op}", "CUDA")


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("width", [1, 7, 33])
@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
def test_float64_fused_generic_reference_and_cpu_agree(activation, width, k, product):
    fused, generic, ref = PRODUCTS[product]
    model = make_mlp([5, width, 6, 4], activation, seed=width)
    data = make_batch(37, 5, 4)
    V = random_block(num_params(model), k)
    on_cpu = fused(model, data, weight_decay=0.01) @ V
    model, data = on_cuda(model, data)
    Vc = V.cuda()
    out = fused(model, data, weight_decay=0.01) @ Vc
    assert out.device.type == "cuda"
    assert relative_error(out.cpu(), on_cpu) < 1e-10
    assert relative_error(out, generic(model, data, weight_decay=0.01) @ Vc) < 1e-10
    assert relative_error(out, ref(model, data, Vc, weight_decay=0.01)) < 1e-10


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float32_within_autograd_error(product, k, reduction):
    fused, _, ref = PRODUCTS[product]
    model64 = make_mlp([20, 129, 65, 10], "gelu", seed=3)
    data64 = make_batch(257, 20, 10)
    V = random_block(num_params(model64), k)
    exact = ref(model64, data64, V, reduction=reduction)
    model, data = on_cuda(make_mlp([20, 129, 65, 10], "gelu", seed=3, dtype=torch.float32),
                          (data64[0].float(), data64[1]))
    Vc = V.float().cuda()
    ours = fused(model, data, reduction=reduction) @ Vc
    autograd = ref(model, data, Vc, reduction=reduction)
    err, err_ref = relative_error(ours.double().cpu(), exact), \
        relative_error(autograd.double().cpu(), exact)
    assert_within_float32_autograd(err, err_ref)


@pytest.mark.parametrize("model_kind", ["mlp", "vgg-style"])
def test_user_tf32_stays_out_of_float32_products(model_kind):
    """TF32 switched on through torch's fp32_precision settings, as for training: torch's
    own float32 matmuls then use it, pyflat's products do not, and the settings are the
    user's again after them."""
    from test_convnets import build

    if model_kind == "mlp":
        model64, data64 = make_mlp([20, 129, 65, 10], "gelu", seed=3), make_batch(257, 20, 10)
    else:
        model64, data64 = build(model_kind, 16)
    model64, data64 = on_cuda(model64, data64)
    model32, data32 = copy.deepcopy(model64).float(), (data64[0].float(), data64[1])
    V = random_block(num_params(model64), 4).cuda()
    # the levels the autouse guard puts back after the test
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    gen = torch.Generator(device="cuda").manual_seed(0)
    A, B = (torch.randn(512, 512, device="cuda", generator=gen) for _ in range(2))
    if relative_error((A @ B).double(), A.double() @ B.double()) < 1e-5:
        pytest.skip("this GPU has no TF32: float32 matmuls stay in full precision")
    for fused, _, ref in PRODUCTS.values():
        exact = ref(model64, data64, V)
        # float32 rounding gives ~1e-7 here, TF32 ~1e-3
        assert relative_error((fused(model32, data32) @ V.float()).double(), exact) < 1e-5
        assert relative_error(ref(model32, data32, V.float()).double(), exact) < 1e-5
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_many_classes_and_large_batch():
    model, data = on_cuda(make_mlp([16, 40, 1000], "relu", seed=4, dtype=torch.float64),
                          make_batch(513, 16, 1000))
    V = random_block(num_params(model), 3).cuda()
    for fused, _, ref in PRODUCTS.values():
        assert relative_error(fused(model, data) @ V, ref(model, data, V)) < 1e-10


def test_products_are_bitwise_reproducible():
    model, data = on_cuda(make_mlp([30, 64, 64, 10], "tanh", dtype=torch.float32),
                          make_batch(300, 30, 10, dtype=torch.float32))
    V = random_block(num_params(model), 16, dtype=torch.float32).cuda()
    H = pyflat.Hessian(model, data)
    first = H @ V
    assert torch.equal(first, H @ V)
    assert torch.equal(first, pyflat.Hessian(model, data) @ V)


def test_data_on_another_device_is_refused():
    model = make_mlp([4, 6, 3], "tanh").cuda()
    with pytest.raises(ValueError, match="X and y must be on the model's device cuda:0, got cpu"):
        pyflat.GGN(model, make_batch(8, 4, 3))


def test_labels_out_of_range_on_the_device():
    model = make_mlp([4, 6, 3], "tanh").cuda()
    X, y = make_batch(8, 4, 3)
    spec = pyflat.engines.mlp.parse_mlp(model, "test")
    y[0], y[3] = 0, 5
    with pytest.raises(RuntimeError, match=r"target must hold class indices in \[0, 3\); "
                                           r"got values from 0 to 5"):
        pyflat.ops.mlp_forward(X.cuda(), y.cuda(), spec.weights, spec.biases, spec.activations,
                               spec.activation_params)


# ---- the graph engine (convnets, residual networks) on the GPU --------------------------

CONV_MODELS = ["small-cnn", "vgg-style", "preact-resnet", "wide-block", "grouped-depthwise",
               "conv1d"]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("name", CONV_MODELS)
@pytest.mark.parametrize("product", PRODUCTS)
def test_graph_engine_float64_matches_reference_and_cpu(product, name, k):
    from test_convnets import build

    fused, _, ref = PRODUCTS[product]
    model, data = build(name, 5)
    V = random_block(num_params(model), k)
    on_cpu = fused(model, data) @ V
    model, data = on_cuda(model, data)
    op = fused(model, data)
    assert op.engine == "graph"
    got = op @ V.cuda()
    assert relative_error(got, ref(model, data, V.cuda())) < 1e-10
    assert relative_error(got.cpu(), on_cpu) < 1e-10


@pytest.mark.parametrize("name", ["vgg-style", "preact-resnet", "grouped-depthwise"])
def test_graph_engine_float32_within_autograd_error(name):
    from test_convnets import build

    model64, data64 = on_cuda(*build(name, 16))
    model32, data32 = on_cuda(*build(name, 16, dtype=torch.float32))
    V = random_block(num_params(model64), 4).cuda()
    for fused, _, ref in PRODUCTS.values():
        exact = ref(model64, data64, V)
        autograd32 = relative_error(ref(model32, data32, V.float()).double(), exact)
        fused32 = relative_error((fused(model32, data32) @ V.float()).double(), exact)
        assert_within_float32_autograd(fused32, autograd32)


def test_graph_engine_is_bitwise_reproducible():
    from test_convnets import build

    model, data = on_cuda(*build("preact-resnet", 64, dtype=torch.float32))
    V = random_block(num_params(model), 4, dtype=torch.float32).cuda()
    for fused, _, _ in PRODUCTS.values():
        op = fused(model, data)
        first = op @ V
        assert torch.equal(first, op @ V)
        assert torch.equal(first, fused(model, data) @ V)

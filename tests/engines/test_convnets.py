"""The graph engine on convnets and residual networks, against autograd in float64."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyflat
from pyflat import reference

from helpers import assert_within_float32_autograd, num_params, random_block, relative_error

TOL = 1e-10  # float64 against torch.func; observed ~5e-16


def randomize_batchnorm(model: nn.Module, seed: int = 3) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, so that every
    BatchNorm term is exercised (defaults make it nearly the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model


def small_cnn() -> nn.Module:
    """The digits CNN: 8x8 inputs, two convolutions, max pooling."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def vgg_style() -> nn.Module:
    """Conv-BN-ReLU stacks with max pooling (overlapping windows and ceil mode), BN1d and
    dropout in the head."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
        nn.Conv2d(8, 8, 1), nn.Tanh(),  # a 1x1 convolution, stride 1, with bias
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(12, 5))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016); a 1x1 strided convolution on the
    shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation=F.relu):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.activation = activation
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = self.activation(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.activation(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Two stages (the second downsamples), global average pooling, a linear head."""

    def __init__(self, width: int = 4, classes: int = 10, activation=F.relu):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stage1 = nn.Sequential(PreActBlock(width, width, 1, activation))
        self.stage2 = nn.Sequential(PreActBlock(width, 2 * width, 2, activation),
                                    PreActBlock(2 * width, 2 * width, 1, activation))
        self.bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)
        self.activation = activation

    def forward(self, x):
        out = self.stage2(self.stage1(self.conv(x)))
        out = self.activation(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.fc(out)


class WideBlock(nn.Module):
    """Wide-ResNet block (Zagoruyko & Komodakis 2016): BN-ReLU-conv twice with dropout
    between, a 1x1 shortcut; the head averages with F.avg_pool2d and flattens by shape."""

    def __init__(self, c_in: int = 3, width: int = 6, classes: int = 4):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1)
        self.dropout = nn.Dropout(0.3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(c_in, width, 1, stride=2)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(self.dropout(out))))
        out = out + self.shortcut(x)
        out = F.avg_pool2d(out, out.shape[-1])
        return self.fc(torch.flatten(out, 1))


def grouped() -> nn.Module:
    """Grouped (groups=2), depthwise and dilated convolutions, strides, 'same' padding,
    average pooling without padding counted, adaptive pooling to an uneven size."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.SiLU(),
        nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False), nn.Softplus(beta=1.5),
        nn.Conv2d(6, 4, 3, padding="same", dilation=2), nn.ELU(),
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(), nn.Linear(24, 3))


class StemBlock(nn.Module):
    """torchvision's ResNet layout: a 7x7 stride-2 stem, 3x3 stride-2 max pooling with
    padding, basic blocks with one in-place ReLU module used twice and `out += identity`."""

    def __init__(self, width: int = 4, classes: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.block_conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.block_bn1 = nn.BatchNorm2d(width)
        self.block_conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.block_bn2 = nn.BatchNorm2d(width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        identity = x
        out = self.relu(self.block_bn1(self.block_conv1(x)))
        out = self.block_bn2(self.block_conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.avgpool(out), 1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.pointwise = nn.Conv1d(4, 4, 1, stride=1)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        out = torch.sigmoid(self.bn(self.pointwise(self.conv(x)))) * 2.0
        return self.head(out.reshape(x.shape[0], -1)) / 3.0


MODELS = {
    # name: (builder, input shape per sample, classes)
    "small-cnn": (small_cnn, (1, 8, 8), 10),
    "vgg-style": (vgg_style, (3, 11, 11), 5),
    "preact-resnet": (PreActResNet, (3, 9, 9), 10),
    "preact-resnet-tanh": (lambda: PreActResNet(3, 4, torch.tanh), (3, 7, 7), 4),
    "wide-block": (WideBlock, (3, 8, 8), 4),
    "resnet-stem": (StemBlock, (3, 19, 19), 6),
    "grouped-depthwise": (grouped, (4, 13, 13), 3),
    "conv1d": (Conv1dNet, (2, 9), 3),
    "two-activations": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Tanh(),
                                              nn.Linear(7, 3)), (5,), 3),
}


def build(name: str, batch: int, dtype=torch.float64, seed: int = 0, models=None):
    builder, shape, classes = (models or MODELS)[name]
    torch.manual_seed(seed)
    model = randomize_batchnorm(builder()).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return model, (X, y)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("product", ["ggn", "hessian"])
def test_products_match_autograd(product, name, batch, k):
    model, data = build(name, batch)
    operator = pyflat.GGN if product == "ggn" else pyflat.Hessian
    ref_fn = reference.ggn_matmat if product == "ggn" else reference.hessian_matmat
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the fused engine takes every model here
        op = operator(model, data, weight_decay=0.05)
    assert op.backend == "fused" and op.engine == "graph"
    V = random_block(num_params(model), k)
    expected = ref_fn(model, data, V, weight_decay=0.05)
    assert relative_error(op @ V, expected) < TOL
    assert op.loss == pytest.approx(reference.loss(model, data).item(), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sum_reduction(reduction):
    model, data = build("preact-resnet", 4)
    V = random_block(num_params(model), 2)
    for operator, ref_fn in ((pyflat.GGN, reference.ggn_matmat),
                             (pyflat.Hessian, reference.hessian_matmat)):
        op = operator(model, data, reduction=reduction)
        assert relative_error(op @ V, ref_fn(model, data, V, reduction=reduction)) < TOL


def test_dense_ggn_is_symmetric_psd_and_traces_agree_for_piecewise_linear_nets():
    # ReLU, max pooling and eval-mode BatchNorm are piecewise multilinear in the
    # parameters: the Hessian's extra terms have a zero diagonal, so trace(H) = trace(G)
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3))).double().eval()
    gen = torch.Generator().manual_seed(5)
    data = (torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=gen))
    G = pyflat.GGN(model, data).to_dense()
    H = pyflat.Hessian(model, data).to_dense()
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-14)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12 * float(G.abs().max())
    assert float(torch.trace(H)) == pytest.approx(float(torch.trace(G)), rel=1e-12)
    assert relative_error(H, reference.hessian_dense(model, data)) < TOL


def cifar_cnn() -> nn.Module:
    """Convolutions with biases on 32x32 images: the bias gradient sums 32 x 32 x batch
    terms, where a naive float32 sum loses digits that autograd keeps."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


MODELS_FLOAT32 = dict(MODELS, **{"cifar-cnn": (cifar_cnn, (3, 32, 32), 10)})


@pytest.mark.parametrize("name", ["vgg-style", "preact-resnet", "grouped-depthwise",
                                  "cifar-cnn"])
def test_float32_error_is_within_autograd_float32_error(name):
    batch = 32 if name == "cifar-cnn" else 6
    model, data = build(name, batch, models=MODELS_FLOAT32)
    model32 = build(name, batch, dtype=torch.float32, models=MODELS_FLOAT32)[0]
    data32 = (data[0].float(), data[1])
    V = random_block(num_params(model), 3)
    for operator, ref_fn in ((pyflat.GGN, reference.ggn_matmat),
                             (pyflat.Hessian, reference.hessian_matmat)):
        exact = ref_fn(model, data, V)
        autograd32 = relative_error(ref_fn(model32, data32, V.float()).double(), exact)
        fused32 = relative_error((operator(model32, data32) @ V.float()).double(), exact)
        assert_within_float32_autograd(fused32, autograd32)


def test_products_are_deterministic_and_a_snapshot():
    model, data = build("preact-resnet", 5)
    op = pyflat.Hessian(model, data)
    V = random_block(num_params(model), 3)
    first = op @ V
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(2.0)
    torch.testing.assert_close(op @ V, first, rtol=0, atol=0)


def test_blocks_wider_than_the_memory_budget_are_split():
    model, data = build("small-cnn", 4)
    op = pyflat.GGN(model, data)
    V = random_block(num_params(model), 5)
    whole = op @ V
    batch = op.backend_operator
    batch.block_memory_bytes = batch._bytes_per_direction * 2  # two directions per call
    assert relative_error(op @ V, whole) < 1e-13  # other GEMM shapes: rounding only


def test_data_set_of_batches_through_the_graph_engine():
    model, (X, y) = build("wide-block", 10)
    op = pyflat.GGN(model, (X, y), batch_size=4)  # batches of 4, 4 and 2
    assert op.backend == "fused" and op.engine == "graph"
    V = random_block(num_params(model), 2)
    assert relative_error(op @ V, reference.ggn_matmat(model, (X, y), V)) < TOL


def test_validate_on_a_resnet():
    model, (X, y) = build("preact-resnet", 8, dtype=torch.float32)
    report = pyflat.validate(model, (X, y), k=2)
    assert report.supported and report.ok, str(report)


def test_spectral_algorithms_take_the_graph_engine():
    model, data = build("small-cnn", 6)
    op = pyflat.Hessian(model, data)
    dense = reference.hessian_dense(model, data)
    top = pyflat.eigsh(op, k=2, seed=0)
    assert top.converged
    expected = torch.linalg.eigvalsh(dense)[-2:]  # eigsh returns them ascending, as scipy
    torch.testing.assert_close(torch.as_tensor(top.eigenvalues, dtype=torch.float64),
                               expected, rtol=1e-8, atol=1e-10)


def test_unsupported_module_falls_back_with_its_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 3)).double().eval()
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=gen))
    with pytest.warns(UserWarning, match=r"unsupported module GroupNorm at '1'.*Falling back"):
        op = pyflat.Hessian(model, data)
    assert op.backend == "reference"
    V = random_block(num_params(model), 2)
    assert relative_error(op @ V, reference.hessian_matmat(model, data, V)) < 1e-12
    with pytest.raises(TypeError, match=r"unsupported module GroupNorm at '1'"):
        pyflat.Hessian(model, data, backend="fused")


def test_untraceable_model_is_named():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(4, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=gen))
    with pytest.raises(TypeError, match=r"torch.fx cannot trace DataDependent"):
        pyflat.GGN(DataDependent().double(), data, backend="fused")


def test_shared_convolution_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(torch.relu(self.conv(x))), 1))

    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (3,), generator=gen))
    with pytest.raises(TypeError, match=r"parameter 'conv.weight' is also used at 'conv'; "
                                        r"shared parameters are not supported"):
        pyflat.GGN(Twice().double(), data, backend="fused")

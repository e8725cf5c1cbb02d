"""The autograd backend on models the fused engines do not take: attention (fused CPU
kernels without forward-mode AD) and token ids (integer inputs)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyflat

from helpers import make_batch, make_mlp, num_params, random_block, relative_error


class AttentionModel(nn.Module):
    """Linear, nn.MultiheadAttention, mean over positions, Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attention(h, h, h)
        return self.out(a.mean(1))


class EncoderModel(nn.Module):
    """Linear, nn.TransformerEncoderLayer, mean over positions, Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                  batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.encoder(self.inp(x)).mean(1))


class SDPAModel(nn.Module):
    """Two heads of F.scaled_dot_product_attention, mean over positions, Linear."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(3, 12)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        N, T, _ = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, 2, 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, 2)
        return self.out(a.mean(2).reshape(N, 4))


class BagOfTokens(nn.Module):
    """Embedding, mean over tokens, Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(self.embed(ids).mean(1))


class TokenEncoder(nn.Module):
    """Embedding, nn.TransformerEncoderLayer, mean over tokens, Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                  batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(self.encoder(self.embed(ids)).mean(1))


def float_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 4, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=gen))


def token_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (5, 4), generator=gen), torch.randint(0, 3, (5,), generator=gen)


CASES = {
    "multihead_attention": (AttentionModel, float_batch),
    "transformer_encoder_layer": (EncoderModel, float_batch),
    "scaled_dot_product_attention": (SDPAModel, float_batch),
    "embedding": (BagOfTokens, token_batch),
    "embedding_transformer": (TokenEncoder, token_batch),
}


def build(name):
    model_type, batch = CASES[name]
    torch.manual_seed(0)
    return model_type().double().eval(), batch()


def dense_curvature(model, data, exact):
    """The P x P Hessian (reverse over reverse) or GGN (reverse-mode Jacobian of the logits,
    textbook loss Hessian) by torch.autograd.functional, attention on its math path."""
    X, y = data
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(flat):
        parts = [c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes)]
        return functional_call(model, dict(zip(names, parts)), (X,))

    with sdpa_kernel(SDPBackend.MATH):
        if exact:
            return torch.autograd.functional.hessian(lambda t: F.cross_entropy(logits(t), y),
                                                     theta, vectorize=True)
        out = logits(theta).detach()
        J = torch.autograd.functional.jacobian(logits, theta, vectorize=True)  # (N, C, P)
        H = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z, y), out)
        return torch.einsum("ncp,ncmd,mdq->pq", J, H, J)


def assert_settings_are_defaults():
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()


@pytest.mark.parametrize("operator", [pyflat.GGN, pyflat.Hessian])
@pytest.mark.parametrize("name", list(CASES))
def test_products_match_dense_autograd(name, operator):
    model, data = build(name)
    V = random_block(num_params(model), 3)
    expected = dense_curvature(model, data, exact=operator is pyflat.Hessian) @ V + 0.1 * V
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        loss = float(F.cross_entropy(model(data[0]), data[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = operator(model, data, backend="reference", weight_decay=0.1)
    with pytest.warns(UserWarning, match="Falling back to the autograd reference backend"):
        fallen_back = operator(model, data, weight_decay=0.1)
    for op in (chosen, fallen_back):
        assert op.backend == "reference"
        assert relative_error(op @ V, expected) < 1e-10
        assert relative_error(op @ V[:, 0], expected[:, 0]) < 1e-10
        assert op.loss == pytest.approx(loss, rel=1e-12)
        assert_settings_are_defaults()


def test_user_attention_settings_are_restored():
    model, data = build("transformer_encoder_layer")
    V = random_block(num_params(model), 2)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            pyflat.Hessian(model, data, backend="reference") @ V
            pyflat.reference.ggn_matmat(model, data, V)
            assert not torch.backends.cuda.mem_efficient_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled()
            assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert_settings_are_defaults()


def test_settings_are_restored_when_the_forward_raises():
    class Failing(EncoderModel):
        def forward(self, x):
            assert not torch.backends.mha.get_fastpath_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            raise RuntimeError("forward failed")

    model, data = Failing().double().eval(), float_batch()
    with pytest.raises(RuntimeError, match="forward failed"):
        pyflat.reference.ggn_matmat(model, data, random_block(num_params(model), 1))
    assert_settings_are_defaults()


def test_both_settings_are_needed():
    """Each setting alone leaves a fused kernel in the forward of some model."""
    model, data = build("transformer_encoder_layer")
    v = random_block(num_params(model), 1)[:, 0]
    fns = pyflat.reference.functions(model, data)

    def jvp_of_logits():
        return torch.func.jvp(
            lambda *p: functional_call(model, dict(zip(fns.names, p)), (data[0],)),
            fns.param_tuple, fns.unflatten(v))

    with sdpa_kernel(SDPBackend.MATH), pytest.raises(NotImplementedError, match="forward AD"):
        jvp_of_logits()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with pytest.raises(NotImplementedError, match="forward AD"):
            jvp_of_logits()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with pyflat.reference.autograd_friendly_attention():
        jvp_of_logits()
    assert_settings_are_defaults()


def test_integer_inputs_are_refused_by_the_fused_engine():
    model = make_mlp([4, 5, 3])
    X = torch.randint(0, 7, (6, 4))
    y = torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match=r"X must have the model's dtype torch.float64, got "
                                        r"torch.int64 \(integer inputs such as token ids run "
                                        r"through backend='reference'\)"):
        pyflat.GGN(model, (X, y), backend="fused")


def test_float_inputs_must_still_match_the_model_dtype():
    model, (X, y) = build("multihead_attention")
    with pytest.raises(TypeError, match=r"X must have the model's dtype torch.float64, got "
                                        r"torch.float32"):
        pyflat.GGN(model, (X.float(), y), backend="reference")
    with pytest.raises(TypeError, match=r"X must have the model's dtype torch.float64, got "
                                        r"torch.bool"):
        pyflat.GGN(build("embedding")[0], (X > 0, y), backend="reference")


class TokenLogits(nn.Module):
    """One prediction per position: (N, T, C) logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(self.embed(ids))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_token_level_logits_are_refused(backend):
    model = TokenLogits().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"the model must map X to logits of shape \(5, "
                                             r"classes\), got \(5, 4, 3\); token-level losses "
                                             r"\(one prediction per position\) are not "
                                             r"supported yet"):
            pyflat.Hessian(model, token_batch(), backend=backend)


def test_the_fused_path_is_unchanged_for_float_inputs():
    model = make_mlp([4, 5, 3])
    data = make_batch(6, 4, 3)
    op = pyflat.GGN(model, data)
    assert op.backend == "fused"
    V = random_block(num_params(model), 2)
    ref = pyflat.GGN(model, data, backend="reference")
    assert relative_error(ref @ V, op @ V) < 1e-12

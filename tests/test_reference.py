"""The autograd oracle against a 50-digit evaluation, on confident models where the
textbook loss Hessian diag(p) - p p^T cancels catastrophically."""
import copy

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from pyflat import reference

from helpers import relative_error

mpmath.mp.dps = 50


def confident_logits(batch, classes, seed, low=20.0, high=40.0):
    """(batch, classes) float64 logits whose top class leads the next by low..high, so
    1 - p_top lies between about exp(-high) and exp(-low)."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    top = torch.randint(0, classes, (batch,), generator=gen)
    margins = low + (high - low) * torch.rand(batch, generator=gen, dtype=torch.float64)
    rest = Z.masked_fill(F.one_hot(top, classes).bool(), -float("inf")).max(1).values
    Z[torch.arange(batch), top] = rest + margins
    return Z


def confident_linear(batch, features, classes, seed):
    """A Linear layer with large weights and inputs on which it is confident: the weights
    solve X W^T + b = Z for confident logits Z (features + 1 >= batch)."""
    gen = torch.Generator().manual_seed(seed + 100)
    X = torch.randn(batch, features, generator=gen, dtype=torch.float64)
    Z = confident_logits(batch, classes, seed)
    A = torch.cat([X, torch.ones(batch, 1, dtype=torch.float64)], 1)
    Wb = torch.linalg.lstsq(A, Z).solution.T  # (classes, features + 1)
    model = nn.Linear(features, classes).double()
    with torch.no_grad():
        model.weight.copy_(Wb[:, :-1])
        model.bias.copy_(Wb[:, -1])
    y = model(X).argmax(1)
    return model, (X, y)


def mp_loss_hessian(z, u, scale):
    """scale * (diag(p) - p p^T) u for one sample, in mpmath (lists of floats in)."""
    z = [mpmath.mpf(float(t)) for t in z]
    u = [mpmath.mpf(float(t)) for t in u]
    top = max(z)
    e = [mpmath.exp(t - top) for t in z]
    total = mpmath.fsum(e)
    p = [t / total for t in e]
    pu = mpmath.fsum(pc * uc for pc, uc in zip(p, u))
    return [scale * pc * (uc - pu) for pc, uc in zip(p, u)]


def mp_loss_hessian_matmat(logits, U, reduction):
    """(B, C) or (B, C, k) U through the loss Hessian, column by column, as float64."""
    scale = mpmath.mpf(1) / logits.shape[0] if reduction == "mean" else mpmath.mpf(1)
    cols = U.unsqueeze(-1) if U.dim() == 2 else U
    out = torch.empty(cols.shape, dtype=torch.float64)
    for n in range(logits.shape[0]):
        for j in range(cols.shape[2]):
            h = mp_loss_hessian(logits[n].tolist(), cols[n, :, j].tolist(), scale)
            out[n, :, j] = torch.tensor([float(t) for t in h], dtype=torch.float64)
    return out.view(U.shape)


MP_OUTPUTS = {  # an output activation and its derivative, in mpmath
    "identity": (lambda a: a, lambda a: mpmath.mpf(1)),
    "tanh": (mpmath.tanh, lambda a: mpmath.sech(a) ** 2),
    "sigmoid": (lambda a: 1 / (1 + mpmath.exp(-a)),
                lambda a: mpmath.exp(-a) / (1 + mpmath.exp(-a)) ** 2),
}


def mp_linear_ggn_matmat(model, X, V, reduction, output="identity"):
    """J^T H_loss J V for one Linear layer (then an elementwise output activation s) in
    mpmath: logits = s(X W^T + b), so J v maps (dW, db) to s' * (X dW^T + db) and J^T h to
    ((s' h)^T X, sum_n s' h_n); flat layout (weight, bias)."""
    act, act_prime = MP_OUTPUTS[output]
    W = [[mpmath.mpf(float(t)) for t in row] for row in model.weight.tolist()]
    b = [mpmath.mpf(float(t)) for t in model.bias.tolist()]
    Xm = [[mpmath.mpf(float(t)) for t in row] for row in X.tolist()]
    C, D = len(W), len(Xm[0])
    B = len(Xm)
    scale = mpmath.mpf(1) / B if reduction == "mean" else mpmath.mpf(1)
    pre = [[mpmath.fsum(W[c][d] * x[d] for d in range(D)) + b[c] for c in range(C)]
           for x in Xm]
    logits = [[act(a) for a in row] for row in pre]
    slopes = [[act_prime(a) for a in row] for row in pre]
    out = torch.empty(V.shape, dtype=torch.float64)
    for j in range(V.shape[1]):
        v = [mpmath.mpf(float(t)) for t in V[:, j].tolist()]
        dW = [v[c * D:(c + 1) * D] for c in range(C)]
        db = v[C * D:]
        gW = [[mpmath.mpf(0)] * D for _ in range(C)]
        gb = [mpmath.mpf(0)] * C
        for n, x in enumerate(Xm):
            u = [slopes[n][c] * (mpmath.fsum(dW[c][d] * x[d] for d in range(D)) + db[c])
                 for c in range(C)]
            h = mp_loss_hessian(logits[n], u, scale)
            for c in range(C):
                g = slopes[n][c] * h[c]
                gb[c] += g
                for d in range(D):
                    gW[c][d] += g * x[d]
        flat = [t for row in gW for t in row] + gb
        out[:, j] = torch.tensor([float(t) for t in flat], dtype=torch.float64)
    return out


def textbook_ggn_matmat(model, data, V, reduction):
    """The GGN with the loss Hessian by autograd of F.cross_entropy (diag(p) - p p^T)."""
    fns = reference.functions(model, data, reduction)

    def product(v):
        logits, jv = jvp(fns.logits, fns.param_tuple, fns.unflatten(v))
        _, hjv = jvp(grad(fns.cross_entropy), (logits,), (jv,))
        _, vjp_fn = torch.func.vjp(fns.logits, *fns.param_tuple)
        return fns.flatten(vjp_fn(hjv))

    return vmap(product, in_dims=1, out_dims=1)(V)


def norm_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


CASES = [(6, 8, 3, 0), (6, 8, 5, 1), (7, 9, 10, 2)]  # batch, features, classes, seed


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch, features, classes, seed", CASES)
def test_ggn_of_a_confident_linear_layer_matches_50_digits(batch, features, classes, seed,
                                                           reduction):
    model, data = confident_linear(batch, features, classes, seed)
    P = classes * (features + 1)
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mp_linear_ggn_matmat(model, data[0], V, reduction)
    # the case is one the textbook form cannot do in float64
    assert norm_error(textbook_ggn_matmat(model, data, V, reduction), exact) > 1e-10
    assert norm_error(reference.ggn_matmat(model, data, V, reduction=reduction), exact) <= 1e-12
    assert norm_error(reference.ggn_matmat(model, data, V[:, 0], reduction=reduction),
                      exact[:, 0]) <= 1e-12
    fns = reference.functions(model, data, reduction)
    assert norm_error(fns.linearized_ggn()(V[:, 1]), exact[:, 1]) <= 1e-12
    assert norm_error(reference.ReferenceGGN(model, data, reduction=reduction) @ V,
                      exact) <= 1e-12


def test_dense_ggn_of_a_confident_linear_layer_matches_50_digits():
    model, data = confident_linear(6, 8, 5, 3)
    P = 5 * 9
    eye = torch.eye(P, dtype=torch.float64)
    exact = mp_linear_ggn_matmat(model, data[0], eye, "mean")
    G = reference.ggn_dense(model, data)
    assert norm_error(G, exact) <= 1e-12
    torch.testing.assert_close(reference.ggn_dense(model, data, weight_decay=0.5),
                               G + 0.5 * eye, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("classes, seed", [(3, 0), (5, 1), (10, 2)])
def test_loss_hessian_product_matches_50_digits_per_sample(classes, seed, reduction):
    logits = confident_logits(8, classes, seed)
    U = torch.randn(8, classes, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    exact = mp_loss_hessian_matmat(logits, U, reduction)
    ours = reference.cross_entropy_hessian_matmat(logits, U, reduction=reduction)
    per_sample = ((ours - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert per_sample <= 1e-13
    textbook = jvp(grad(lambda z: F.cross_entropy(z, logits.argmax(1), reduction=reduction)),
                   (logits,), (U,))[1]
    assert ((textbook - exact).norm(dim=1) / exact.norm(dim=1)).max() > 1e-6


def test_loss_hessian_product_takes_blocks_and_vmap():
    logits = confident_logits(5, 4, 7, low=0.0, high=30.0)
    U = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mp_loss_hessian_matmat(logits, U, "mean")
    block = reference.cross_entropy_hessian_matmat(logits, U)
    assert norm_error(block, exact) <= 1e-13
    columns = vmap(lambda u: reference.cross_entropy_hessian_matmat(logits, u),
                   in_dims=2, out_dims=2)(U)
    torch.testing.assert_close(columns, block, rtol=0, atol=0)


def test_loss_hessian_product_on_moderate_logits_is_autograds():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    U = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (9,), generator=gen)
    for reduction in ("mean", "sum"):
        expected = torch.autograd.functional.hvp(
            lambda z: F.cross_entropy(z, y, reduction=reduction), logits, U)[1]
        ours = reference.cross_entropy_hessian_matmat(logits, U, reduction=reduction)
        assert relative_error(ours, expected) < 1e-14


def test_loss_hessian_product_refuses_bad_input():
    logits = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"logits: expected a torch.Tensor, got list"):
        reference.cross_entropy_hessian_matmat([[0.0]], logits)
    with pytest.raises(ValueError, match=r"logits: expected shape \(batch, classes\), got "
                                         r"\(4, 3, 1\)"):
        reference.cross_entropy_hessian_matmat(logits[..., None], logits)
    with pytest.raises(ValueError, match=r"U: expected shape \(4, 3\) or \(4, 3, k\), got "
                                         r"\(3, 4\)"):
        reference.cross_entropy_hessian_matmat(logits, logits.T)
    with pytest.raises(TypeError, match=r"U: expected dtype torch.float64, got torch.float32"):
        reference.cross_entropy_hessian_matmat(logits, logits.float())
    with pytest.raises(ValueError, match=r"reduction: expected 'mean' or 'sum', got 'none'"):
        reference.cross_entropy_hessian_matmat(logits, logits, reduction="none")


@pytest.mark.parametrize("low, high", [(20.0, 40.0), (0.0, 3.0)])
def test_float32_ggn_is_at_least_as_accurate_as_the_textbook_form(low, high):
    model, (X, y) = confident_linear(6, 8, 5, 4)
    if low < 20:
        model.weight.data.mul_(high / 40)
        model.bias.data.mul_(high / 40)
    model32, X32 = nn.Linear(8, 5), X.float()
    model32.load_state_dict({k: t.float() for k, t in model.state_dict().items()})
    V = torch.randn(45, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the exact GGN of the float32 model (its values, rounded once, taken as exact)
    exact = mp_linear_ggn_matmat(model32.double(), X32.double(), V, "mean")
    model32.float()
    ours = norm_error(reference.ggn_matmat(model32, (X32, y), V.float()).double(), exact)
    textbook = norm_error(textbook_ggn_matmat(model32, (X32, y), V.float(), "mean").double(),
                          exact)
    assert ours <= max(textbook, 8 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_of_a_confident_linear_layer_matches_50_digits(seed, reduction):
    # logits linear in the parameters: the Hessian is the GGN, known to 50 digits
    model, data = confident_linear(6, 7, 5, seed)
    P = 5 * 8
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mp_linear_ggn_matmat(model, data[0], V, reduction)
    fns = reference.functions(model, data, reduction)
    # torch.func's own forward-over-reverse cannot do this case in float64
    assert norm_error(torch.stack([fns.hvp(V[:, j]) for j in range(3)], 1), exact) > 1e-10
    assert norm_error(reference.hessian_matmat(model, data, V, reduction=reduction),
                      exact) <= 1e-12
    assert norm_error(reference.ReferenceHessian(model, data, reduction=reduction) @ V,
                      exact) <= 1e-12
    dense = reference.hessian_dense(model, data, reduction=reduction)
    assert norm_error(dense @ V, exact) <= 1e-12


@pytest.mark.parametrize("classes", [2, 5, 10])
def test_loss_gradient_matches_50_digits(classes):
    logits = confident_logits(6, classes, seed=classes)
    y = logits.argmax(1)
    y[0] = (y[0] + 1) % classes  # one sample confidently wrong
    ours = reference.cross_entropy_gradient(logits, y, reduction="sum")
    for n in range(6):
        z = [mpmath.mpf(float(t)) for t in logits[n].tolist()]
        top = max(z)
        e = [mpmath.exp(t - top) for t in z]
        total = mpmath.fsum(e)
        for c in range(classes):
            exact = e[c] / total - (1 if c == int(y[n]) else 0)
            assert abs(mpmath.mpf(float(ours[n, c])) - exact) <= 1e-14 * abs(exact), (n, c)
    mean = reference.cross_entropy_gradient(logits, y, reduction="mean")
    assert torch.equal(mean, ours / 6)
    # autograd's p - 1 keeps no correct digit of the label's entry on confident samples
    auto = torch.func.grad(lambda z: F.cross_entropy(z, y, reduction="sum"))(logits)
    assert relative_error(auto, ours) < 1e-12
    label_auto, label_ours = auto[1:].gather(1, y[1:, None]), ours[1:].gather(1, y[1:, None])
    assert float(((label_auto - label_ours) / label_ours).abs().max()) > 1e-3


@pytest.mark.parametrize("activation", [nn.Tanh, nn.GELU, nn.Softplus])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_oracle_agrees_with_both_autograd_modes_on_moderate_models(activation,
                                                                          reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), activation(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(7, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (7,), generator=gen))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=gen,
                    dtype=torch.float64)
    ours = reference.hessian_matmat(model, data, V, reduction=reduction)
    fns = reference.functions(model, data, reduction)
    for other in (fns.hvp, fns.hvp_double_backward):
        theirs = torch.stack([other(V[:, j]) for j in range(2)], 1)
        assert relative_error(ours, theirs) < 1e-12


def saturated_layer(output, seed, batch=3, features=4, classes=3):
    """Linear(features, classes) then tanh or sigmoid, every pre-activation at
    low <= |a| <= high: around or past the point where t = tanh(a) or s = sigmoid(a)
    rounds to +-1 (or 1) in float64, so 1 - t^2 and s (1 - s) lose their digits."""
    low, high = (20.0, 30.0) if output == "tanh" else (32.0, 45.0)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, features, generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (batch, classes), generator=gen).double() * 2 - 1
    if output == "sigmoid":  # sigmoid saturates to 0 without loss of relative accuracy
        signs = signs.abs()
    A = signs * (low + (high - low) * torch.rand(batch, classes, generator=gen,
                                                    dtype=torch.float64))
    Wb = torch.linalg.lstsq(torch.cat([X, torch.ones(batch, 1, dtype=torch.float64)], 1),
                            A).solution.T
    linear = nn.Linear(features, classes).double()
    with torch.no_grad():
        linear.weight.copy_(Wb[:, :-1])
        linear.bias.copy_(Wb[:, -1])
    model = nn.Sequential(linear, nn.Tanh() if output == "tanh" else nn.Sigmoid())
    y = torch.randint(0, classes, (batch,), generator=gen)
    return model, (X, y)


@pytest.mark.parametrize("output", ["tanh", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_saturated_outputs_engine_matches_50_digits_where_autograd_rounds_to_zero(output,
                                                                                 seed):
    import pyflat

    from helpers import exact_saturation
    model, data = saturated_layer(output, seed)
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mp_linear_ggn_matmat(model[0], data[0], V, "sum", output=output)
    assert exact.abs().max() > 0
    # autograd's own rule loses the relative accuracy here: the oracle alone cannot judge
    assert norm_error(reference.ggn_matmat(model, data, V, reduction="sum"), exact) > 1e-6
    with exact_saturation():
        assert norm_error(reference.ggn_matmat(model, data, V, reduction="sum"),
                          exact) <= 1e-12
    ggn = pyflat.GGN(model, data, reduction="sum", backend="fused")
    assert norm_error(ggn @ V, exact) <= 1e-12
    hessian = pyflat.Hessian(model, data, reduction="sum", backend="fused")
    with exact_saturation():
        expected = reference.hessian_matmat(model, data, V, reduction="sum")
    assert norm_error(hessian @ V, expected) <= 1e-10


def _tied_models():
    """A Linear called twice, and two modules holding one Parameter (a weight tie)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    twice = nn.Sequential(layer, nn.Tanh(), layer).double()
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    tied = nn.Sequential(first, nn.Tanh(), second).double()
    return {"called twice": twice, "tied weight": tied}


@pytest.mark.parametrize("kind", ["called twice", "tied weight"])
def test_tied_parameters_are_differentiated_and_left_as_they_were(kind):
    """torch.func.functional_call, under jvp, restores a module reached by two paths
    with the transform's wrapper instead of the Parameter (torch 2.13): the oracle swaps
    each module's tensors once itself, and every use of a tied tensor follows it."""
    model = _tied_models()[kind]
    before = {id(m): dict(m._parameters) for m in model.modules()}
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat_params):  # the same function written out, ties explicit
        params, offset = {}, 0
        for name, p in model.named_parameters():
            params[name] = flat_params[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        h = torch.tanh(X @ params["0.weight"].T + params["0.bias"])
        w2 = params["0.weight"] if "2.weight" not in params else params["2.weight"]
        b2 = params["0.bias"] if "2.bias" not in params else params["2.bias"]
        return F.cross_entropy(h @ w2.T + b2, y)

    dense = torch.autograd.functional.hessian(loss_of, flat)
    V = torch.randn(flat.numel(), 3, dtype=torch.float64, generator=gen)
    for product in (reference.hessian_matmat, reference.hessian_matmat_double_backward):
        torch.testing.assert_close(product(model, (X, y), V), dense @ V, rtol=1e-10, atol=1e-12)
    fns = reference.functions(model, (X, y))
    for hvp in (fns.hvp, fns.hessian_vp, fns.linearized_hvp()):
        torch.testing.assert_close(hvp(V[:, 0]), dense @ V[:, 0], rtol=1e-10, atol=1e-12)
    reference.ggn_matmat(model, (X, y), V)
    fns.linearized_ggn()(V[:, 0])
    after = {id(m): dict(m._parameters) for m in model.modules()}
    assert all(after[k][n] is before[k][n] for k in before for n in before[k]), \
        "a parameter of the model was replaced"
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert [n for n, _ in model.named_parameters()] == names
    copy.deepcopy(model)  # fails on a leaked transform wrapper

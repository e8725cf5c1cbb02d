"""pyflat's precision guard: float32 GEMMs and convolutions inside products run in IEEE
precision (TF32 on NVIDIA GPUs only if pyflat allows it), and the caller's settings come
back exactly, whatever mix of torch's fp32_precision levels and legacy switches set them,
also when the product raises.

Nothing here needs a GPU: the settings are process state, and the CUDA levels can be set,
read and guarded on a CPU-only build."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pyflat
from pyflat import precision
from pyflat.engines import graph as _graph
from pyflat.precision import full_precision

from helpers import make_batch, make_mlp, num_params, random_block

pytestmark = pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
    reason="torch without the fp32_precision settings (before 2.9)")

# torch's fp32_precision tree, parents before children; a level set to "none" inherits
LEVELS = [("generic", "all"),
          ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
          ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")]


def torch_precision_state() -> dict:
    """Every level's own fp32_precision setting ("none" where it inherits) and the two
    legacy switches behind them (the float32 matmul precision and cuDNN's allow_tf32).

    torch's getters return effective values and its legacy getters raise where the new
    levels disagree with them, so each level is read with the levels above it at "none",
    the legacy switches with every level at "none"; everything is put back after."""
    get, put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    state = {}
    try:
        for level in LEVELS:
            state[level] = get(*level)
            put(*level, "none")
        state["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        # with cuDNN's conv and rnn levels at "none", reading allow_tf32 raises iff it is on
        try:
            state["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
        except RuntimeError:
            state["cudnn.allow_tf32"] = True
    finally:
        for level in LEVELS:
            if level in state:
                put(*level, state[level])
    return state


def set_torch_precision_state(state: dict) -> None:
    """Puts back what :func:`torch_precision_state` read: the legacy switches first (their
    setters write some levels too), then every level."""
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    torch.backends.cudnn.allow_tf32 = state["cudnn.allow_tf32"]
    for level in LEVELS:
        torch._C._set_fp32_precision_setter(*level, state[level])


@pytest.fixture(autouse=True)
def _restore_precision():
    saved = torch_precision_state()
    yield
    pyflat.set_allow_tf32(False)
    set_torch_precision_state(saved)


def _backends_attr(path: str):
    obj = torch.backends
    *parents, name = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, name


def apply(setting: list) -> None:
    for path, value in setting:
        if path == "set_float32_matmul_precision":
            torch.set_float32_matmul_precision(value)
        elif path == "mkldnn.fp32_precision":  # its public setter writes the generic level
            torch.backends.mkldnn.set_flags(_fp32_precision=value)
        else:
            setattr(*_backends_attr(path), value)


# what users set, attribute paths under torch.backends, applied in order
SETTINGS = {
    "torch-defaults": [],
    # legacy cuda.matmul.allow_tf32 (and torch.get_float32_matmul_precision) raise
    "generic-tf32": [("fp32_precision", "tf32")],
    "cuda-matmul-tf32": [("cuda.matmul.fp32_precision", "tf32")],
    # cuDNN conv and rnn differ: legacy cudnn.allow_tf32 raises
    "cudnn-conv-ieee": [("cudnn.conv.fp32_precision", "ieee")],
    "cudnn-tf32-children-inherit": [("cudnn.fp32_precision", "tf32"),
                                    ("cudnn.conv.fp32_precision", "none"),
                                    ("cudnn.rnn.fp32_precision", "none")],
    # float32 CPU GEMMs through bf16; torch.get_float32_matmul_precision raises
    "mkldnn-matmul-conv-bf16": [("mkldnn.matmul.fp32_precision", "bf16"),
                                ("mkldnn.conv.fp32_precision", "bf16")],
    "mkldnn-bf16-children-inherit": [("mkldnn.fp32_precision", "bf16")],
    "generic-bf16": [("fp32_precision", "bf16")],
    "mixed": [("fp32_precision", "bf16"), ("cudnn.fp32_precision", "tf32"),
              ("cuda.matmul.fp32_precision", "ieee"), ("cudnn.rnn.fp32_precision", "none"),
              ("mkldnn.fp32_precision", "tf32"), ("mkldnn.conv.fp32_precision", "bf16")],
    "legacy-medium-cudnn-off": [("set_float32_matmul_precision", "medium"),
                                ("cudnn.allow_tf32", False)],
    "legacy-high-cudnn-on": [("cuda.matmul.allow_tf32", True), ("cudnn.allow_tf32", True)],
}

# the effective precision of float32 matmuls and convolutions per device kind
EFFECTIVE = {"cpu": ("mkldnn.matmul.fp32_precision", "mkldnn.conv.fp32_precision"),
             "cuda": ("cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision")}


def effective(device: str) -> tuple[str, str]:
    return tuple(getattr(*_backends_attr(path)) for path in EFFECTIVE[device])


class Interrupted(Exception):
    pass


class PrecisionLog(TorchDispatchMode):
    """Records the effective CPU float32 precision at every op that runs float32 GEMMs or
    convolutions (pyflat's fused MLP ops run theirs inside); with ``interrupt``, raises
    at the first such op, as a product that fails midway."""

    GEMM_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul",
                "aten.mv", "aten.addmv", "aten.convolution", "aten.convolution_backward",
                "pyflat.mlp_forward", "pyflat.mlp_ggn_matmat", "pyflat.mlp_hessian_matmat"}

    def __init__(self, interrupt: bool = False):
        super().__init__()
        self.seen: dict[str, set] = {}
        self.interrupt = interrupt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in self.GEMM_OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.float32
                                         for t in tree_leaves((args, kwargs))):
            self.seen.setdefault(name, set()).add(effective("cpu"))
            if self.interrupt:
                raise Interrupted(name)
        return func(*args, **kwargs)


def small_problem(model_kind: str):
    if model_kind == "mlp":
        model = make_mlp([5, 7, 3], "tanh", dtype=torch.float32)
        data = make_batch(6, 5, 3, dtype=torch.float32)
    else:
        from test_convnets import build
        model, data = build("small-cnn", 3, dtype=torch.float32)
    return model, data, random_block(num_params(model), 2, dtype=torch.float32)


# ---- the guard itself --------------------------------------------------------------------

@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32-off", "tf32-allowed"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_guard_sets_full_precision_and_restores_every_setting(setting, device, allow_tf32):
    apply(SETTINGS[setting])
    pyflat.set_allow_tf32(allow_tf32)
    before = torch_precision_state()
    user_view = effective("cpu"), effective("cuda")
    with full_precision(torch.device(device)):
        inside = effective(device)
    # TF32 is pyflat's to allow on NVIDIA GPUs only; nothing allows bf16
    assert inside == (("tf32", "tf32") if allow_tf32 and device == "cuda" else ("ieee", "ieee"))
    assert torch_precision_state() == before
    assert (effective("cpu"), effective("cuda")) == user_view


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("setting", ["generic-tf32", "mkldnn-bf16-children-inherit", "mixed"])
def test_guard_restores_every_setting_when_the_block_raises(setting, device):
    apply(SETTINGS[setting])
    before = torch_precision_state()
    with pytest.raises(ValueError, match="inside"):
        with full_precision(device):
            inside = effective(device)
            raise ValueError("inside")
    assert inside == ("ieee", "ieee")
    assert torch_precision_state() == before


def test_restored_levels_still_inherit_from_their_parents():
    """A level the user left at "none" follows its parent again after a product."""
    apply(SETTINGS["generic-bf16"])
    with full_precision("cpu"), full_precision("cuda"):
        pass
    torch.backends.fp32_precision = "tf32"
    assert effective("cpu") == ("tf32", "tf32")
    assert effective("cuda") == ("tf32", "tf32")


def test_older_torch_guard_sets_and_restores_the_legacy_switches(monkeypatch):
    """The path for torch without fp32_precision, run here through the legacy switches."""
    monkeypatch.setattr(precision, "_HAS_FP32_PRECISION", False)
    apply(SETTINGS["legacy-medium-cudnn-off"])
    with full_precision("cpu"):
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 is False
    pyflat.set_allow_tf32(True)
    with pytest.raises(ValueError, match="inside"):
        with full_precision("cuda"):
            assert torch.get_float32_matmul_precision() == "high"
            assert torch.backends.cudnn.allow_tf32 is True
            raise ValueError("inside")
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.cudnn.allow_tf32 is False


@pytest.mark.parametrize("setting", ["torch-defaults", "cudnn-conv-ieee", "generic-tf32",
                                     "legacy-high-cudnn-on"])
def test_graph_engine_determinism_guard_keeps_precision_settings(setting, monkeypatch):
    """The graph engine asks cuDNN for deterministic algorithms inside pyflat's guard, where
    cuDNN's conv level is "ieee" and its rnn level is whatever the user set."""
    apply(SETTINGS[setting])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    before = torch_precision_state()
    with full_precision("cuda"), _graph._reproducible(torch.device("cuda")):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert effective("cuda") == ("ieee", "ieee")
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch_precision_state() == before


# ---- products on the CPU -----------------------------------------------------------------

@pytest.mark.parametrize("operator", [pyflat.GGN, pyflat.Hessian], ids=["ggn", "hessian"])
@pytest.mark.parametrize("model_kind, stage", [
    ("mlp", "construction"), ("mlp", "product"),
    ("convnet", "construction"), ("convnet", "product")])
@pytest.mark.parametrize("setting", SETTINGS)
def test_cpu_products_run_in_ieee_and_restore_every_setting(setting, model_kind, stage,
                                                           operator):
    model, data, V = small_problem(model_kind)
    apply(SETTINGS[setting])
    before = torch_precision_state()
    log = PrecisionLog()
    with log:
        op = operator(model, data)
    if stage == "product":
        log = PrecisionLog()
        with log:
            op @ V
    assert log.seen, "no float32 GEMM or convolution was seen"
    assert {name: states for name, states in log.seen.items()
            if states != {("ieee", "ieee")}} == {}
    assert torch_precision_state() == before


@pytest.mark.parametrize("stage", ["construction", "product"])
@pytest.mark.parametrize("setting", ["mkldnn-matmul-conv-bf16", "mixed"])
def test_cpu_products_restore_every_setting_when_they_raise(setting, stage):
    model, data, V = small_problem("convnet")
    apply(SETTINGS[setting])
    op = pyflat.GGN(model, data) if stage == "product" else None
    before = torch_precision_state()
    log = PrecisionLog(interrupt=True)
    with pytest.raises(Interrupted), log:
        pyflat.GGN(model, data) if stage == "construction" else op @ V
    assert list(log.seen.values()) == [{("ieee", "ieee")}]
    assert torch_precision_state() == before


def test_set_allow_tf32_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        pyflat.set_allow_tf32(1)

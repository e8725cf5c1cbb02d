"""Seeded fuzz suite: every product of GGN / Hessian is the model's own function, or the
operator raises TypeError / ValueError.

Each seed draws one case (tests/fuzz_cases.py): MLP chains, convnets, forwards with
constants, subclassed forwards, hooks, parametrizations, memory formats, data sources that
change between passes, and in-place writes after construction. A case fails on a product
that differs from the autograd oracle on a float64 copy of the model and data at
construction, on a crash (any other exception), or on a documented refusal that did not
happen; the message names the seed and the command that reruns it.

PYFLAT_FUZZ_SEEDS picks the seeds: "start:stop" or a comma list ("5,17"); the default is
``range(0, 900)``.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Iterator

import pytest
import torch

from fuzz_cases import FAMILIES, REQUIRED_TAGS, make_case, run_case

DEFAULT_SEEDS = range(0, 900)


def seeds_from(value: str | None) -> list[int]:
    """The seeds a PYFLAT_FUZZ_SEEDS value names: "start:stop", "5,17", or the default."""
    if value is None or not value.strip():
        return list(DEFAULT_SEEDS)
    try:
        if ":" in value:
            start, stop = value.split(":")
            return list(range(int(start), int(stop)))
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"PYFLAT_FUZZ_SEEDS must be 'start:stop' or a comma list of ints, "
                         f"got {value!r}") from None


SEEDS = seeds_from(os.environ.get("PYFLAT_FUZZ_SEEDS"))

#: outcome per seed run in this pytest run, for the test on the mix of outcomes
_OUTCOMES: dict[int, str] = {}


def _global_hook_keys() -> tuple[set, set]:
    hooks = torch.nn.modules.module
    return set(hooks._global_forward_hooks), set(hooks._global_forward_pre_hooks)


@pytest.fixture
def no_global_hooks_leak() -> Iterator[None]:
    """Removes, then reports, any global module hook a case left registered: one would
    change every later test's models."""
    before = _global_hook_keys()
    try:
        yield
    finally:
        hooks = torch.nn.modules.module
        leaked = 0
        for registry, old in ((hooks._global_forward_hooks, before[0]),
                              (hooks._global_forward_pre_hooks, before[1])):
            for key in set(registry) - old:
                registry.pop(key, None)
                leaked += 1
    assert leaked == 0, f"{leaked} global module hook(s) left registered by the case"


def _id(seed: int) -> str:
    return f"{seed}-{make_case(seed).family}"


@pytest.mark.parametrize("seed", SEEDS, ids=[_id(s) for s in SEEDS])
def test_fuzz_case(seed: int, no_global_hooks_leak: None) -> None:
    _OUTCOMES[seed] = run_case(make_case(seed))


def test_default_seeds_cover_every_family_and_feature() -> None:
    """The default range draws every family about equally and every required feature at
    least once, so the coverage cannot shrink unnoticed."""
    families = collections.Counter()
    tags: set[str] = set()
    for seed in DEFAULT_SEEDS:
        case = make_case(seed)
        families[case.family] += 1
        tags |= case.tags
    assert set(families) == set(FAMILIES), sorted(set(FAMILIES) - set(families))
    least = len(DEFAULT_SEEDS) // len(FAMILIES)
    assert min(families.values()) >= least, dict(families)
    assert not REQUIRED_TAGS - tags, f"never drawn: {sorted(REQUIRED_TAGS - tags)}"


@pytest.mark.parametrize("seed", [0, 1, 4, 7, 23, 51])
def test_cases_are_deterministic_and_leave_the_global_rng(seed: int) -> None:
    """A seed builds the same model and data every time, from its own generator only."""
    state = torch.get_rng_state()
    first, second = make_case(seed).build(), make_case(seed).build()
    assert torch.equal(torch.get_rng_state(), state)
    assert make_case(seed).description == make_case(seed).description
    one, two = first.model.state_dict(), second.model.state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(one[key], two[key]) for key in one)
    if isinstance(first.data, tuple):
        assert all(torch.equal(a, b) for a, b in zip(first.data, second.data))
    for (X1, y1), (X2, y2) in zip(first.oracle_batches or [], second.oracle_batches or []):
        assert torch.equal(X1, X2) and torch.equal(y1, y2)
    try:  # running it draws nothing from the global RNG either
        run_case(make_case(seed))
    except AssertionError:  # a wrong product is that seed's own test's to report
        pass
    assert torch.equal(torch.get_rng_state(), state)


def test_outcomes_include_matches_and_refusals() -> None:
    """The cases must reach both ends of the contract: products that match and refusals
    (a suite where everything raised, or nothing did, would prove little). Uses the
    outcomes of this pytest run and runs further default seeds only until both are seen."""

    def kinds() -> set[str]:
        return {outcome.split()[0] for outcome in _OUTCOMES.values()}

    for seed in DEFAULT_SEEDS:
        if {"matched", "raised"} <= kinds():
            break
        if seed in _OUTCOMES:
            continue
        try:
            _OUTCOMES[seed] = run_case(make_case(seed))
        except AssertionError:  # that seed's own test reports it
            _OUTCOMES[seed] = "failed"
    assert {"matched", "raised"} <= kinds(), collections.Counter(
        outcome.split()[0] for outcome in _OUTCOMES.values())


def test_every_engine_and_product_is_checked_against_the_oracle() -> None:
    """The README's promise that every product is checked against autograd: among the
    default seeds, matched products come from every engine (MLP, graph, reference), for
    both curvatures and both dtypes. Uses this pytest run's outcomes where it has them."""
    seen: set[tuple[str, str, torch.dtype]] = set()
    wanted = {(via, curvature, dtype) for via in ("fused/mlp", "fused/graph", "reference/None")
              for curvature in ("ggn", "hessian") for dtype in (torch.float32, torch.float64)}
    for seed in DEFAULT_SEEDS:
        if wanted <= seen:
            break
        case = make_case(seed)
        outcome = _OUTCOMES.get(seed)
        if outcome is None:
            try:
                outcome = _OUTCOMES[seed] = run_case(case)
            except AssertionError:  # that seed's own test reports it
                outcome = _OUTCOMES[seed] = "failed"
        if outcome.startswith("matched via "):
            seen.add((outcome.split()[-1], case.curvature, case.dtype))
    assert wanted <= seen, sorted(map(str, wanted - seen))

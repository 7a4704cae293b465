"""Issue 20: a stateful property test over the public pool API (Hypothesis ``RuleBasedStateMachine``).

CI runs a small fixed profile (``test_pool_state_machine``, a few seconds); ``test_pool_state_machine_long`` is the
``slow`` profile (``pytest -m slow``). Checked to catch, each on its own: a NaN factor accepted by ``add``, a layer
kept after its last LoRA left, decisions swapped between the images of a batch, a slot's scale written wrong.
"""
import copy
import math

import pytest
import torch

import fusion_engine as fe
from fusion_engine.errors import FusionEngineError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

LAYERS = {"0": (5, 6), "2": (4, 5)}  # name -> (out, in) of the machine's model's Linear layers
NAMES = ("a", "b", "c", "d")


def _machine_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)).double()


class PoolMachine(RuleBasedStateMachine):
    """Random adds (ranks 1-8 on random layers, some with a NaN factor), removes, budget changes and calls with
    random assignments (absent and repeated names included, both refused) on a pool attached to a small float64
    MLP. After every step: the pool holds exactly the LoRAs that were added and not removed, each with its own
    factors, its layers are the union of theirs, and a successful add kept the budget; a call's every image equals
    that image made by a single-pair attach of its own LoRAs; a failed operation changed nothing. At the end,
    detach restores the model bit for bit."""

    capacity: dict = {}  # LoRAPool's capacity options: elastic here

    def __init__(self):
        super().__init__()
        self.model = _machine_model()
        self.reference = copy.deepcopy(self.model)
        self.pool = fe.LoRAPool(dtype=torch.float64, **self.capacity)
        self.fusion = fe.attach(self.model, pool=self.pool, backend="reference", targets=list(LAYERS))
        self.held: dict[str, fe.LoRA] = {}

    def _snapshot(self):
        return self.pool.names, self.pool.nbytes, self.pool.version

    @rule(name=st.sampled_from(NAMES), rank=st.integers(1, 8), layers=st.sets(st.sampled_from(sorted(LAYERS)),
          min_size=1), seed=st.integers(0, 2**16), poison=st.integers(0, 4).map(lambda v: v == 0))
    def add(self, name, rank, layers, seed, poison):
        generator = torch.Generator().manual_seed(seed)
        factors = {}
        for layer in sorted(layers):
            out_features, in_features = LAYERS[layer]
            lora_a = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
            if poison:
                lora_a[0, 0] = math.nan
            factors[layer] = fe.LoRALayer(lora_a, torch.randn(out_features, rank, generator=generator,
                                                              dtype=torch.float64), float(rank))
        lora = fe.LoRA(factors, source=f"<machine {name}>")
        before = self._snapshot()
        try:
            self.pool.add(name, lora)
        except FusionEngineError as error:
            assert self._snapshot() == before, "a failed add changed the pool"
            assert poison or name in self.held or isinstance(error, fe.PoolBudgetError), repr(error)
            return
        assert not poison and name not in self.held, "an add that should fail passed"
        assert self.pool.budget_bytes is None or self.pool.nbytes <= self.pool.budget_bytes
        self.held[name] = lora

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name):
        before = self._snapshot()
        try:
            self.pool.remove(name)
        except fe.UnknownLoRAError:
            assert name not in self.held and self._snapshot() == before
            return
        del self.held[name]

    @rule(budget=st.one_of(st.none(), st.integers(0, 3000)))
    def set_budget(self, budget):
        self.pool.budget_bytes = budget

    @precondition(lambda self: self.held)
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def call_again(self, data, seed):  # calls twice as often as the other operations
        self.call(data, seed)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def call(self, data, seed):
        name = st.sampled_from([*sorted(self.held) * 3, "absent"])  # mostly held names, now and then one that is not
        assignment = data.draw(st.lists(st.lists(name, min_size=1, max_size=2).map(tuple), min_size=1, max_size=3))
        x = torch.randn(len(assignment), 3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        before = self._snapshot()
        absent = sorted({n for names in assignment for n in names} - set(self.held))
        repeated = [names for names in assignment if len(set(names)) < len(names)]  # refused: ('a', 'a')
        try:
            self.fusion.set_batch_layout(len(assignment), 1)
            self.fusion.set_loras(assignment)
            with torch.no_grad():
                out = self.model(x)
        except fe.OptionError as error:  # UnknownLoRAError for an absent name
            assert (absent or repeated) and self._snapshot() == before, repr(error)
            return
        assert not absent and not repeated, f"a call naming {absent or repeated} ran"
        for image, names in enumerate(assignment):
            single = copy.deepcopy(self.reference)
            with fe.attach(single, *[self.held[n] for n in names], policy="fls", backend="reference") as pair:
                pair.set_batch_layout(1, 1)
                with torch.no_grad():
                    expected = single(x[image:image + 1])
            torch.testing.assert_close(out[image:image + 1], expected, atol=1e-10, rtol=1e-10, msg=str(names))

    @invariant()
    def holds_what_was_added(self):
        assert sorted(self.pool.names) == sorted(self.held)
        assert set(self.pool.layers) == set().union(*(lora.layers for lora in self.held.values()))
        for name, lora in self.held.items():
            for layer, factors in lora.layers.items():
                lora_a, lora_b = self.pool.factors(name, layer)
                assert torch.equal(lora_a, factors.lora_a) and torch.equal(lora_b, factors.lora_b), (name, layer)

    def teardown(self):
        self.fusion.detach()
        x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(self.model(x), self.reference(x)), "detach left the model changed"
        reference = self.reference.state_dict()
        assert all(torch.equal(t, reference[k]) for k, t in self.model.state_dict().items())


class FixedPoolMachine(PoolMachine):
    """The same over a fixed-capacity pool (3 slots of rank 8; a fourth LoRA is refused with ``PoolBudgetError``),
    and: a layer's stacks, once allocated, are the same tensors at every later step and the bytes never grow back
    after the LoRAs that needed them left."""

    capacity = {"max_loras": 3, "max_rank": 8}

    def __init__(self):
        super().__init__()
        self.stacks: dict[str, tuple] = {}

    @invariant()
    def stacks_never_move(self):
        for name, layer in self.pool.layers.items():
            held = self.stacks.setdefault(name, (layer.a, layer.b, layer.scales, layer.present))
            assert all(new is old for new, old in zip((layer.a, layer.b, layer.scales, layer.present), held)), name
            assert layer.a.shape[:2] == (4, 8) and not layer.present[-1] and not layer.a[-1].any()
        assert self.pool.nbytes == sum(t.numel() * t.element_size() for held in self.stacks.values() for t in held)


MACHINE_CI = dict(max_examples=15, stateful_step_count=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(hypothesis.HealthCheck))


def test_pool_state_machine():
    run_state_machine_as_test(PoolMachine, settings=hypothesis_settings(**MACHINE_CI))


def test_fixed_pool_state_machine():
    run_state_machine_as_test(FixedPoolMachine, settings=hypothesis_settings(**MACHINE_CI))


@pytest.mark.slow
def test_pool_state_machine_long():
    run_state_machine_as_test(PoolMachine, settings=hypothesis_settings(
        **{**MACHINE_CI, "max_examples": 300, "stateful_step_count": 40, "derandomize": False}))

"""backend="auto" by size class (fusion_engine/ops/backend_choice.py): the fastest backend on the measurements recorded
in the repository, the fallbacks and their reasons, the file's checks, and the classes matching the kernels' own."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from fusion_engine.errors import OptionError
from fusion_engine.ops import backend_choice as bc

BF16 = torch.bfloat16


def _data():
    return copy.deepcopy(bc.load_measurements())


def test_the_shipped_file_names_its_provenance_and_every_source_exists():
    data = bc.load_measurements()
    assert data["measurements"]
    for source in data["sources"].values():
        assert {"card", "date", "commit", "where"} <= set(source) and "bench/RESULTS.md" in source["where"]


def test_a_measured_size_class_picks_the_faster_backend_and_cites_the_run():
    backend, reason = bc.choose_backend("fls", 8192, 640, 640, 64, BF16)
    assert backend == "triton"
    assert "measured for this size class" in reason and "H200" in reason and "f6f6ac0" in reason
    assert "reference-compiled" in reason  # says what was never measured


def test_the_choice_follows_the_numbers_not_a_preference():
    """The same class with the table's numbers swapped picks the other backend: nothing is hard-wired."""
    data = _data()
    step = next(e for e in data["measurements"] if len(e["values"]) > 1)
    step["values"] = {"triton": 300.0, "reference": 250.0, "reference-compiled": 120.0}
    assert bc.choose_backend("fls", 8192, 640, 640, 64, BF16, measurements=data)[0] == "reference-compiled"
    step["values"] = {"triton": 300.0, "reference": 250.0}
    assert bc.choose_backend("fls", 8192, 640, 640, 64, BF16, measurements=data)[0] == "reference"


def test_unmeasured_classes_relax_one_field_at_a_time_and_say_so():
    backend, reason = bc.choose_backend("fls", 8192, 640, 640, 64, torch.float16)  # only bf16 was measured
    assert backend == "triton" and "ignoring dtype" in reason
    backend, reason = bc.choose_backend("pooled_fls", 8192, 640, 640, 16, BF16, mode="eager")
    assert backend == "triton" and "pair op fls" in reason and "mode" in reason and "rank" in reason


def test_without_any_side_by_side_table_the_best_evidence_wins():
    data = _data()
    data["measurements"] = [e for e in data["measurements"] if len(e["values"]) == 1]
    backend, reason = bc.choose_backend("fls", 4608, 3072, 3072, 64, BF16, measurements=data)
    assert backend == "triton" and "best evidence" in reason and "2.44" in reason  # FLUX attention r64, this class
    data["measurements"] = []
    backend, reason = bc.choose_backend("mix", 4608, 3072, 3072, 64, BF16, measurements=data)
    assert backend == "triton" and "no measurement at all" in reason


def test_off_cuda_or_without_triton_it_is_the_reference():
    assert bc.choose_backend("fls", 8192, 640, 640, 64, BF16, device_type="cpu")[0] == "reference"
    backend, reason = bc.choose_backend("mix", 64, 64, 64, 8, torch.float32, triton_available=False)
    assert backend == "reference" and "not available" in reason


def test_resolve_maps_the_compiled_reference_to_a_backend_the_layers_run(monkeypatch):
    monkeypatch.setattr(bc, "_cached_choice", lambda *args: ("reference-compiled", "why"))
    assert bc.resolve("auto", op="fls", M=1, N=1, K=1, rank=1, dtype=BF16, device_type="cuda",
                      triton_available=True) == ("reference", "why (runs as reference: compile the model with "
                                                 "torch.compile to get Inductor's)")


def test_resolve_backend_takes_the_size_only_where_auto_meets_the_kernels(monkeypatch):
    from fusion_engine import ops

    size = dict(op="fls", M=8192, N=640, K=640, rank=64, dtype=BF16)
    assert ops.resolve_backend("auto", torch.device("cpu"), size) == "reference"
    assert ops.resolve_backend("reference", torch.device("cpu"), size) == "reference"
    monkeypatch.setattr(ops, "_triton_ops", lambda: type("T", (), {"is_available": staticmethod(lambda: True)}))
    monkeypatch.setattr(bc, "_cached_choice", lambda *args: ("reference", "measured slower"))
    assert ops.resolve_backend("auto", torch.device("cuda"), size) == "reference"
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"  # no size: today's rule


def test_size_classes_are_the_kernels_tuned_table_classes():
    utils = pytest.importorskip("fusion_engine.kernels.utils")
    bounds = bc.load_measurements()["size_classes"]
    for M, N, K in [(154, 1280, 2048), (256, 640, 640), (257, 640, 640), (8192, 640, 640), (4608, 3072, 3072),
                    (4096, 3072, 3072), (4095, 3072, 3072), (1024, 640, 8192), (4608, 3072, 12288)]:
        assert bc.shape_class(M, N, K, bounds) == utils._size_class(M, N, K), (M, N, K)


def test_rank_buckets_and_bad_arguments():
    assert [bc.rank_bucket(r) for r in (1, 16, 17, 64, 65, 128, 300)] == [16, 16, 32, 64, 128, 128, 128]
    with pytest.raises(OptionError, match="op must be one of"):
        bc.choose_backend("conv", 1, 1, 1, 1, BF16)
    with pytest.raises(OptionError, match="mode must be one of"):
        bc.choose_backend("fls", 1, 1, 1, 1, BF16, mode="compiled")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("sources"), "missing the key 'sources'"),
    (lambda d: d["measurements"][0].pop("unit"), r"measurements\[0\]: missing \['unit'\]"),
    (lambda d: d["measurements"][0].update(source="nowhere"), "source 'nowhere' is not one of"),
    (lambda d: d["measurements"][0]["values"].update(cutlass=1.0), "values must map backends"),
    (lambda d: d["measurements"][0]["values"].update(triton=-1.0), "values must map backends"),
])
def test_a_bad_measurement_file_names_the_entry_at_fault(tmp_path, change, message):
    data = _data()
    change(data)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OptionError, match=message) as error:
        bc.load_measurements(path)
    assert str(path) in str(error.value)


def test_describe_lists_one_line_per_layer():
    choices = [("to_q", *bc.choose_backend("fls", 8192, 640, 640, 64, BF16)),
               ("to_k", *bc.choose_backend("fls", 154, 640, 2048, 64, BF16))]
    text = bc.describe(choices)
    assert text.count("\n") == 2 and "to_q: triton - fls mid r<=64 bfloat16 graph" in text and "small_m" in text


def test_an_attached_layer_asks_by_its_call_size_and_describe_says_why(monkeypatch):
    """The wiring: a fused linear under backend="auto" on CUDA hands its call's size class (op, M, N, K, widest
    rank, dtype, mode) to the choice, and ``describe()`` lists that choice and its reason per layer. No GPU here:
    the device is only named, and the kernels' availability is stubbed."""
    import types

    import torch.nn as nn

    import fusion_engine as fe
    from fusion_engine import ops
    from fusion_engine.lora import LoRA, LoRALayer

    net = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24))
    g = torch.Generator().manual_seed(0)

    def lora(rank):
        return LoRA({name: LoRALayer(torch.randn(rank, m.in_features, generator=g),
                                     torch.randn(m.out_features, rank, generator=g), alpha=rank)
                     for name, m in net.named_children() if isinstance(m, nn.Linear)}, f"<r{rank}>", "peft")

    fusion = fe.attach(net, subject=lora(8), style=lora(40), policy="fls")
    assert "2 layers not yet called" in fusion.describe()
    monkeypatch.setattr(ops, "_triton_ops", lambda: types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    rows = types.SimpleNamespace(device=torch.device("cuda"), shape=(8192, 24), dtype=BF16)
    layer = fusion.layers[0]
    backend = layer._backend("fls", rows, max(layer.subject_rank, layer.style_rank))
    assert layer.last_size == dict(op="fls", M=8192, N=40, K=24, rank=40, dtype=BF16, mode="eager")
    expected, reason = bc.resolve("auto", op="fls", M=8192, N=40, K=24, rank=40, dtype=BF16, mode="eager",
                                  device_type="cuda", triton_available=True)
    assert backend == expected and expected == bc.choose_backend("fls", 8192, 40, 24, 40, BF16, mode="eager")[0]
    text = fusion.describe()
    assert f"{layer.name}: {backend} - {reason}" in text and "1 layers not yet called" in text
    fusion.detach()
    reference = fe.attach(net, subject=lora(8), style=lora(8), backend="reference")
    assert "backend='reference' on every layer" in reference.describe()
    reference.detach()

"""A ViT loaded on the packed runtime: its attention computes from the codes, and ``resident_bytes`` is checked
against the bytes the loaded model really holds, counted independently: every tensor the process gained by
loading and running it, found through the garbage collector."""

import gc
import threading

import pytest
import torch
from torch import nn

import sgsc
from sgsc.nn.packed import PackedLinear, packed_weight_bytes, resident_bytes
from sgsc.nn.packed_stream import PackedStreamLinear


class _Vit(nn.Module):
    """A small ViT: patch conv, class token and position table (float Parameters), attention blocks, head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 64, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 64))
        self.pos = nn.Parameter(torch.randn(1, 17, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.blocks(tokens)[:, 0])


def _storages() -> dict[int, int]:
    gc.collect()
    found = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            try:
                found[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake or functional tensor (an earlier test's export left it) holds no data
                continue
    return found


def _load_and_run(path, runtime: str, x: torch.Tensor, out: dict) -> None:
    with torch.device("meta"):  # the architecture holds no storage of its own: load_packed moves it to meta
        fresh = _Vit()
    before = _storages()
    loaded = sgsc.load_packed(path, model=fresh, runtime=runtime)
    with torch.no_grad():  # inference: the convolutions dequantize into the shared buffer
        loaded(x)
    out["held"] = sum(size for ptr, size in _storages().items() if ptr not in before)
    out["resident"], out["codes"] = resident_bytes(loaded), packed_weight_bytes(loaded)


@pytest.mark.parametrize("runtime", ["float", "packed"])
def test_resident_bytes_are_within_5_percent_of_what_a_loaded_model_holds(runtime, tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="cls"):  # the class token and position table stay float, and are named
        model = sgsc.quantize_model(_Vit(), init_bits=4).eval()
    sgsc.save_packed(model, tmp_path / "vit.sgsc")
    x = torch.randn(2, 3, 16, 16)
    sgsc.load_packed(tmp_path / "vit.sgsc", model=_Vit(), runtime=runtime)  # imports and first-use set-up
    measured: dict[str, int] = {}
    # in a thread of its own, whose dequantization buffer (one per thread) the run allocates afresh
    thread = threading.Thread(target=_load_and_run, args=(tmp_path / "vit.sgsc", runtime, x, measured))
    thread.start()
    thread.join()
    assert abs(measured["resident"] - measured["held"]) <= 0.05 * measured["held"]
    if runtime == "packed":  # the float tensors (norms, tables, biases) are counted besides the codes
        assert measured["resident"] > 1.5 * measured["codes"]


def test_attention_projections_run_from_their_codes_on_the_packed_runtime(tmp_path):
    torch.manual_seed(1)
    with pytest.warns(UserWarning):
        model = sgsc.quantize_model(_Vit(), init_bits=5).eval()
    sgsc.save_packed(model, tmp_path / "vit.sgsc")
    packed = sgsc.load_packed(tmp_path / "vit.sgsc", model=_Vit(), runtime="packed")
    attention = packed.blocks.layers[0].self_attn
    assert isinstance(attention.in_proj, PackedStreamLinear) and isinstance(attention.out_proj, PackedLinear)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # the small linear layers multiply in their own order: within fp32 rounding
        torch.testing.assert_close(packed(x), sgsc.load_packed(tmp_path / "vit.sgsc", model=_Vit())(x),
                                   rtol=1e-5, atol=1e-5)

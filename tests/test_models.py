"""find_linear_layers / linear_weight / set_submodule on tiny models; the real SmolLM2."""

import time

import pytest
import torch
from tiny_model import tiny_gpt2, tiny_llama
from torch import nn

from kronlab.models import (
    BlockInputCache,
    decoder_blocks,
    find_linear_layers,
    linear_weight,
    load_model,
    model_info,
    set_submodule,
)


def _dense_output(module, x):
    w, b = linear_weight(module)
    return x @ w.T + (0 if b is None else b)


def test_find_linear_layers_llama():
    model, _ = tiny_llama()
    layers = find_linear_layers(model)
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(layers) == [f"model.layers.{i}.{s}" for i in range(2) for s in per_block]
    shapes = {n.split(".", 3)[3]: tuple(linear_weight(m)[0].shape) for n, m in layers.items()}
    assert shapes == {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32),
                      "self_attn.v_proj": (16, 32), "self_attn.o_proj": (32, 32),
                      "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32),
                      "mlp.down_proj": (32, 64)}
    assert "lm_head" not in layers
    assert list(find_linear_layers(model, include="lm_head")) == ["lm_head"]
    mlp = find_linear_layers(model, include="*.mlp.*", exclude="re:down")
    assert list(mlp) == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")]
    assert list(find_linear_layers(model, include="re:layers\\.1\\..*q_proj")) == [
        "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_linear_weight_is_out_by_in_and_reproduces_forward(make):
    model, _ = make(seed=1)
    torch.manual_seed(0)
    for mod in find_linear_layers(model).values():
        w, _ = linear_weight(mod)
        x = torch.randn(5, w.shape[1])
        torch.testing.assert_close(mod(x), _dense_output(mod, x), rtol=1e-5, atol=1e-6)


def test_find_linear_layers_gpt2_conv1d():
    model, _ = tiny_gpt2()
    layers = find_linear_layers(model)
    assert list(layers) == [f"transformer.h.{i}.{s}" for i in range(2)
                            for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(type(m).__name__ == "Conv1D" for m in layers.values())
    shapes = [tuple(linear_weight(m)[0].shape) for m in layers.values()][:4]
    assert shapes == [(96, 32), (32, 32), (128, 32), (32, 128)]
    w, _ = linear_weight(layers["transformer.h.0.mlp.c_fc"])
    assert w.data_ptr() == layers["transformer.h.0.mlp.c_fc"].weight.data_ptr()  # a view


def test_linear_weight_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        linear_weight(nn.Conv2d(1, 1, 1))


def test_set_submodule():
    model, _ = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    new = nn.Linear(64, 32, bias=False)
    old = set_submodule(model, name, new)
    assert isinstance(old, nn.Linear) and model.get_submodule(name) is new
    assert find_linear_layers(model)[name] is new
    set_submodule(model, "model.layers.0", nn.Identity())
    assert isinstance(model.model.layers[0], nn.Identity)
    with pytest.raises(KeyError, match="no submodule"):
        set_submodule(model, "model.layers.1.mlp.nothing", new)


def test_missing_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Valid specs"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


def test_model_info_tiny():
    model, _ = tiny_llama()
    info = model_info(model)
    assert info["n_blocks"] == 2 and info["n_linear_layers"] == 14
    assert info["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["layer_shapes"]["mlp.down_proj"] == (32, 64)


@pytest.mark.slow
def test_load_default_smollm2():
    from kronlab.data import split_corpus
    from kronlab.evaluate import perplexity

    t0 = time.perf_counter()
    model, tok = load_model()
    assert time.perf_counter() - t0 < 300
    assert not model.training
    layers = find_linear_layers(model)
    assert len(layers) == 7 * 30
    blocks = {n.split(".")[2] for n in layers}
    assert len(blocks) == 30
    want = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
            "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
            "down_proj": (576, 1536)}
    for name, mod in layers.items():
        assert tuple(linear_weight(mod)[0].shape) == want[name.rsplit(".", 1)[1]], name
    info = model_info(model)
    assert "Q4_1" in info["quantisation"] and info["dtype"] == "float32"
    assert info["tied_embeddings"] and info["n_blocks"] == 30
    _, ev = split_corpus("sotu")
    res = perplexity(model, tok, ev, window=1024, max_tokens=2048, progress=False)
    assert res["n_windows"] == 2 and res["n_predicted"] == 2046
    assert 10 < res["perplexity"] < 80, res


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_block_input_cache_equals_full_forward(make):
    """Blocks 0..b-1 looked up: logits of a model changed in block b equal a full forward's."""
    model, _ = make(seed=3, n_layers=4)
    blocks = decoder_blocks(model)
    assert len(blocks) == 4
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 17), generator=gen), torch.randint(0, 256, (1, 9), generator=gen)]
    cache = BlockInputCache(model, blocks=[0, 2, 3])
    with torch.no_grad(), cache.record():
        dense = [model(input_ids=b, use_cache=False).logits for b in batches]
    assert cache.n_bytes > 0
    name = next(n for n in find_linear_layers(model) if ".2." in n)
    layer = model.get_submodule(name)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # change block 2 only
        full = [model(input_ids=b, use_cache=False).logits for b in batches]
        for b in (0, 2):
            with cache.skip(b):
                fast = [model(input_ids=x, use_cache=False).logits for x in batches]
            for f, g in zip(fast, full, strict=True):
                torch.testing.assert_close(f, g, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(full[0], dense[0])  # the change is seen
        # block 3's recorded input predates the change to block 2: looking it up is wrong,
        # which is why the cache is only for changes in blocks >= b
        with cache.skip(3):
            stale = model(input_ids=batches[0], use_cache=False).logits
        assert not torch.allclose(stale, full[0])
    originals = list(blocks)
    with pytest.raises(KeyError, match="record"), torch.no_grad(), cache.skip(2):
        model(input_ids=torch.randint(0, 256, (1, 5), generator=gen), use_cache=False)
    assert list(decoder_blocks(model)) == originals  # restored after the error
    with pytest.raises(ValueError, match="not recorded"), cache.skip(1):
        pass
    with pytest.raises(ValueError, match="out of range"):
        BlockInputCache(model, blocks=[4])

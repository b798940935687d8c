"""Layer streaming (one block materialized at a time) must compute exactly what the full model does."""
import torch

from squeezeflow.models import LayerStream, load_model
from squeezeflow.stats.hdiag import HDiag


def test_streamed_forward_equals_full_model(tiny_model):
    ids = torch.randint(0, 49152, (3, 40), generator=torch.Generator().manual_seed(0))
    full = load_model(tiny_model)(input_ids=ids, use_cache=False).logits
    stream = LayerStream(tiny_model)
    hidden = stream.run_blocks(stream.embed(ids), batch_size=2)
    streamed = stream.head(torch.cat(hidden))
    assert torch.allclose(full, streamed, atol=1e-5, rtol=1e-5)
    # Blocks go back to the meta device: nothing of the model stays resident.
    assert all(p.device.type == "meta" for p in stream.model.parameters())


def test_hdiag_matches_explicit_inputs(tiny_model):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    model = load_model(tiny_model)
    seen = {}
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    model(input_ids=ids, use_cache=False)
    stream = LayerStream(tiny_model)
    col = HDiag()
    hidden = stream.embed(ids)
    with stream.block(0) as layer, col.attach(layer):
        stream.forward_block(layer, hidden)
    h = col.result()["self_attn.q_proj"]
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    assert torch.allclose(h.double(), (x * x).mean(0), rtol=1e-5, atol=1e-8)
    assert set(col.result()) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}

"""The proxy model's task and training (measure.proxy): deterministic, loadable by the strict loader."""

import torch

from flux.pipeline import KontextEditor
from flux.tiny import build_pipeline
from measure import proxy

TINY = proxy.ProxyConfig(image_size=32, vae_steps=2, flow_steps=3, batch_size=4, pool_size=8)


def test_the_edit_recolours_only_the_named_shape():
    ex = proxy.make_examples(torch.Generator().manual_seed(0), 64, 32)
    assert ex.context.shape == ex.target.shape == (64, 3, 32, 32)
    assert ex.context.min() >= -1 and ex.context.max() <= 1
    palette = torch.tensor(list(proxy.COLORS.values())) * 2 - 1
    for i in range(64):
        changed = (ex.context[i] != ex.target[i]).any(0)
        color = palette[int(ex.prompt_index[i]) % len(proxy.COLORS)]
        # wherever the target changed, it has the instruction's colour
        assert torch.allclose(ex.target[i][:, changed].T, color.expand(int(changed.sum()), 3))
    assert len(set(proxy.PROMPTS)) == 8


def test_training_is_deterministic_and_writes_a_loadable_model(tmp_path):
    a = proxy.train_proxy(TINY, log=lambda _: None)
    b = proxy.train_proxy(TINY, log=lambda _: None)
    for name in ("transformer", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # training moved the weights away from the initialisation
    fresh = build_pipeline(TINY.model_config()).transformer.state_dict()
    assert not torch.equal(fresh["proj_out.weight"], a.transformer.state_dict()["proj_out.weight"])

    out = proxy.write_proxy(tmp_path / "proxy", TINY, log=lambda _: None)
    editor = KontextEditor.from_pretrained(out, device="cpu")
    txt, _ = editor.encode_prompt("make the square red")
    assert txt.shape[1] == TINY.text_tokens
    assert editor.components.vae.config.scaling_factor != 0.3611  # set from the trained latents

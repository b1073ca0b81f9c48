"""Mixing language-model adapters of different methods: live weighted sum == baked file == PEFT export."""

import copy

import torch

import studio.adapters as A
from builders import tiny_llama
from studio import formats


def _adapter(model, name, method, seed):
    torch.manual_seed(seed)
    A.attach(model, name, method, A.make_config(method, {} if method == "svf" else {"rank": 3}), ["lm-attn", "lm-mlp"])
    with torch.no_grad():
        for p in A.trainable_parameters(model, name):
            p.add_(0.2 * torch.randn_like(p))
    af = formats.from_models({"lm": model}, name)
    A.detach(model, name)
    return af


def test_weighted_mix_of_lm_adapters_matches_the_baked_file_and_its_peft_export(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = tiny_llama().eval()
    base = copy.deepcopy(model)
    lora, pissa, svf = _adapter(model, "a", "lora", 1), _adapter(model, "b", "pissa", 2), _adapter(model, "c", "svf", 3)
    mix = [(lora, 0.7, None), (pissa, -0.4, None), (svf, 0.5, None)]
    for index, (af, weight, _) in enumerate(mix):
        formats.attach_file(af, {"lm": model}, f"m{index}", weight)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        live = model(input_ids=ids).logits
        A.set_weight(model, "m1", 0.0)  # a slider moved: no re-attach
        assert (model(input_ids=ids).logits - live).abs().max() > 1e-3
        A.set_weight(model, "m1", -0.4)
        torch.testing.assert_close(model(input_ids=ids).logits, live, atol=1e-6, rtol=0)
    baked, summary = formats.bake(mix, models={"lm": model})
    assert baked.base == "lm" and summary["energy"] > 1 - 1e-9
    formats.save(baked, tmp_path / "peft", "peft")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, live, atol=1e-5, rtol=0)

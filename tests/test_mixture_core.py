"""Routed mixtures (MoLoRA, MoV, MoLA, LoRAMoE) against hand computations and the plain methods they mix."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import studio.adapters as A
from studio.adapters import loramoe, mixture, registry, training
from builders import TINY_LLAMA

LORA_EXPERTS = ["molora", "mola", "loramoe"]


def layer_pair():
    """A Linear and a 3x3 strided convolution, named so (IA)^3 / MoV adapt both sides."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(to_k=nn.Linear(12, 16), act=nn.Tanh(), down_proj=nn.Linear(16, 10)))


def conv_pair():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(to_k=nn.Conv2d(6, 8, 3, stride=2, padding=1), act=nn.Tanh(),
                                     down_proj=nn.Conv2d(8, 5, 3, padding=1)))


CASES = [(layer_pair, (5, 12)), (conv_pair, (2, 6, 9, 9))]


def randomise(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def x_for(shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("build,shape", CASES)
@pytest.mark.parametrize("method", LORA_EXPERTS)
def test_router_forced_one_hot_equals_that_expert_alone(build, shape, method):
    cfg = registry.make_config(method, {"experts": 3, "rank": 2, "alpha": 4.0, "top_k": 0} if method != "loramoe"
                               else {"experts": 3, "knowledge": 1, "rank": 2, "alpha": 4.0})
    for i in range(3):
        model, solo = build().eval(), build().eval()
        A.attach(model, "m", method, cfg, ["to_k", "down_proj"])
        randomise(model, "m")
        A.attach(solo, "l", "lora", A.lora.Config(rank=2, alpha=4.0), ["to_k", "down_proj"])
        with torch.no_grad():
            for path, layer in A.targets.adapted_layers(model).items():
                a = layer.adapters["m"]
                a.R.zero_()
                a.c.copy_(torch.full((3,), -1e4))
                a.c[i] = 1e4                                       # softmax: exactly one-hot in fp32
                lone = solo.get_submodule(path).adapters["l"]
                lone.A.copy_(a.A[i].reshape(lone.A.shape))
                lone.B.copy_(a.B[i])
            torch.testing.assert_close(model(x_for(shape)), solo(x_for(shape)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("build,shape", CASES)
def test_constant_router_equals_the_static_weighted_mix(build, shape):
    model, static = build().eval(), build().eval()
    A.attach(model, "m", "molora", A.molora.Config(experts=3, rank=2), ["to_k", "down_proj"])
    randomise(model, "m")
    c = torch.tensor([0.3, -1.0, 0.8])
    gates = c.softmax(0)
    for i in range(3):
        A.attach(static, f"e{i}", "lora", A.lora.Config(rank=2), ["to_k", "down_proj"])
        A.set_weight(static, f"e{i}", gates[i].item() * 0.7)
    A.set_weight(model, "m", 0.7)
    with torch.no_grad():
        for path, layer in A.targets.adapted_layers(model).items():
            a = layer.adapters["m"]
            a.R.zero_()
            a.c.copy_(c)
            for i in range(3):
                e = static.get_submodule(path).adapters[f"e{i}"]
                e.A.copy_(a.A[i].reshape(e.A.shape))
                e.B.copy_(a.B[i])
        torch.testing.assert_close(model(x_for(shape)), static(x_for(shape)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("build,shape", CASES)
def test_mov_with_one_expert_is_ia3(build, shape):
    model, ia3 = build().eval(), build().eval()
    A.attach(model, "m", "mov", A.mov.Config(experts=1), ["to_k", "down_proj"])
    A.attach(ia3, "i", "ia3", A.ia3.Config(), ["to_k", "down_proj"])
    randomise(model, "m")
    with torch.no_grad():
        for path, layer in A.targets.adapted_layers(model).items():
            ia3.get_submodule(path).adapters["i"].l.copy_(layer.adapters["m"].L[0])
        torch.testing.assert_close(model(x_for(shape)), ia3(x_for(shape)), atol=1e-6, rtol=1e-5)


def test_mov_routes_per_token_between_vector_experts():
    """Two experts, the router picking by the sign of one input feature: each token gets its own vector."""
    model = layer_pair().eval()
    A.attach(model, "m", "mov", A.mov.Config(experts=2), ["to_k"])
    a = model.to_k.adapters["m"]
    x = x_for((6, 12))
    with torch.no_grad():
        a.L.copy_(torch.stack([torch.full((16,), 2.0), torch.full((16,), 0.5)]))
        a.R.zero_()
        a.R[0, 0], a.R[1, 0] = 1e4, -1e4
        a.c.zero_()
        want = torch.where(x[:, :1] > 0, 2.0, 0.5) * model.to_k.base(x)
        torch.testing.assert_close(model.to_k(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_uses_exactly_k_experts_per_token(k):
    model = layer_pair().eval()
    A.attach(model, "m", "mola", A.mola.Config(experts=5, top_k=k, rank=2), ["to_k"])
    randomise(model, "m")
    a = model.to_k.adapters["m"]
    x = x_for((40, 12))
    logits = x @ a.R.detach().T + a.c.detach()
    gates = mixture.route(logits, k, -1, None, False)
    assert ((gates > 0).sum(-1) == k).all()
    probs = logits.softmax(-1)
    if k > 1:  # the k kept, renormalised (MoLA)
        torch.testing.assert_close(gates.sum(-1), torch.ones(40))
    else:  # top-1 gates by the raw probability (Switch Transformer), so the router gets a gradient
        torch.testing.assert_close(gates.sum(-1), probs.max(-1).values)
    # the layer output is the sum over exactly those experts, each with its gate
    with torch.no_grad():
        got = model.to_k(x) - model.to_k.base(x)
        want = sum(gates[:, i:i + 1] * (x @ a.A[i].T @ a.B[i].T) * a.s[i] for i in range(5))  # s: one scale per expert
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_switch_balance_loss_on_a_hand_computed_case():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(2, 1).indices, True)
    # top-2 per token: {0,1}, {1,2}, {0,2}, {1,2} -> counts 2, 3, 3 of 8 assignments
    f = torch.tensor([2 / 8, 3 / 8, 3 / 8])
    P = torch.tensor([1.5 / 4, 1.2 / 4, 1.3 / 4])
    want = 3 * (f * P).sum()                       # = 3 * (0.75 + 1.35 + 1.4... ) / 32
    assert abs(want.item() - 3 * (2 * 1.5 + 3 * 1.2 + 3 * 1.3) / 32) < 1e-7
    torch.testing.assert_close(mixture.switch_balance(probs, mask), want)
    assert abs(mixture.switch_balance(torch.full((4, 3), 1 / 3), None).item() - 1.0) < 1e-6  # balanced: 1


def test_localized_balance_loss_on_a_hand_computed_case():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.3, 0.6]])
    # I = (0.6, 0.55, 0.85); Q = (0.9, 1.1, 1.1) with one knowledge expert, delta 0.1
    Z = torch.tensor([0.54, 0.605, 0.935])
    want = ((Z - Z.mean()) ** 2).mean() / Z.mean()
    torch.testing.assert_close(loramoe.localized_balance(probs, 1, 0.1), want)


def test_aux_loss_comes_from_the_last_training_forward_and_reaches_the_router():
    model = layer_pair().train()
    A.attach(model, "m", "mola", A.mola.Config(experts=4, top_k=2, rank=2, balance=0.5), ["to_k", "down_proj"])
    model(x_for((8, 12)))
    loss = training.aux_loss([model], "m")
    layers = list(A.targets.adapted_layers(model).values())
    want = 0.5 * torch.stack([mixture.switch_balance(l.adapters["m"].scratch["probs"], l.adapters["m"].scratch["mask"])
                              for l in layers]).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(l.adapters["m"].R.grad.abs().sum() > 0 for l in layers)


def test_mola_profiles_set_the_experts_of_each_quarter_of_the_depth():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 8}))
    for profile, quarters in mixture.PROFILES.items():
        name = f"m_{profile}"
        A.attach(model, name, "mola", A.mola.Config(profile=profile, rank=2), "lm-attn")
        for path, layer in A.targets.layers_of(model, name).items():
            depth = int(path.split("layers.")[1].split(".")[0])
            assert layer.adapters[name].A.shape[0] == quarters[depth // 2], (profile, path)
        A.detach(model, name)
    counts = (1, 2, 3, 4, 5, 6, 7, 8)
    A.attach(model, "explicit", "mola", A.mola.Config(counts=counts, top_k=1, rank=2), "lm-attn")
    for path, layer in A.targets.layers_of(model, "explicit").items():
        assert layer.adapters["explicit"].R.shape[0] == counts[int(path.split("layers.")[1].split(".")[0])]
    # the resolved counts reload from the adapter's config and state dict alone
    conf, sd = A.adapter_config(model, "explicit"), A.adapter_state_dict(model, "explicit")
    fresh = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 8}))
    A.load_adapter(fresh, "again", conf["method"], conf["config"], sd)
    assert A.adapter_state_dict(fresh, "again").keys() == sd.keys()


def test_bad_mixture_options_are_one_line_errors():
    with pytest.raises(A.StudioError, match="top-k 3 is larger than the 2 experts"):
        A.mola.Config(experts=2, top_k=3)
    with pytest.raises(A.StudioError, match="top-k 3 is larger than the 2 experts"):
        A.mola.Config(profile="inverted", top_k=3)
    with pytest.raises(A.StudioError, match="unknown expert profile 'diamond'"):
        A.mola.Config(profile="diamond")
    model = layer_pair()
    with pytest.raises(A.StudioError, match=r"expert counts \[2, 4, 6\] give 3 blocks but the targets have 1"):
        A.attach(model, "m", "mola", A.mola.Config(counts=(2, 4, 6), top_k=1), ["to_k", "down_proj"])
    assert A.adapter_names(model) == []
    with pytest.raises(A.StudioError, match="knowledge 4 must leave experts in both groups"):
        A.loramoe.Config(experts=4, knowledge=4)


def test_mean_gate_is_recorded_for_the_heat_map():
    model = layer_pair().eval()
    A.attach(model, "m", "molora", A.molora.Config(experts=3), ["to_k"])
    with torch.no_grad():
        model(x_for((7, 12)))
    a = model.to_k.adapters["m"]
    gate = a.scratch["mean_gate"]
    torch.testing.assert_close(gate, (x_for((7, 12)) @ a.R.T + a.c).softmax(-1).mean(0).detach())
    assert "probs" not in a.scratch  # eval forwards keep no graph


@pytest.mark.parametrize("method", ["molora", "mola", "loramoe", "mov"])
@pytest.mark.parametrize("build", [layer_pair, conv_pair])
def test_routers_and_experts_come_from_the_init_generator_alone(method, build):
    """init(cfg, W0, site, generator): the same seed gives the same routers and experts whatever the global RNG
    holds, the global RNG is left as it was, and another seed gives other routers."""
    from studio.adapters.layer import AdaptedLayer

    options = {"experts": 4} if method == "mov" else {"experts": 4, "rank": 2}
    cfg, module = registry.make_config(method, options), registry.get(method)
    layers = [AdaptedLayer(m, p) for p, m in build().named_children() if p != "act"]

    def init_all(seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        return [module.init(cfg, layer.pristine_weight, layer.site, g) for layer in layers]

    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = init_all(7)
    assert torch.equal(torch.get_rng_state(), before)                 # no draw from the global generator
    torch.manual_seed(12345)
    torch.rand(100)                                                    # the global generator elsewhere
    again, other = init_all(7), init_all(8)
    for a, b, c in zip(first, again, other):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["R"], c["R"])                        # the seed decides the routers
        assert a["R"].abs().max() > 0 and torch.equal(a["c"], torch.zeros_like(a["c"]))


def test_a_top_1_router_learns():
    """With one expert kept per token the gate is that expert's probability, not 1: the router's R and c
    get a gradient (renormalised, top-1 would leave a --mixture-of router untrained)."""
    model = layer_pair().train()
    A.attach(model, "m", "mola", A.mola.Config(experts=4, top_k=1, rank=2), ["to_k"])
    randomise(model, "m")
    a = model.to_k.adapters["m"]
    (model.to_k(x_for((16, 12))) ** 2).sum().backward()
    assert a.R.grad is not None and a.R.grad.abs().max() > 0 and a.c.grad.abs().max() > 0

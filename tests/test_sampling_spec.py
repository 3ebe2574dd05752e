"""``ddm.sampling_spec``: one vocabulary of routing labels, validation, and the spec pinning the sampler's output."""
from __future__ import annotations

import pytest
import torch

from ddm.sampler import routing_weights, sample
from ddm.sampling_spec import Routing, SamplingSpec
from ddm.flow import euler_schedule, euler_step

F64 = torch.float64


@pytest.mark.parametrize("label, strategy, k", [("top1", "top1", 1), ("top2", "topk", 2), ("top5", "topk", 5),
                                                ("full", "full", 1), ("threshold", "threshold", 1),
                                                ("oracle", "oracle", 1)])
def test_every_label_round_trips(label, strategy, k):
    routing = Routing.parse(label)
    assert (routing.strategy, routing.k) == (strategy, k)
    assert routing.label == label and Routing.parse(routing.label) == routing


def test_bad_labels_and_values_are_refused_clearly():
    for bad in ("best", "top0", "top", "Top1", ""):
        with pytest.raises(ValueError, match="unknown routing strategy"):
            Routing.parse(bad)
    with pytest.raises(ValueError, match="keeps 2 experts but k=3"):
        Routing.parse("top2", k=3)
    assert Routing.parse("topk", k=3) == Routing("topk", k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        Routing("topk", k=0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        Routing("threshold", threshold=1.5)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        SamplingSpec(num_steps=0)
    with pytest.raises(ValueError, match="placement must be one of"):
        SamplingSpec(placement="everywhere")
    assert SamplingSpec("full").routing == Routing("full")  # a label is accepted for the routing
    assert Routing("full").with_prior([0.1, -0.1]).prior_correction == (0.1, -0.1)
    assert Routing("full", prior_correction=(1.0, 0.0)).with_prior([0.1, -0.1]).prior_correction == (1.0, 0.0)


def test_a_spec_pins_the_sampler_to_a_hand_written_euler_loop():
    """Two linear experts and a linear router, top-2 of 3 with CFG 2 and a prior correction: ``sample`` with the
    spec equals an independent float64 loop written from the definitions (weights, guidance, Euler)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(4, 4, generator=gen, dtype=F64) * 0.3 for _ in range(3)]
    experts = [lambda x, t, c, m=m: x @ m + c["clip"] * t[:, None] for m in mats]
    router_w = torch.randn(4, 3, generator=gen, dtype=F64)

    def router(x, t, c):
        return x @ router_w + t[:, None]

    cond, uncond = {"clip": torch.randn(2, 4, generator=gen, dtype=F64)}, {"clip": torch.zeros(2, 4, dtype=F64)}
    prior = (0.2, -0.1, 0.0)
    spec = SamplingSpec(Routing.parse("top2", prior_correction=prior), num_steps=4, cfg_scale=2.0)
    noise = torch.randn(2, 4, generator=gen, dtype=F64)
    got = sample(experts, router, noise, cond, spec, uncond=uncond, shift_alpha=1.5)

    x, times = noise.clone(), euler_schedule(4, 1.5).to(F64)
    for i in range(4):
        t = times[i].expand(2)
        w = routing_weights(router(x, t, cond) + torch.tensor(prior, dtype=F64), "topk", 3, k=2)
        v = sum(w[:, j:j + 1] * (experts[j](x, t, uncond) + 2.0 * (experts[j](x, t, cond) - experts[j](x, t, uncond)))
                for j in range(3))
        x = euler_step(x, v, times[i], times[i + 1])
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_fields_left_empty_take_the_callers_defaults(tmp_path, tiny_text_dir):
    """A spec that only sets the steps samples with the pipeline's default top-2 routing (not top-1), and the
    bare sampler's default is top-1."""
    from ddm.pipeline import DDMPipeline
    from tests.fixtures.pipeline import build_model_folder

    build_model_folder(tmp_path / "m", tiny_text_dir, num_experts=3)
    pipe = DDMPipeline.from_pretrained(tmp_path / "m")
    steps_only = pipe.generate(["a red car"], SamplingSpec(num_steps=2), seeds=[0], trace=True, progress=False)
    top2 = pipe.generate(["a red car"], SamplingSpec(Routing.parse("top2"), num_steps=2), seeds=[0], trace=True,
                         progress=False)
    assert torch.equal(steps_only.latents, top2.latents)
    assert ((steps_only.traces.weights > 0).sum(-1) == 2).all()
    assert steps_only.settings["strategy"] == "topk" and steps_only.settings["k"] == 2

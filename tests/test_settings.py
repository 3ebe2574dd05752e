"""The typed training settings (train.settings): built once from the real composed configs, read by the modules,
round-tripped through the checkpoint's plain-dict hyper-parameters, and strict about unknown keys."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from train.expert_module import ExpertModule
from train.router_module import RouterModule
from train.settings import ExpertSettings, FlowSettings, OptimSettings, RouterSettings
from tests.fixtures.train import compose_config


@pytest.fixture()
def expert_cfg(tiny_overrides):
    return compose_config("expert", [*tiny_overrides, "expert=1",
                                     "optim.schedule=cosine", "flow.shift=2.5", "strategy=deepspeed_zero2"])


def test_expert_settings_carry_every_config_value(expert_cfg):
    s = ExpertSettings.from_config(expert_cfg, max_steps=17)
    optim = OmegaConf.to_container(expert_cfg.optim, resolve=True)
    assert s.optim.lr == optim["lr"] and list(s.optim.betas) == optim["betas"] and s.optim.schedule == "cosine"
    assert s.optim.ema_decay == optim["ema_decay"] and s.optim.grad_clip == optim["grad_clip"]
    assert s.flow.shift == 2.5 and s.flow.text_dropout_t5 == expert_cfg.flow.text_dropout_t5
    assert s.max_steps == 17 and s.max_nonfinite_steps == expert_cfg.trainer.max_nonfinite_steps
    assert s.grad_clip_in_module is False  # deepspeed clips itself
    assert dict(s.conditioning) == OmegaConf.to_container(expert_cfg.conditioning, resolve=True)
    back = ExpertSettings.from_dict(s.to_dict())
    assert back == s and isinstance(back.optim, OptimSettings) and isinstance(back.flow, FlowSettings)


def test_the_modules_read_the_typed_settings_and_store_plain_dicts(expert_cfg):
    s = ExpertSettings.from_config(expert_cfg, max_steps=5)
    module = ExpertModule(_tiny_expert_dict(), s, torch.zeros(1, 4), torch.zeros(4), {})
    assert module.settings is s and module.settings.max_steps == 5
    assert module.hparams["train"] == s.to_dict() and isinstance(module.hparams["train"]["optim"]["betas"], list)
    # a checkpoint's dict is read back into the same settings
    assert ExpertModule(_tiny_expert_dict(), module.hparams["train"], torch.zeros(1, 4), torch.zeros(4), {}).settings == s
    r = RouterSettings(optim=s.optim, flow=s.flow, max_steps=3, expert_patch_size=[1, 2, 2], expert_ids=[1, 3])
    router = RouterModule(_tiny_router_dict(), r.to_dict(), {})
    assert router.settings == r and router.flow_patch_size() == (1, 2, 2) and router.settings.expert_ids == (1, 3)


def test_unknown_keys_are_named(expert_cfg):
    with open_dict(expert_cfg):
        expert_cfg.optim.learning_rate = 1e-3  # a typo of lr: refused, not ignored
    with pytest.raises(ValueError, match=r"optim has unknown keys \['learning_rate'\]"):
        ExpertSettings.from_config(expert_cfg, max_steps=1)
    good = ExpertSettings(optim=OptimSettings(lr=1.0), flow=FlowSettings(), max_steps=1).to_dict()
    with pytest.raises(ValueError, match=r"ExpertSettings has unknown keys \['label_smoothing'\]"):
        ExpertSettings.from_dict({**good, "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="schedule must be constant or cosine"):
        OptimSettings(lr=1.0, schedule="linear")
    with pytest.raises(ValueError):
        FlowSettings(prediction="score")


def _tiny_expert_dict() -> dict:
    from ddm.models.presets import get_expert_config

    return get_expert_config("tiny").to_dict()


def _tiny_router_dict() -> dict:
    from ddm.models.router import get_router_config

    return get_router_config("tiny").to_dict()


def test_adaln_zero_init_starts_every_block_as_the_identity_and_the_sharded_replay_agrees(expert_cfg):
    """``model.init=adaln_zero`` (DiT's adaLN-Zero): modulation and final layer zeroed, so the velocity is 0 at
    init whatever the input; the FSDP2 path (meta build, then train.sharding.replay_init_) draws the same weights."""
    from train.sharding import replay_init_

    with open_dict(expert_cfg):
        expert_cfg.model.init = "adaln_zero"
    s = ExpertSettings.from_config(expert_cfg, max_steps=1)
    assert s.init == "adaln_zero" and ExpertSettings.from_dict(s.to_dict()) == s
    cfg = _tiny_expert_dict()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg["latent_channels"], 2, 4, 4, generator=g)
    cond = {"t5": torch.randn(2, 5, cfg["context_in_dim"], generator=g), "clip": torch.randn(2, cfg["vec_in_dim"], generator=g)}
    outputs = {}
    for init in ("torch", "adaln_zero"):
        module = ExpertModule(cfg, ExpertSettings.from_dict({**s.to_dict(), "init": init}), torch.zeros(1, 4),
                              torch.zeros(4), {})
        torch.manual_seed(0)
        module.configure_model()
        with torch.no_grad():
            outputs[init] = module.model(x, torch.rand(2, generator=g), cond)
        zeroed = module.model.adaln_zero_modules()
        assert len(zeroed) == 2 * cfg["depth"] + cfg["depth_single_blocks"] + 2
        for name in zeroed:
            params = list(module.model.get_submodule(name).parameters())
            assert all((p == 0).all() for p in params) == (init == "adaln_zero"), (init, name)
        # the sharded build's rule: build on meta, materialise, replay the constructor's draws + the zeroed modules
        single = module.model.state_dict()
        with torch.device("meta"):
            meta = module.build_network()
        meta.to_empty(device="cpu")
        module.model = meta
        torch.manual_seed(0)
        replay_init_(meta, "cpu", module.zero_init_modules())
        for key, value in meta.state_dict().items():
            assert torch.equal(value, single[key]), (init, key)
    assert torch.count_nonzero(outputs["adaln_zero"]) == 0 and outputs["torch"].abs().mean() > 1e-3
    with pytest.raises(ValueError, match="model.init must be one of"):
        ExpertSettings.from_dict({**s.to_dict(), "init": "xavier"})

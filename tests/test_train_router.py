"""``python -m train.router``: the router learns P(expert | x_t, t), checked against the closed form."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.analytic import GaussianMixture
from ddm.export_files import build_model_from_export, read_export_metadata
from tests.fixtures.train import compose_config, run_cli, start_cli
from tests.test_train_expert import wait_for

LATENT = (4, 1, 2, 2)  # (C, T, H, W): 16 numbers per sample


def gmm_dataset() -> GaussianMixture:
    """K = 3 isotropic components in 16 dims with unequal priors. Component k shifts latent channel k
    everywhere (like clusters of data that differ in a global colour); separated enough that the
    posterior goes from confident (small t) to the prior (t near 1) across [0.1, 0.9]."""
    means = torch.zeros(3, *LATENT, dtype=torch.float64)
    for k in range(3):
        means[k, k] = 0.8
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means.reshape(3, -1),
                           torch.full((3, int(np.prod(LATENT))), 0.25, dtype=torch.float64))


def write_gmm_shards(root: Path, gmm: GaussianMixture, n: int, per_shard: int = 50) -> None:
    """Shards in the real format whose latents are mixture samples labelled by their component."""
    from ddm.shards import encode_sample, shard_relpath, write_index, write_shard

    x, comp = gmm.sample(n, generator=torch.Generator().manual_seed(1), return_components=True)
    rows, by_expert = [], {}
    for i, (xi, k) in enumerate(zip(x.numpy(), comp.tolist())):
        by_expert.setdefault(k + 1, []).append((f"gmm{i:05d}", xi.reshape(LATENT)))
    for expert, items in by_expert.items():
        for index in range(0, len(items), per_shard):
            rel = shard_relpath(expert, "train", index // per_shard)
            samples = []
            for pos, (key, lat) in enumerate(items[index:index + per_shard]):
                meta = {"key": key, "expert": expert, "split": "train", "caption": "", "fps": 1.0,
                        "num_frames": 1, "height": 4, "width": 4, "source": "gmm"}
                samples.append(encode_sample(key, latent=lat, t5=np.zeros((1, 32)), clip=np.zeros(32), meta=meta))
                rows.append({"key": key, "expert": expert, "split": "train", "shard": rel, "position": pos})
            write_shard(root / rel, samples)
    write_index(root, rows)


@pytest.mark.slow
def test_router_matches_the_closed_form_posterior(tmp_path):
    """Trained on mixture samples, the router's P(k | x_t, t) matches the exact posterior (MAE ≤ 0.05 over
    t in [0.1, 0.9]) and its accuracy at each t follows the Bayes accuracy."""
    from train.router import train_router

    gmm = gmm_dataset()
    shards = tmp_path / "gmm_shards"
    write_gmm_shards(shards, gmm, 10000)
    cfg = compose_config("router", [
        "experiment=tiny", f"paths.root_dir={tmp_path}", f"data.shards_dir={shards}",
        # the text-blind router at the experts' logit-normal times (the tiny recipe's router reads text)
        "use_text=false", "use_t5=false", "recipe.router.logit_mean=0.0", "recipe.router.logit_std=1.0",
        "+router_model.overrides.latent_channels=4", "+router_model.overrides.patch_size=[1,2,2]",
        "recipe.router.max_steps=1200", "recipe.router.batch_size=64", "recipe.router.lr=2e-3",
        "optim.schedule=cosine", "recipe.router.val_every_n_steps=100000", "checkpoint.every_n_steps=100000",
        "optim.ema_decay=0.995",
        # the stage geometry the mixture shards record (1 frame of 4x4 px, latents 2x2)
        "recipe.stage2.resolution=4", "recipe.stage2.num_frames=1", "recipe.stage2.fps=1",
        "vae.spatial_factor=2",  # the latents are 2x2 of 4x4 px: the pixel VAE compresses 2x in space
    ])
    train_router(cfg)
    router = build_model_from_export(Path(cfg.run_dir) / "export").eval()

    g = torch.Generator().manual_seed(2)
    maes = []
    for t_value in np.linspace(0.1, 0.9, 9):
        x0, comp = gmm.sample(3000, generator=g, return_components=True)
        t = torch.full((x0.shape[0],), float(t_value), dtype=torch.float64)
        xt = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        exact = gmm.posterior(xt, t)
        with torch.no_grad():
            probs = router(xt.float().reshape(-1, *LATENT), t.float(), {}).softmax(-1).double()
        maes.append(float((probs - exact).abs().mean()))
        router_acc = float((probs.argmax(1) == comp).double().mean())
        bayes_acc = float((exact.argmax(1) == comp).double().mean())
        assert abs(router_acc - bayes_acc) < 0.04, (t_value, router_acc, bayes_acc)
    assert np.mean(maes) <= 0.05, maes


def router_args(tmp_path: Path, shards: Path, text_dir: Path) -> list[str]:
    return ["experiment=tiny", f"paths.root_dir={tmp_path}", f"data.shards_dir={shards}", f"text.folder={text_dir}",
            "trainer.log_every_n_steps=1", "recipe.router.batch_size=8", "recipe.router.max_steps=12",
            "recipe.router.val_every_n_steps=6", "checkpoint.every_n_steps=4"]


@pytest.mark.slow
def test_router_cli_resumes_after_a_kill_and_exports(tmp_path, test_shards_dir, tiny_text_dir):
    # this run reads both kinds of text: the caption's T5 tokens (the tiny recipe's use_t5) and pooled CLIP
    args = [*router_args(tmp_path, test_shards_dir, tiny_text_dir), "use_text=true"]
    run = tmp_path / "runs" / "tiny" / "router" / "stage2"
    proc = start_cli("train.router", args, tmp_path / "first.log")
    wait_for(run / "checkpoints" / "step-00000004.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the run may have written more checkpoints between the poll and the kill: it resumes from the newest
    newest = sorted((run / "checkpoints").glob("step-*.ckpt"))[-1].name
    second = run_cli("train.router", args)
    assert "mode=resume" in second.stdout and newest in second.stdout

    meta = read_export_metadata(run / "export")
    assert meta["kind"] == "router" and meta["num_experts"] == 3 and meta["step"] == 12
    assert meta["t_scale"] == 1000.0 and meta["prior_correction"] == [0.0, 0.0, 0.0]
    assert meta["latent_geometry"]["channels"] == meta["config"]["latent_channels"]
    assert sorted(meta["expert_counts"]) == ["1", "2", "3"]
    router = build_model_from_export(run / "export")  # strict load into a fresh router
    assert type(router).__name__ == "Router"
    from ddm.models.presets import get_expert_config

    tiny = get_expert_config("tiny")
    assert (router.cfg.text_dim, router.cfg.t5_dim) == (tiny.vec_in_dim, tiny.context_in_dim) and meta["uses_text"]
    assert (run / "plots" / "router_calibration.png").stat().st_size > 0
    assert "accuracy" in (run / "plots" / "router_calibration.json").read_text()


@pytest.mark.slow
def test_router_on_raw_frames_with_a_weighted_vae_resumes(tmp_path, make_shards):
    """Raw-frame shards encoded during training by a VAE with weights (hunyuan-tiny): the frozen VAE stays
    out of the checkpoint, and the run resumes from it (a strict load that must not miss the vae.* keys)."""
    from train.router import train_router

    shards, _ = make_shards({(k, split): [6] for k in (1, 2, 3) for split in ("train", "val")}, raw_frames=True)
    args = ["experiment=tiny", f"paths.root_dir={tmp_path}", f"data.shards_dir={shards}", "data.raw_frames=true",
            # the fixture's clips: 5 frames of 4x4 px at 8 fps; a tiny HunyuanVideo VAE compressing 2x in
            # space turns them into 16-channel latents of 2 frames x 2x2, one patch per latent frame
            "vae=hunyuan_tiny", "+vae.config={spatial_compression: 2}",
            "recipe.stage2.resolution=4", "recipe.stage2.num_frames=5", "recipe.stage2.fps=8",
            "router_model.preset=tiny", "+router_model.overrides.patch_size=[1,2,2]", "use_text=false", "use_t5=false",
            "recipe.router.batch_size=4", "recipe.router.val_every_n_steps=100", "checkpoint.every_n_steps=2"]
    run = tmp_path / "runs" / "tiny" / "router" / "stage2"
    assert train_router(compose_config("router", [*args, "recipe.router.max_steps=2"])) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert not [k for k in ckpt["state_dict"] if k.startswith("vae.")]  # frozen: not saved
    assert [k for k in ckpt["state_dict"] if k.startswith("model.")]

    assert train_router(compose_config("router", [*args, "recipe.router.max_steps=4"])) == 0
    assert "mode=resume" in (run / "logs" / "router.log").read_text()
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 4
    assert not [k for k in final["state_dict"] if k.startswith("vae.")]
    assert read_export_metadata(run / "export")["step"] == 4


@pytest.mark.slow
def test_router_job_never_loads_an_expert(tmp_path, test_shards_dir, tiny_text_dir):
    """The router process imports no expert model code and reads no expert weights."""
    args = router_args(tmp_path, test_shards_dir, tiny_text_dir) + ["recipe.router.max_steps=2",
                                                                    "recipe.router.val_every_n_steps=100"]
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['train.router', *{args!r}]\n"
        "import safetensors.torch as st\n"
        "opened = []\n"
        "_load = st.load_file\n"
        "st.load_file = lambda p, *a, **k: (opened.append(str(p)), _load(p, *a, **k))[1]\n"
        "runpy.run_module('train.router', run_name='__main__')\n"
        "assert 'ddm.models.mmdit' not in sys.modules, 'the router job imported the expert model'\n"
        "assert not [p for p in opened if 'expert' in p], opened\n"
        "print('ROUTER-ISOLATED')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ROUTER-ISOLATED" in proc.stdout, proc.stderr[-3000:]


def test_router_with_the_wrong_number_of_experts_or_geometry_is_a_clear_error(tmp_path, test_shards_dir, tiny_text_dir):
    from train.router import train_router

    args = router_args(tmp_path, test_shards_dir, tiny_text_dir)
    with pytest.raises(ValueError, match="router predicts 4 experts but .* holds 3 expert shard folders"):
        train_router(compose_config("router", [*args, "+router_model.overrides.num_experts=4"]))
    with pytest.raises(ValueError, match="num_experts=4 but .* holds 3"):
        train_router(compose_config("router", [*args, "num_experts=4"]))
    with pytest.raises(ValueError, match=r"recipe\.stage2\.num_frames=17 but the shards hold num_frames=9"):
        train_router(compose_config("router", [*args, "recipe.stage2.num_frames=17"]))


def test_balanced_sampling_stores_the_log_prior_correction():
    from train.router import prior_correction

    counts = {1: 50, 2: 30, 3: 20}
    corr = prior_correction(counts, balanced=True)
    # softmax(logits_balanced + corr) must equal the natural-frequency posterior: corr = log π − log(1/K)
    assert np.allclose(corr, np.log([0.5, 0.3, 0.2]) - np.log(1 / 3))
    assert prior_correction(counts, balanced=False) == [0.0, 0.0, 0.0]

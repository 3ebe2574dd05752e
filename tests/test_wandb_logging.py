"""wandb naming and media (offline: nothing here touches the network).

Each job's wandb run is grouped by experiment, typed by stage and named ``<role>-<stage>``; files a job writes
(the router's calibration plot, periodic sample videos) reach wandb as media through ``train.run.log_media``,
which does nothing without a wandb logger."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from tests.fixtures.train import compose_config, run_cli
from train.run import build_loggers, log_media, role_name


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb strictly offline, its settings and cache inside this test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _cfg(tmp_path: Path, config: str, *overrides: str):
    # the tiny experiment switches wandb off (logger=csv): switch it back on for these tests
    return compose_config(config, ["experiment=tiny", "logger=wandb", f"paths.root_dir={tmp_path}",
                                   "experiment_name=exp42", *overrides])


@pytest.mark.parametrize("config,overrides,role,stage", [
    ("expert", ["expert=2", "stage=stage3"], "expert2", "stage3"),
    ("expert", ["expert=all"], "monolith", "stage2"),
    ("router", [], "router", "stage2"),
])
def test_wandb_run_is_grouped_by_experiment_typed_by_stage_and_named_by_role(tmp_path, offline, config, overrides,
                                                                            role, stage):
    cfg = _cfg(tmp_path, config, *overrides)
    # the role the jobs pass: expert.py role_name(expert), router.py "router"; it matches the run dir's folder
    job_role = "router" if config == "router" else role_name(cfg.expert)
    assert job_role == role == Path(cfg.run_dir).parent.name
    loggers = build_loggers(cfg, Path(cfg.run_dir), job_role)
    assert isinstance(loggers[0], CSVLogger)
    (wandb,) = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    init = wandb._wandb_init
    assert (init["group"], init["job_type"], init["name"]) == ("exp42", stage, f"{role}-{stage}")
    assert init["project"] == cfg.logger.project and init["dir"] == str(cfg.run_dir)
    assert init["id"] == (Path(cfg.run_dir) / "wandb_id").read_text().strip()  # a requeue continues the run


def test_wandb_off_builds_no_wandb_logger_and_log_media_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = _cfg(tmp_path, "router")
    loggers = build_loggers(cfg, Path(cfg.run_dir), "router")
    assert [type(lg) for lg in loggers] == [CSVLogger]
    png = tmp_path / "plot.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    assert log_media(loggers, "val/plot", [png], step=3) is False
    assert not (Path(cfg.run_dir) / "wandb").exists()


def test_log_media_writes_images_and_videos_into_the_offline_wandb_run(tmp_path, offline):
    from ddm.video_io import write_gif

    cfg = _cfg(tmp_path, "router")
    run_dir = Path(cfg.run_dir)
    loggers = build_loggers(cfg, run_dir, "router")
    png = tmp_path / "router_calibration.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png)
    gif = write_gif(tmp_path / "sample.gif", np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), np.uint8), 8.0)
    try:
        assert log_media(loggers, "val/router_calibration", [png], step=3) is True
        assert log_media(loggers, "samples", [gif], step=3, kind="video", captions=["a red circle"]) is True
        with pytest.raises(ValueError, match="kind"):
            log_media(loggers, "x", [png], step=3, kind="audio")
    finally:
        import wandb

        wandb.finish()
    (run,) = run_dir.glob("wandb/offline-run-*")  # the run lives in the job's run dir
    media = run / "files" / "media"
    assert len(list(media.glob("images/val/router_calibration_*.png"))) == 1, sorted(media.rglob("*"))
    assert len(list(media.glob("videos/samples_*.gif"))) == 1, sorted(media.rglob("*"))


def _offline_env(tmp_path: Path) -> dict[str, str]:
    home = str(tmp_path / "wandb_home")
    return {"WANDB_MODE": "offline", "WANDB_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_CONFIG_DIR": home,
            "WANDB_DATA_DIR": home, "WANDB_API_KEY": ""}


@pytest.mark.slow
def test_training_jobs_send_their_plot_and_sample_videos_to_wandb(tmp_path, tiny_overrides):
    """The real CLIs with logger=wandb (offline): the router's calibration plot and the expert's periodic
    sample gifs land in each job's own wandb run, inside its run dir."""
    common = [*tiny_overrides, "logger=wandb", "checkpoint.every_n_steps=100"]
    run_cli("train.router", [*common, "recipe.router.batch_size=8", "recipe.router.max_steps=2",
                             "recipe.router.val_every_n_steps=2"], env=_offline_env(tmp_path))
    run_cli("train.expert", [*common, "expert=1", "recipe.stage2.max_steps=2", "trainer.sample_every_n_steps=2"],
            env=_offline_env(tmp_path))
    runs = tmp_path / "runs" / "tiny"
    (router_run,) = (runs / "router" / "stage2").glob("wandb/offline-run-*")
    assert list(router_run.glob("files/media/images/val/router_calibration_*.png"))
    (expert_run,) = (runs / "expert1" / "stage2").glob("wandb/offline-run-*")
    assert len(list(expert_run.glob("files/media/videos/samples_*.gif"))) == 2  # the two sample prompts

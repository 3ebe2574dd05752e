"""DDMPipeline over a Paris model folder: round trips, tolerant reading, clear errors, t2v/i2v sampling.

The folder is written once per module by hand (tests/fixtures/pipeline.py): three tiny experts at two
stages, a tiny router, the lossless PixelVAE spec, tiny T5/CLIP and null tensors. Nothing is trained: the
pipeline's job is I/O and wiring the sampler, and every check compares against an independent path
(hashes of the weights written, a hand-built sampler call, the image itself through a lossless VAE).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm.sampling_spec import Routing, SamplingSpec
from ddm.export_files import MASTER_FILE, SHARD_DIR, read_export_metadata, save_export
from ddm.flow import video_shift_alpha
from ddm.models.hunyuan_vae import HunyuanVAEConfig
from ddm.models.text import TextEncoders, load_null_tensors, pad_tokens
from ddm.pipeline import DDMPipeline
from ddm.sampler import sample
from tests.fixtures.pipeline import (STAGES, build_model_folder, latent_channels, router_metadata, tiny_router,
                                     train_config, weight_hashes)

PROMPTS = ["a red car drives along the coast", "a cat sleeps on a windowsill", "fireworks over a harbour"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory, tiny_text_dir: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("paris") / "model"
    return root, build_model_folder(root, tiny_text_dir)


@pytest.fixture(scope="module")
def pipe(model_folder) -> DDMPipeline:
    return DDMPipeline.from_pretrained(model_folder[0])


def _variant(folder: Path, dst: Path, index_update: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the model folder with index fields replaced (None deletes) and entries removed."""
    shutil.copytree(folder, dst)
    for name in drop:
        target = dst / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if index_update:
        index = json.loads((dst / "model_index.json").read_text())
        for key, value in index_update.items():
            index.pop(key) if value is None else index.__setitem__(key, value)
        (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_loads_the_default_stage_with_the_weights_written(pipe, model_folder):
    folder, hashes = model_folder
    assert pipe.stage == "stage2" and pipe.num_experts == 3
    assert weight_hashes(pipe) == [hashes[f"expert{k}/stage2"] for k in (1, 2, 3)] + [hashes["router"]]
    stage3 = DDMPipeline.from_pretrained(folder, stage="s3", load_text=False)  # a variant spelling of stage3
    assert stage3.stage == "stage3"
    assert weight_hashes(stage3)[:3] == [hashes[f"expert{k}/stage3"] for k in (1, 2, 3)]


def test_round_trip_reproduces_samples_bit_for_bit(pipe, tmp_path):
    kwargs = dict(spec=SamplingSpec(Routing("topk", k=2), num_steps=3, cfg_scale=4.0), seeds=[3, 4, 5], batch_size=2,
                  trace=True, progress=False)
    first = pipe.generate(PROMPTS, **kwargs)
    res, frames, _ = STAGES["stage2"]
    assert first.videos.shape == (3, frames, res, res, 3) and first.videos.dtype == np.uint8
    assert first.traces.weights.shape == (3, 3, 3)  # (steps, samples, experts)
    assert ((first.traces.weights > 0).sum(-1) == 2).all()  # top-2 by default

    saved = pipe.save_pretrained(tmp_path / "saved")
    again = DDMPipeline.from_pretrained(saved).generate(PROMPTS, **kwargs)
    assert torch.equal(first.latents, again.latents)
    assert np.array_equal(first.videos, again.videos)
    assert torch.equal(first.traces.weights, again.traces.weights)
    # the other stage was carried over too, and the index names what was written
    index = json.loads((saved / "model_index.json").read_text())
    assert index["num_experts"] == 3 and set(index["stages"]) == {"stage2", "stage3"}
    assert (saved / "expert3" / "stage3" / MASTER_FILE).is_file() and (saved / "Router" / SHARD_DIR).is_dir()

    # a sample depends on its own prompt and seed only (fixed text padding, per-sample noise)
    alone = pipe.generate(PROMPTS[1:2], **{**kwargs, "seeds": [4]})
    torch.testing.assert_close(alone.latents[0], first.latents[1], rtol=1e-4, atol=1e-5)
    other_seed = pipe.generate(PROMPTS[1:2], **{**kwargs, "seeds": [5]})
    assert not torch.allclose(other_seed.latents[0], first.latents[1])


def test_single_file_and_sharded_checkpoints_load_identical_weights(pipe, model_folder, tmp_path):
    _, hashes = model_folder
    single = pipe.save_pretrained(tmp_path / "single", single_file=True, sharded=False)
    sharded = pipe.save_pretrained(tmp_path / "sharded", single_file=False, sharded=True)
    assert (single / "expert1" / "stage2" / MASTER_FILE).is_file()
    assert not (single / "expert1" / "stage2" / SHARD_DIR).exists()
    assert not (sharded / "expert1" / "stage2" / MASTER_FILE).exists()
    assert len(list((sharded / "expert1" / "stage2" / SHARD_DIR).glob("*.safetensors"))) > 1
    for stage in STAGES:
        a = DDMPipeline.from_pretrained(single, stage=stage, load_text=False)
        b = DDMPipeline.from_pretrained(sharded, stage=stage, load_text=False)
        expected = [hashes[f"expert{k}/{stage}"] for k in (1, 2, 3)] + [hashes["router"]]
        assert weight_hashes(a) == weight_hashes(b) == expected


def test_reader_tolerates_variant_names_and_foreign_indexes(model_folder, tmp_path):
    folder, hashes = model_folder
    # A: Expert_1/stage_2 + s3, experts/2/<resolution>px, a flat expert3 (stage3 only), router/, diffusers-style
    # component entries and unknown fields; the index lists no experts, so they are discovered
    a = _variant(folder, tmp_path / "a", {"experts": None, "router": None, "default_stage": None,
                                          "text_encoder": ["transformers", "T5EncoderModel"],
                                          "vae": ["diffusers", "AutoencoderKL"],  # → the checkpoints' VAE spec
                                          "some_future_field": {"x": 1}})
    (a / "expert1").rename(a / "Expert_1")
    (a / "Expert_1" / "stage2").rename(a / "Expert_1" / "stage_2")
    (a / "Expert_1" / "stage3").rename(a / "Expert_1" / "s3")
    (a / "experts").mkdir()
    (a / "expert2").rename(a / "experts" / "2")
    for stage, (res, _, _) in STAGES.items():
        (a / "experts" / "2" / stage).rename(a / "experts" / "2" / f"{res}px")
    shutil.rmtree(a / "expert3" / "stage2")
    for item in (a / "expert3" / "stage3").iterdir():
        item.rename(a / "expert3" / item.name)
    (a / "expert3" / "stage3").rmdir()
    (a / "Router").rename(a / "router")
    p = DDMPipeline.from_pretrained(a, load_text=False)
    assert p.stage == "stage3"  # the only stage every expert has
    assert weight_hashes(p) == [hashes[f"expert{k}/stage3"] for k in (1, 2, 3)] + [hashes["router"]]
    # the index round-trips what it did not understand
    out = p.save_pretrained(tmp_path / "a_saved")
    assert json.loads((out / "model_index.json").read_text())["some_future_field"] == {"x": 1}

    # B: a minimal index; stage names and geometry come from the checkpoints' metadata; null tensors are
    # made from the encoders since the folder lacks them
    b = _variant(folder, tmp_path / "b", drop=("null_t5.pt", "null_clip.pt"))
    (b / "model_index.json").write_text(json.dumps({"_class_name": "DDMPipeline", "vae": {"type": "pixel",
                                                                                          "spatial_factor": 1}}))
    for k in (1, 2, 3):
        (b / f"expert{k}" / "stage2").rename(b / f"expert{k}" / "low_res")
    p = DDMPipeline.from_pretrained(b, stage="stage2")
    assert weight_hashes(p) == [hashes[f"expert{k}/stage2"] for k in (1, 2, 3)] + [hashes["router"]]
    assert (b / "null_t5.pt").is_file()
    for made, original in zip(load_null_tensors(b), load_null_tensors(folder)):
        assert torch.equal(made, original)
    res, frames, fps = STAGES["stage2"]
    result = p.generate(PROMPTS[:1], SamplingSpec(Routing("topk", k=2), num_steps=1), seeds=0, progress=False)
    assert result.videos.shape == (1, frames, res, res, 3) and result.fps == fps


def _expect(error, match, folder, **kwargs):
    with pytest.raises(error, match=match):
        DDMPipeline.from_pretrained(folder, **kwargs)


def test_clear_errors_name_what_is_missing_or_inconsistent(model_folder, tmp_path):
    folder, _ = model_folder
    _expect(FileNotFoundError, "model_index.json", _variant(folder, tmp_path / "noindex", drop=("model_index.json",)),
            load_text=False)
    named = _variant(folder, tmp_path / "named", {"experts": ["expert1", "expert2", "expert3", "expert4"]})
    _expect(FileNotFoundError, "expert 4 'expert4'", named, load_text=False)
    _expect(ValueError, "num_experts=4 but .* holds 3", _variant(folder, tmp_path / "count", {"num_experts": 4}),
            load_text=False)
    _expect(ValueError, "expert ids must be consecutive", _variant(folder, tmp_path / "gap", {"experts": None},
                                                           drop=("expert2",)), load_text=False)
    _expect(FileNotFoundError, "no Router", _variant(folder, tmp_path / "norouter", {"router": None},
                                                     drop=("Router",)), load_text=False)
    _expect(FileNotFoundError, "expert 1 has no stage4", folder, stage="stage4", load_text=False)

    wrong_k = _variant(folder, tmp_path / "wrongk", drop=("Router",))
    router = tiny_router(4, seed=1)
    save_export(router.state_dict(), wrong_k / "Router", router_metadata(router, "stage2", train_config(folder, 4)))
    _expect(ValueError, "the router predicts 4 experts but 3 experts are loaded", wrong_k, load_text=False)

    _expect(FileNotFoundError, "tencent/HunyuanVideo", _variant(folder, tmp_path / "novae", {"vae": "vae.pt"}),
            load_text=False)
    other = HunyuanVAEConfig.tiny().latent_channels
    _expect(ValueError, f"the VAE gives {other} latent channels but the experts take {latent_channels()}",
            _variant(folder, tmp_path / "othervae", {"vae": {"type": "hunyuan-tiny"}}), load_text=False)
    _expect(FileNotFoundError, "flux_text_encoders", _variant(folder, tmp_path / "not5", drop=("t5",)))
    _expect(FileNotFoundError, "openai/clip-vit-large-patch14", _variant(folder, tmp_path / "noclip", drop=("clip",)))


def test_prior_correction_from_the_router_export_reaches_the_sampler(model_folder, tmp_path):
    folder, _ = model_folder
    biased = _variant(folder, tmp_path / "biased", drop=("Router",))
    router = tiny_router(3, seed=7)
    meta = router_metadata(router, "stage2", train_config(folder, 3), prior_correction=[-50.0, 50.0, -50.0])
    save_export(router.state_dict(), biased / "Router", meta)
    p = DDMPipeline.from_pretrained(biased)
    result = p.generate(PROMPTS, SamplingSpec(Routing("top1"), num_steps=2), seeds=0, trace=True, progress=False)
    assert torch.equal(result.traces.samples_per_expert, torch.tensor([[0, 3, 0]] * 2))


def test_full_strategy_equals_a_hand_built_mix(pipe, model_folder):
    """Text, nulls, shift, noise and decoding rebuilt by hand; the experts mixed by the router inside one
    callable (a text-blind router: mixing then guiding equals the sampler's per-expert guidance)."""
    folder, _ = model_folder
    seeds, steps, scale = [11, 12], 3, 5.0
    result = pipe.generate(PROMPTS[:2], SamplingSpec(Routing("full"), num_steps=steps, cfg_scale=scale), seeds=seeds, progress=False)

    encoders = TextEncoders.from_folder(folder / "t5", folder / "clip")
    t5, clip = encoders.encode(PROMPTS[:2])
    cond = {"t5": pad_tokens(t5, encoders.t5_max_length)[0], "clip": clip}
    null_t5, null_clip = load_null_tensors(folder)
    experts, router = pipe.experts, pipe.router

    def mixed(x, t, c):
        weights = router(x, t, c).softmax(-1)
        return sum(weights[:, j, None, None, None, None] * e(x, t, c) for j, e in enumerate(experts))

    res, frames, _ = STAGES["stage2"]
    channels, latent_t, latent_hw = pipe.vae.latent_channels, 1 + (frames - 1) // 4, res  # spatial factor 1
    _, ph, pw = experts[0].config.patch_size
    alpha = video_shift_alpha((latent_hw // ph) * (latent_hw // pw), latent_t)  # Open-Sora's video shift
    with torch.no_grad():
        latents = sample([mixed], None, (2, channels, latent_t, latent_hw, latent_hw), cond, SamplingSpec(num_steps=steps, cfg_scale=scale), uncond={"t5": null_t5, "clip": null_clip}, shift_alpha=alpha, seeds=seeds)
        video = pipe.vae.decode(latents).clamp(-1, 1)
    torch.testing.assert_close(result.latents, latents, rtol=1e-4, atol=1e-5)
    pixels = ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(result.videos.astype(int) - pixels.astype(int)).max() <= 1


def test_i2v_keeps_the_conditioning_frame(pipe):
    from ddm.video_io import resize_center_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)  # resized and centre-cropped to the frame
    res, _, _ = STAGES["stage2"]
    kwargs = dict(spec=SamplingSpec(Routing("topk", k=2), num_steps=2, cfg_scale=3.0), seeds=[1, 1], progress=False)
    # another aspect ratio than the square frame: cropping (or stretching) must be asked for
    with pytest.raises(ValueError, match=rf"image 1 is 30x21 .* but the video is {res}x{res} .*--image-fit"):
        pipe.generate(PROMPTS[:2], images=[image, None], **kwargs)
    result = pipe.generate(PROMPTS[:2], images=[image, None], image_fit="crop", **kwargs)
    frame = resize_center_crop(image[None], (res, res))  # (1, H, W, 3)
    pixels = torch.from_numpy(frame).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # a 1-frame video
    round_trip = pipe.vae.decode(pipe.vae.encode(pixels))
    expected = ((round_trip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0, :, 0].permute(1, 2, 0).numpy()
    assert np.array_equal(result.videos[0, 0], expected)
    assert np.array_equal(result.videos[0, 0], frame[0])  # the PixelVAE is lossless
    assert not np.array_equal(result.videos[1, 0], frame[0])  # the text-only sample is free
    # resize stretches the whole image to the frame (cv2 as the reference), a same-aspect image needs no choice
    import cv2

    stretched = pipe.generate(PROMPTS[:1], images=[image], image_fit="resize", **{**kwargs, "seeds": [1]})
    assert np.array_equal(stretched.videos[0, 0], cv2.resize(image, (res, res), interpolation=cv2.INTER_AREA))
    square = rng.integers(0, 256, (2 * res, 2 * res, 3), dtype=np.uint8)
    scaled = pipe.generate(PROMPTS[:1], images=[square], **{**kwargs, "seeds": [1]})
    assert np.array_equal(scaled.videos[0, 0], resize_center_crop(square[None], (res, res))[0])
    # the image conditions the experts: the generated frames differ from the same seed without it
    plain = pipe.generate(PROMPTS[:1], **{**kwargs, "seeds": [1]})
    assert not torch.allclose(plain.latents[0, :, 1:], result.latents[0, :, 1:])


def test_one_expert_folder_without_router_samples(model_folder, tmp_path, tiny_text_dir):
    folder = tmp_path / "monolith"
    hashes = build_model_folder(folder, tiny_text_dir, num_experts=1, router=False, null_text=False)
    p = DDMPipeline.from_pretrained(folder)
    assert p.num_experts == 1 and p.router is None
    assert read_export_metadata(folder / "expert1" / "stage2")["expert_id"] == "all"
    assert weight_hashes(p) == [hashes["expert1/stage2"]]
    result = p.generate(PROMPTS[:2], SamplingSpec(Routing("topk", k=2), num_steps=2), seeds=[0, 1], progress=False)
    cond = p.encode_prompts(PROMPTS[:2])
    res, frames, _ = STAGES["stage2"]
    shape = (2, p.vae.latent_channels, 1 + (frames - 1) // 4, res, res)
    with torch.no_grad():
        direct = sample(p.experts, None, shape, cond, SamplingSpec(num_steps=2, cfg_scale=7.5), uncond={"t5": p.null_text[0], "clip": p.null_text[1]}, shift_alpha=p.shift_alpha(shape[1:]), seeds=[0, 1])
    assert torch.equal(result.latents, direct)
    assert np.isfinite(result.latents.numpy()).all() and result.videos.shape == (2, frames, res, res, 3)

"""CLIP text-video score and LAION aesthetic score on the tiny CLIP, against direct computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from ddm.eval.aesthetic import AestheticHead, aesthetic_score, load_aesthetic_head, make_tiny_aesthetic_head
from ddm.eval.clip_score import ClipEmbedder, clip_score
from ddm.eval.stats import TINY_LABEL
from ddm.models.text import make_tiny_clip

CAPTIONS = ["a red ball bounces on a wooden floor", "waves roll onto a sandy beach at sunset",
            "a city street at night with neon signs"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def embedder(clip_dir):
    return ClipEmbedder.from_folder(clip_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # different sizes and aspect ratios, so the processor's resize + centre crop really run
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((48, 64, 3), (40, 40, 3), (90, 50, 3))]


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The HF model and processor, loaded directly (not through ddm.eval)."""
    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)


def _direct_cosine(reference, image: np.ndarray, text: str) -> float:
    """Reference: the HF model and processor called directly, the cosine in float64."""
    model, processor = reference
    with torch.no_grad():
        img = model.get_image_features(**processor(images=image, return_tensors="pt")).double()[0]
        txt = model.get_text_features(**processor.tokenizer([text], return_tensors="pt")).double()[0]
    return float(img @ txt / (img.norm() * txt.norm()))


def test_repeated_image_video_scores_the_image_cosine(reference, embedder, images):
    expected = [_direct_cosine(reference, im, cap) for im, cap in zip(images, CAPTIONS)]
    videos = [np.repeat(im[None], 5, axis=0) for im in images]  # 5 identical frames each
    r = clip_score(videos, CAPTIONS, embedder, progress=False)
    np.testing.assert_allclose(r.details["per_video"], expected, rtol=1e-5, atol=1e-6)
    assert r.value == pytest.approx(np.mean(expected), abs=1e-6)
    assert r.stderr == pytest.approx(np.std(expected, ddof=1) / np.sqrt(3), rel=1e-4)
    assert r.n == 3 and r.name == "clip_text_video"
    assert r.is_tiny and r.details["backbone"] == TINY_LABEL and TINY_LABEL in str(r)


def test_frames_are_averaged_and_strided(reference, embedder, images):
    a, b = images[0], np.ascontiguousarray(images[0][:, ::-1])  # the image and its mirror
    ca, cb = _direct_cosine(reference, a, CAPTIONS[0]), _direct_cosine(reference, b, CAPTIONS[0])
    assert abs(ca - cb) > 1e-4  # the two frames really score differently
    video = np.stack([a, b, a, b])
    assert clip_score([video], CAPTIONS[:1], embedder, progress=False).value == pytest.approx((ca + cb) / 2, abs=1e-6)
    strided = clip_score([video], CAPTIONS[:1], embedder, frame_stride=2, progress=False)
    assert strided.value == pytest.approx(ca, abs=1e-6) and strided.details["frame_stride"] == 2


def test_long_captions_are_truncated_and_counted(embedder, images):
    long_caption = " ".join(["a red ball bounces"] * 40)  # ~160 tokens, CLIP reads the first 77
    video = images[0][None]
    r = clip_score([video, video], [long_caption, CAPTIONS[0]], embedder, progress=False)
    assert r.details["captions_truncated"] == 1
    assert np.isfinite(r.value)


def test_clip_score_bad_inputs(clip_dir, embedder, images):
    video = np.repeat(images[0][None], 2, axis=0)
    with pytest.raises(ValueError, match="pair up"):
        clip_score([video, video], CAPTIONS[:1], embedder, progress=False)
    with pytest.raises(ValueError, match="pair up"):
        clip_score(iter([video]), CAPTIONS[:2], embedder, progress=False)  # a generator: checked at the end
    with pytest.raises(ValueError, match="empty"):
        clip_score([], [], embedder, progress=False)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        ClipEmbedder.from_folder(clip_dir.parent / "no_clip_here")


# --- aesthetic -----------------------------------------------------------------------------------------

def test_released_head_layout_and_key_names():
    shapes = {k: tuple(v.shape) for k, v in AestheticHead(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def _float64_chain(state: dict, x: np.ndarray) -> np.ndarray:
    """The head by hand: five affine maps, no activations (dropout is off at inference)."""
    h = x.astype(np.float64)
    for i in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
    return h[:, 0]


def test_head_equals_a_float64_matmul_chain(tmp_path):
    path = make_tiny_aesthetic_head(tmp_path / "head.pth", in_dim=32, seed=1)
    head = load_aesthetic_head(path)
    x = torch.nn.functional.normalize(torch.randn(7, 32), dim=-1)
    state = torch.load(path, weights_only=True)
    np.testing.assert_allclose(head(x).detach().double().numpy(), _float64_chain(state, x.numpy()),
                               rtol=1e-5, atol=1e-7)


def test_aesthetic_score_is_the_head_on_normalised_frame_embeddings(tmp_path, reference, embedder, images):
    path = make_tiny_aesthetic_head(tmp_path / "head.pth", in_dim=embedder.projection_dim, seed=2)
    head = load_aesthetic_head(path)
    state = torch.load(path, weights_only=True)
    model, processor = reference
    expected = []
    for im in images:
        frames = [im, np.ascontiguousarray(im[::-1])]
        with torch.no_grad():
            emb = model.get_image_features(**processor(images=frames, return_tensors="pt")).double().numpy()
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        expected.append(float(_float64_chain(state, emb).mean()))
    videos = [np.stack([im, im[::-1]]) for im in images]
    r = aesthetic_score(videos, embedder, head, progress=False)
    np.testing.assert_allclose(r.details["per_video"], expected, rtol=1e-5, atol=1e-6)
    assert r.value == pytest.approx(np.mean(expected), abs=1e-6)
    assert r.stderr == pytest.approx(np.std(expected, ddof=1) / np.sqrt(3), rel=1e-4)
    assert r.is_tiny and TINY_LABEL in r.details["backbone"]


def test_aesthetic_bad_inputs(tmp_path, embedder):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        load_aesthetic_head(tmp_path / "missing.pth")
    wrong = load_aesthetic_head(make_tiny_aesthetic_head(tmp_path / "h.pth", in_dim=768))
    with pytest.raises(ValueError, match="768-d"):
        aesthetic_score([np.zeros((2, 8, 8, 3), np.uint8)], embedder, wrong, progress=False)
    torch.save({"fc.weight": torch.zeros(1, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        load_aesthetic_head(tmp_path / "other.pth")

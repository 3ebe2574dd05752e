"""The domain backbone's Fréchet distance (ddm.eval.domain) separates real from not-real.

A small backbone (fewer clips and epochs than the default, to stay fast) is trained on its own seed;
distances are measured on two further seeds' real clips, decoded at the demo's 16 px.
"""
from __future__ import annotations

import numpy as np
import pytest

from data.synthetic import make_synthetic_dataset
from ddm.eval.domain import DOMAIN_LABEL, DomainBackbone, DomainConfig, domain_fvd, domain_stats, load_or_build
from ddm.eval.fvd import frechet_distance_symmetric
from ddm.eval.groundtruth import read_manifest
from ddm.video_io import read_video, resize_center_crop

SMALL = DomainConfig(families=("ocean", "desert", "forest"), num_clips=160, epochs=8, channels=(16, 32, 48))
N = 32


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("domain") / "domain_backbone.safetensors"
    model = load_or_build(path, SMALL)
    again, meta = DomainBackbone.load(path)  # the cache round-trips weights and config
    assert again.config == SMALL and meta["label"] == DOMAIN_LABEL
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    return again


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(videos, family index) of held-out real clips, 16 px, round-robin over the three families."""
    out = make_synthetic_dataset(tmp_path_factory.mktemp("domain_real"), 6 * N, seed=31337, size=32,
                                 num_frames=9, progress=False)
    rows = read_manifest(out)
    videos = [resize_center_crop(read_video(out / r["path"])[0], (16, 16)) for r in rows]
    return videos, [int(r["family"]) for r in rows]


def test_real_vs_real_floor_is_far_below_noise_and_one_family(backbone, real):
    videos, fams = real
    ref, other, rest = videos[:N], videos[N:2 * N], videos[2 * N:]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=v.shape, dtype=np.uint8) for v in other]
    one_family = [v for v, f in zip(rest, fams[2 * N:]) if f == 0][:N]
    assert len(one_family) == N

    res = domain_fvd(other, ref, backbone, floor_real=other)
    floor = res.details["floor"]
    assert res.value == pytest.approx(floor) and res.details["backbone"] == DOMAIN_LABEL and res.stderr is None
    noise_d = domain_fvd(noise, ref, backbone).value
    one_d = domain_fvd(one_family, ref, backbone).value
    print(f"floor {floor:.2f} noise {noise_d:.2f} one family {one_d:.2f}")
    assert noise_d > 5 * floor, (floor, noise_d)
    # one family only (a model that learned one cluster) is worse than a real mix of all families
    assert one_d > 2 * floor, (floor, one_d)
    # the Fréchet math is fvd.py's: cross-check with its independent symmetric form
    a, b = domain_stats(noise, backbone), domain_stats(ref, backbone)
    assert noise_d == pytest.approx(frechet_distance_symmetric(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)


def test_floor_needs_equal_sizes_and_rebuild_on_new_config(backbone, real, tmp_path):
    videos, _ = real
    with pytest.raises(ValueError, match="equal N"):
        domain_fvd(videos[:N], videos[N:2 * N], backbone, floor_real=videos[2 * N:2 * N + 8])
    with pytest.raises(FileNotFoundError, match="python -m ddm.eval.domain"):
        DomainBackbone.load(tmp_path / "missing.safetensors")
    short = [v[:5] for v in videos[:4]]
    with pytest.raises(ValueError, match="at least 9 frames"):
        domain_fvd(short, videos[:4], backbone)

"""T5 + CLIP text encoders through the real transformers classes, on tiny locally built weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddm.models.text import (
    TextEncoders,
    load_null_tensors,
    main,
    make_null_tensors,
    make_tiny_t5,
    pad_tokens,
)

CAPTIONS = [
    "A dog runs along the beach at sunset.",
    "A red car.",
    "Time-lapse of clouds drifting over snowy mountain peaks while a lone hiker, wearing a bright orange "
    "jacket, climbs the ridge and stops to look at the valley below.",
]


def _copy_t5(tiny_text_dir: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_text_dir / "t5", dest / "t5"))


def test_t5_true_length_rows_are_the_padded_runs_first_rows(tiny_text_encoders):
    enc = tiny_text_encoders
    t5, clip = enc.encode(CAPTIONS)
    assert len(t5) == 3 and clip.shape == (3, 32)
    tok = enc.t5_tokenizer
    for caption, states in zip(CAPTIONS, t5):
        true_len = len(tok(caption).input_ids)  # unpadded tokenization, EOS included
        assert states.shape == (min(true_len, enc.t5_max_length), 32)
        assert states.dtype == torch.float32 and torch.isfinite(states).all()
    assert t5[1].shape[0] < t5[0].shape[0] < t5[2].shape[0]  # longer caption, more rows
    # reference: call the HF model directly over the padded ids, no attention mask (Open-Sora)
    ids = tok(CAPTIONS, padding="max_length", max_length=enc.t5_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        full = enc.t5(input_ids=ids).last_hidden_state
    for i, states in enumerate(t5):
        torch.testing.assert_close(states, full[i, : states.shape[0]], rtol=0, atol=0)
    # running padded over the pad tokens differs from running unpadded: the pads really take part
    with torch.no_grad():
        unpadded = enc.t5(input_ids=tok(CAPTIONS[1], return_tensors="pt").input_ids).last_hidden_state[0]
    assert not torch.allclose(unpadded, t5[1], atol=1e-4)


def test_long_caption_truncates_at_max_length(tiny_text_encoders, caplog):
    enc = tiny_text_encoders
    long_caption = " ".join(["a dog runs along the beach"] * 40)
    with caplog.at_level("WARNING", logger="ddm.models.text"):
        (states,), _ = enc.encode([long_caption])
    assert "truncated" in caplog.text
    assert states.shape == (enc.t5_max_length, 32) == (64, 32)


def test_batching_does_not_change_results(tiny_text_encoders):
    a_t5, a_clip = tiny_text_encoders.encode(CAPTIONS, batch_size=32)
    b_t5, b_clip = tiny_text_encoders.encode(CAPTIONS, batch_size=1)
    for a, b in zip(a_t5, b_t5):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(a_clip, b_clip)


def test_clip_pooled_matches_the_full_clip_models_text_tower(tiny_text_dir, tiny_text_encoders):
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_text_dir / "clip").eval()
    tok = tiny_text_encoders.clip_tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        hidden = full.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    # reference pooling by hand: the state at the first <|endoftext|> of each caption
    eos = tiny_text_encoders.clip_tokenizer.eos_token_id
    first_eos = (tok.input_ids == eos).int().argmax(dim=1)
    expected = hidden[torch.arange(len(CAPTIONS)), first_eos]
    torch.testing.assert_close(tiny_text_encoders.encode_clip(CAPTIONS), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])


def test_tokenizers_handle_arbitrary_english(tiny_text_encoders):
    text = "Quirky vixens jump; big zebras walk at 10:30, 'quietly' (mostly)!"
    t5_ids = tiny_text_encoders.t5_tokenizer(text).input_ids
    assert tiny_text_encoders.t5_tokenizer.unk_token_id not in t5_ids
    clip_ids = tiny_text_encoders.clip_tokenizer(text).input_ids
    assert tiny_text_encoders.clip_tokenizer.unk_token_id not in clip_ids[1:-1]
    assert tiny_text_encoders.clip_tokenizer.decode(clip_ids, skip_special_tokens=True).replace(" ", "") == \
        text.lower().replace(" ", "")


def test_clip_repository_serves_processor_and_vision_tower(tiny_text_dir):
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(tiny_text_dir / "clip")
    model = CLIPModel.from_pretrained(tiny_text_dir / "clip").eval()
    image = torch.randint(0, 256, (2, 48, 40, 3), dtype=torch.uint8).numpy()
    inputs = processor(text=["a dog", "a cat"], images=list(image), return_tensors="pt", padding=True)
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == (2, 32) and out.text_embeds.shape == (2, 32)


@pytest.mark.parametrize("drop", ["encoder.embed_tokens.weight", "shared.weight"])
def test_tied_embedding_is_restored_from_the_other_name(tiny_text_dir, tiny_text_encoders, tmp_path, drop):
    t5_dir = _copy_t5(tiny_text_dir, tmp_path)
    sd = load_file(t5_dir / "model.safetensors")
    del sd[drop]
    save_file(sd, t5_dir / "model.safetensors")
    enc = TextEncoders.from_folder(t5_dir, tiny_text_dir / "clip")
    assert enc.t5.shared.weight is enc.t5.encoder.embed_tokens.weight
    for a, b in zip(enc.encode(CAPTIONS)[0], tiny_text_encoders.encode(CAPTIONS)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_t5_load_is_strict(tiny_text_dir, tmp_path):
    t5_dir = _copy_t5(tiny_text_dir, tmp_path)
    sd = load_file(t5_dir / "model.safetensors")
    del sd["encoder.final_layer_norm.weight"]
    sd["encoder.extra.weight"] = torch.zeros(2)
    save_file(sd, t5_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['encoder.final_layer_norm.weight'\].*"
                                         r"unexpected keys \['encoder.extra.weight'\]"):
        TextEncoders.from_folder(t5_dir, tiny_text_dir / "clip")


def test_untied_embeddings_are_refused(tiny_text_dir, tmp_path):
    t5_dir = _copy_t5(tiny_text_dir, tmp_path)
    sd = load_file(t5_dir / "model.safetensors")
    sd["shared.weight"] = sd["shared.weight"] + 1.0
    save_file(sd, t5_dir / "model.safetensors")
    with pytest.raises(ValueError, match="ties them"):
        TextEncoders.from_folder(t5_dir, tiny_text_dir / "clip")


def test_missing_files_name_their_upstream_repositories(tiny_text_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="comfyanonymous/flux_text_encoders(.|\n)*google/t5-v1_1-xxl"):
        TextEncoders.from_folder(tmp_path / "nowhere" / "t5", tiny_text_dir / "clip")
    t5_dir = _copy_t5(tiny_text_dir, tmp_path)
    (t5_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="comfyanonymous/flux_text_encoders") as err:
        TextEncoders.from_folder(t5_dir, tiny_text_dir / "clip")
    assert "t5xxl_fp16.safetensors" in str(err.value) and "google/t5-v1_1-xxl" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        TextEncoders.from_folder(tiny_text_dir / "t5", tmp_path / "clip")


def test_pad_tokens_matches_a_hand_built_reference():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(n, 3, generator=g) for n in (2, 5, 0, 4)]
    padded, lengths = pad_tokens(seqs)
    expected = torch.zeros(4, 5, 3)
    for i, s in enumerate(seqs):
        for j in range(s.shape[0]):
            expected[i, j] = s[j]
    assert torch.equal(padded, expected)
    assert lengths.tolist() == [2, 5, 0, 4]

    padded, lengths = pad_tokens(seqs, length=7)
    assert padded.shape == (4, 7, 3) and torch.equal(padded[:, :5], expected) and not padded[:, 5:].any()

    with pytest.warns(UserWarning, match="truncating"):
        padded, lengths = pad_tokens(seqs, length=3)
    assert lengths.tolist() == [2, 3, 0, 3] and torch.equal(padded, expected[:, :3])


def test_pad_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        pad_tokens([])
    with pytest.raises(ValueError, match="feature dim"):
        pad_tokens([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match=r"\(L, D\)"):
        pad_tokens([torch.zeros(3)])


def test_null_tensors_are_the_empty_caption(tiny_text_encoders, tmp_path):
    enc = tiny_text_encoders
    null_t5, null_clip = make_null_tensors(enc, tmp_path)
    assert null_t5.shape == (1, enc.t5_max_length, 32) and null_clip.shape == (1, 32)
    # reference: the HF models called directly on the tokenized empty string
    ids = enc.t5_tokenizer([""], padding="max_length", max_length=enc.t5_max_length, return_tensors="pt").input_ids
    assert ids[0, 0] == enc.t5_tokenizer.eos_token_id and (ids[0, 1:] == enc.t5_tokenizer.pad_token_id).all()
    with torch.no_grad():
        torch.testing.assert_close(null_t5, enc.t5(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    (true_t5,), clip = enc.encode([""])
    assert true_t5.shape == (1, 32) and torch.equal(true_t5, null_t5[0, :1])
    torch.testing.assert_close(null_clip, clip, rtol=0, atol=0)
    loaded_t5, loaded_clip = load_null_tensors(tmp_path)
    assert torch.equal(loaded_t5, null_t5) and torch.equal(loaded_clip, null_clip)


def test_load_null_tensors_generates_or_explains(tiny_text_encoders, tmp_path):
    with pytest.raises(FileNotFoundError, match="--make-null"):
        load_null_tensors(tmp_path / "empty")
    null_t5, null_clip = load_null_tensors(tmp_path / "gen", encoders=tiny_text_encoders)
    assert (tmp_path / "gen" / "null_t5.pt").is_file() and (tmp_path / "gen" / "null_clip.pt").is_file()
    torch.save(torch.zeros(512, 32), tmp_path / "gen" / "null_t5.pt")  # missing batch dim
    with pytest.raises(ValueError, match=r"\(1, L, D_t5\)"):
        load_null_tensors(tmp_path / "gen")


def test_cli_makes_null_tensors_from_a_model_folder(tiny_text_dir, tmp_path):
    for name in ("t5", "clip"):
        shutil.copytree(tiny_text_dir / name, tmp_path / name)
    main(["--make-null", str(tmp_path)])
    null_t5, null_clip = load_null_tensors(tmp_path)
    assert null_t5.shape == (1, 64, 32) and null_clip.shape == (1, 32)


def test_tiny_t5_build_is_deterministic(tiny_text_dir, tmp_path):
    make_tiny_t5(tmp_path / "t5", seed=0)
    for name in ("spiece.model", "model.safetensors", "config.json"):
        assert (tmp_path / "t5" / name).read_bytes() == (tiny_text_dir / "t5" / name).read_bytes(), name
    make_tiny_t5(tmp_path / "t5_seed1", seed=1)
    assert load_file(tmp_path / "t5_seed1" / "model.safetensors")["shared.weight"].ne(
        load_file(tmp_path / "t5" / "model.safetensors")["shared.weight"]).any()


def test_tiny_tokenizers_keep_the_synthetic_attribute_words_whole(tiny_text_encoders):
    """Every colour, shape, direction and speed word of the synthetic captions is one token in both tiny
    tokenizers (as in the real 32k T5 and 49k CLIP vocabularies): a tiny random encoder gives a word
    split into pieces ("red" -> "re" + "d") no state of its own for a tiny expert to read."""
    from ddm.synthetic import FAMILIES, MOTIONS, SHAPE_COLOURS, SPEEDS

    words = {name for name, _ in SHAPE_COLOURS} | set(MOTIONS) | {s for s in SPEEDS if s}
    words |= {shape for family in FAMILIES for shape in family.shapes}
    enc = tiny_text_encoders
    split = {w: (enc.t5_tokenizer.tokenize(" " + w), enc.clip_tokenizer.tokenize(w)) for w in sorted(words)}
    assert len(words) == 19
    assert {w: pieces for w, pieces in split.items() if len(pieces[0]) != 1 or len(pieces[1]) != 1} == {}


def test_the_longest_synthetic_caption_fits_the_tiny_recipes_padding(tiny_text_encoders):
    """The tiny recipe pads T5 to ``text_pad_to`` tokens and truncates longer prompts: no caption the
    generator can write may be cut. Words tokenize independently (each starts with "▁"), so the longest
    caption takes the longest word in every slot of the two-shape, moving template."""
    from omegaconf import OmegaConf

    from ddm.synthetic import FAMILIES, MOTIONS, SHAPE_COLOURS, SPEEDS, TEXTURE_WORDS

    def n(words: str) -> int:
        return len(tiny_text_encoders.t5_tokenizer.tokenize(" " + words))

    colour = max(n(c) for c, _ in SHAPE_COLOURS)
    shape = max(n(s) for f in FAMILIES for s in f.shapes)
    background = max(n(f"{b} {TEXTURE_WORDS[f.texture]}") for f in FAMILIES for b, _ in f.backgrounds)
    worst = (n("an") + colour + shape) * 2 + n("and") + n("move") + max(n(s) for s in SPEEDS if s) \
        + max(n(m) for m in MOTIONS) + n("across an") + background + n("background") + 1  # + </s>
    pad_to = OmegaConf.load(Path(__file__).parents[1] / "conf" / "recipe" / "tiny.yaml").text_pad_to
    assert worst <= pad_to
    # the bound is real: it is at least the length of an actual two-shape caption
    caption = "a magenta triangle and an orange diamond move quickly right across an ochre striped background"
    assert len(tiny_text_encoders.t5_tokenizer(caption).input_ids) <= worst

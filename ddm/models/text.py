"""Text conditioning: T5 token states + pooled CLIP, loaded from the Paris folder layout (DESIGN §5.4, §5.6).

Layout, as users place the third-party files beside a Paris model folder::

    t5/    model.safetensors (HF ``T5EncoderModel`` key names, no prefix; the comfyanonymous fp16 file)
           config.json spiece.model tokenizer_config.json special_tokens_map.json (google/t5-v1_1-xxl)
    clip/  the whole openai/clip-vit-large-patch14 repository (a full ``CLIPModel`` + tokenizer files)

T5 follows Open-Sora 2.0: every caption is tokenized padded to ``max_length`` (512) and the encoder
runs over the padded sequence **without an attention mask**, so pad tokens take part in attention.
:meth:`TextEncoders.encode` then returns each caption's first ``L_true`` rows (``L_true`` = non-pad
tokens, EOS included). Those rows are exactly the rows of the padded run — shards store them at true
length and :func:`pad_tokens` zero-pads a batch back to a common length. The CFG null ``null_t5`` is
the empty caption's *whole* padded run, (1, max_length, D), as DESIGN §5.2 states ((1, 512, 4096)).

CLIP: ``CLIPTextModel.pooler_output`` (the EOS token's final state), max_length 77, truncation.

:func:`make_tiny_text_encoders` writes the same layout with tiny random-initialised real HF models
(T5 d_model 32, CLIP width 32) and tokenizers trained locally on a built-in corpus, so tests and the
demo go through exactly the loader real weights go through. Nothing downloads.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddm.assets import missing_component_message, require_path
from ddm.files import atomic_save_torch
from ddm.models.weights import load_state_dict_strict

log = logging.getLogger(__name__)

T5_MAX_LENGTH = 512
CLIP_MAX_LENGTH = 77
T5_WEIGHTS = "model.safetensors"
NULL_T5_FILE = "null_t5.pt"
NULL_CLIP_FILE = "null_clip.pt"
# T5EncoderModel ties these two names to one embedding; released files may carry only one of them.
_T5_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on accelerators (T5 v1.1 overflows in fp16), fp32 on the CPU, unless told otherwise."""
    if dtype is not None:
        return dtype
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _check_t5_folder(t5_dir: Path) -> None:
    """Raise one FileNotFoundError listing every missing T5 file and where each comes from."""
    problems = []
    if not (t5_dir / T5_WEIGHTS).is_file():
        problems.append(missing_component_message(t5_dir / T5_WEIGHTS, "t5"))
    if not (t5_dir / "config.json").is_file() or not (
        (t5_dir / "spiece.model").is_file() or (t5_dir / "tokenizer.json").is_file()
    ):
        problems.append(missing_component_message(t5_dir, "t5_tokenizer"))
    if problems:
        raise FileNotFoundError("\n".join(problems))


def _read_t5_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the T5 safetensors file tensor by tensor (peak memory = one model) and tie the embeddings."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        sd = {k: f.get_tensor(k).to(dtype) for k in f.keys()}
    present = [k for k in _T5_TIED if k in sd]
    if len(present) == 2 and not torch.equal(sd[_T5_TIED[0]], sd[_T5_TIED[1]]):
        raise ValueError(f"{path}: '{_T5_TIED[0]}' and '{_T5_TIED[1]}' differ, but T5EncoderModel ties them")
    if len(present) == 1:
        for k in _T5_TIED:
            sd.setdefault(k, sd[present[0]])
    return sd


def load_t5(t5_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load ``(tokenizer, T5EncoderModel)`` from a Paris-layout ``t5/`` folder, strictly.

    The model is built on the meta device and the file's tensors are assigned into it, so the 4.7B
    encoder is never randomly initialised first. Missing or unexpected keys raise a ValueError
    naming them.
    """
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    t5_dir = Path(t5_dir).expanduser()
    _check_t5_folder(t5_dir)  # a missing folder names both upstream sources (weights, tokenizer)
    device = torch.device(device)
    dtype = _default_dtype(device, dtype)
    tokenizer = T5TokenizerFast.from_pretrained(str(t5_dir))
    config = T5Config.from_pretrained(str(t5_dir))
    with torch.device("meta"):
        model = T5EncoderModel(config)
    sd = _read_t5_state_dict(t5_dir / T5_WEIGHTS, dtype)
    load_state_dict_strict(model, sd, f"{t5_dir / T5_WEIGHTS} (config {t5_dir / 'config.json'})")
    return tokenizer, model.to(device).eval().requires_grad_(False)


def load_clip_text(clip_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load ``(tokenizer, CLIPTextModel)`` from a whole CLIP repository (vision weights are ignored).

    Every text-tower weight must be in the checkpoint: a missing one raises instead of being
    silently random-initialised.
    """
    from transformers import CLIPTextModel, CLIPTokenizerFast

    clip_dir = require_path(clip_dir, "clip")
    device = torch.device(device)
    dtype = _default_dtype(device, dtype)
    tokenizer = CLIPTokenizerFast.from_pretrained(str(clip_dir))
    model, info = CLIPTextModel.from_pretrained(str(clip_dir), dtype=dtype, output_loading_info=True)
    bad = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise ValueError(f"{clip_dir}: CLIP text weights missing or mismatched: {bad[:10]}")
    return tokenizer, model.to(device).eval().requires_grad_(False)


class TextEncoders:
    """T5 + CLIP text encoders as used for conditioning (DESIGN §5.4)."""

    def __init__(self, t5_tokenizer, t5_model, clip_tokenizer, clip_model, t5_max_length: int = T5_MAX_LENGTH,
                 clip_max_length: int = CLIP_MAX_LENGTH):
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5_model
        self.clip_tokenizer, self.clip = clip_tokenizer, clip_model
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip_max_length
        self.t5_dim = int(t5_model.config.d_model)
        self.clip_dim = int(clip_model.config.hidden_size)

    @classmethod
    def from_folder(cls, t5_dir: str | Path, clip_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> TextEncoders:
        """Load both encoders from the Paris layout (``dtype`` defaults to fp32 on CPU, bf16 otherwise).

        T5's max_length is 512, or the tokenizer's ``model_max_length`` when that is smaller (the tiny
        encoders use 64); CLIP's is 77 capped the same way.
        """
        t5_tok, t5 = load_t5(t5_dir, device, dtype)
        clip_tok, clip = load_clip_text(clip_dir, device, dtype)
        return cls(t5_tok, t5, clip_tok, clip, t5_max_length=min(T5_MAX_LENGTH, int(t5_tok.model_max_length)),
                   clip_max_length=min(CLIP_MAX_LENGTH, int(clip_tok.model_max_length)))

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    @torch.no_grad()
    def encode_t5_padded(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states of the padded run, (B, max_length, D) float32, and true lengths (B,) (EOS included)."""
        tok = self.t5_tokenizer(list(texts), padding="max_length", max_length=self.t5_max_length,
                                truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.device)
        # Open-Sora: no attention mask, pad tokens take part (the released experts were trained so).
        states = self.t5(input_ids=ids).last_hidden_state.float()
        lengths = (ids != self.t5_tokenizer.pad_token_id).sum(dim=1)
        full = int((lengths == self.t5_max_length).sum())
        if full:
            log.warning("%d caption(s) reached T5's max_length %d and were truncated", full, self.t5_max_length)
        return states, lengths

    @torch.no_grad()
    def encode_clip(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled CLIP text states (B, D_clip) float32."""
        tok = self.clip_tokenizer(list(texts), padding="max_length", max_length=self.clip_max_length,
                                  truncation=True, return_tensors="pt").to(self.device)
        return self.clip(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output.float()

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encode captions: (list of (L_i, D_t5) T5 states at true length, pooled CLIP (B, D_clip)).

        Tensors are float32 on the encoders' device. ``L_i`` counts the caption's tokens and its EOS;
        row j is row j of the padded run.
        """
        if isinstance(texts, str):
            raise ValueError("encode() takes a list of captions, not a single string")
        texts = list(texts)
        t5_out: list[torch.Tensor] = []
        clip_out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            states, lengths = self.encode_t5_padded(chunk)
            t5_out += [s[:n] for s, n in zip(states, lengths.tolist())]
            clip_out.append(self.encode_clip(chunk))
        clip = torch.cat(clip_out) if clip_out else torch.zeros(0, self.clip_dim, device=self.device)
        return t5_out, clip


def pad_tokens(seqs: Sequence[torch.Tensor | np.ndarray], length: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad token sequences (L_i, D) to (B, L, D); return it and the kept lengths (B,) int64.

    ``L`` is ``length`` when given, else the longest ``L_i``. Sequences longer than ``length`` are
    truncated, with a warning (information is being dropped). The dtype is the first sequence's.
    """
    if len(seqs) == 0:
        raise ValueError("pad_tokens needs at least one sequence")
    seqs = [torch.as_tensor(s) for s in seqs]
    for i, s in enumerate(seqs):
        if s.ndim != 2:
            raise ValueError(f"sequence {i} must be (L, D), got shape {tuple(s.shape)}")
        if s.shape[1] != seqs[0].shape[1]:
            raise ValueError(f"sequence {i} has feature dim {s.shape[1]}, sequence 0 has {seqs[0].shape[1]}")
    longest = max(s.shape[0] for s in seqs)
    if length is None:
        length = longest
    elif length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    elif longest > length:
        warnings.warn(f"pad_tokens: truncating token sequences of up to {longest} tokens to {length}",
                      stacklevel=2)
    out = torch.zeros(len(seqs), length, seqs[0].shape[1], dtype=seqs[0].dtype, device=seqs[0].device)
    lengths = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = min(s.shape[0], length)
        out[i, :n] = s[:n].to(out)
        lengths[i] = n
    return out, lengths


# --------------------------------------------------------------------------------------------------
# CFG null tensors
# --------------------------------------------------------------------------------------------------

def make_null_tensors(encoders: TextEncoders, folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the empty caption and write ``folder/null_t5.pt`` (1, max_length, D_t5) and
    ``folder/null_clip.pt`` (1, D_clip), float32 on CPU, atomically. Returns them."""
    folder = Path(folder)
    null_t5, _ = encoders.encode_t5_padded([""])
    null_clip = encoders.encode_clip([""])
    null_t5, null_clip = null_t5.cpu().contiguous(), null_clip.cpu().contiguous()
    atomic_save_torch(null_t5, folder / NULL_T5_FILE)
    atomic_save_torch(null_clip, folder / NULL_CLIP_FILE)
    log.info("wrote CFG null tensors %s %s and %s %s", folder / NULL_T5_FILE, tuple(null_t5.shape),
             folder / NULL_CLIP_FILE, tuple(null_clip.shape))
    return null_t5, null_clip


def load_null_tensors(folder: str | Path, encoders: TextEncoders | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``null_t5.pt`` / ``null_clip.pt`` from ``folder``; generate them first when absent and
    ``encoders`` are given, else raise a FileNotFoundError saying how to make them."""
    folder = Path(folder)
    paths = folder / NULL_T5_FILE, folder / NULL_CLIP_FILE
    if encoders is not None and not all(p.exists() for p in paths):
        return make_null_tensors(encoders, folder)
    null_t5, null_clip = (torch.load(require_path(p, "null_text"), map_location="cpu", weights_only=True)
                          for p in paths)
    if not isinstance(null_t5, torch.Tensor) or null_t5.ndim != 3 or null_t5.shape[0] != 1:
        raise ValueError(f"{paths[0]} must hold a (1, L, D_t5) tensor, got {getattr(null_t5, 'shape', null_t5)}")
    if not isinstance(null_clip, torch.Tensor) or null_clip.ndim != 2 or null_clip.shape[0] != 1:
        raise ValueError(f"{paths[1]} must hold a (1, D_clip) tensor, got {getattr(null_clip, 'shape', null_clip)}")
    return null_t5, null_clip


# --------------------------------------------------------------------------------------------------
# tiny encoders, built locally
# --------------------------------------------------------------------------------------------------

# Built-in English corpus the tiny tokenizers are trained on: varied captions plus every ASCII
# letter, digit and punctuation mark, so arbitrary English text tokenizes without unknowns.
TINY_CORPUS = """\
A golden retriever runs along a sandy beach at sunset, splashing through shallow waves.
Two children build a sandcastle while their parents watch from colourful towels nearby.
An old fisherman repairs his nets on a wooden pier as seagulls circle overhead.
A young woman in a yellow raincoat walks her bicycle across a cobblestone square in the rain.
Time-lapse of clouds drifting over snowy mountain peaks, shadows sliding across the valley below.
A chef slices fresh vegetables in a busy restaurant kitchen; steam rises from the pans behind him.
Close-up of a hummingbird hovering beside a bright red flower, its wings a blur of motion.
A red sports car speeds down a winding coastal highway, the ocean sparkling on the right.
Aerial view of a dense green forest with a river curling between the trees like a silver ribbon.
A street musician plays the violin under a bridge while pedestrians drop coins into his case.
Slow-motion shot of a drop of milk falling into a bowl and forming a perfect crown.
A cat sleeps on a windowsill, its tail twitching as snowflakes fall outside the glass.
Fireworks explode over a harbour at night, reflected in the calm black water.
A group of friends laughs around a campfire, sparks drifting up into the starry sky.
A black and white photograph of a city street in the 1950s, with vintage cars and hats.
A surfer rides a huge turquoise wave, spray flying from the crest as it breaks.
An astronaut floats inside the space station, slowly turning a wrench in zero gravity.
Rain streams down a window; blurred city lights glow orange and blue beyond it.
A potter shapes wet clay on a spinning wheel, her hands smooth and steady.
A herd of elephants crosses a dusty savanna under a pale morning sun.
Macro footage of an ant carrying a leaf twice its size across a mossy log.
A jazz band performs on a small stage in a smoky club, the drummer keeping time.
A hot air balloon rises over vineyards and rolling hills in early autumn light.
An underwater scene with a sea turtle gliding past coral reefs and schools of tiny fish.
A toddler takes her first wobbly steps toward her smiling grandfather in the garden.
Neon signs flicker above a crowded night market selling noodles, dumplings and skewers.
A lighthouse stands on a rocky cliff as storm waves crash against the base.
Leaves swirl in the wind along an empty park path lined with orange maple trees.
A robot arm assembles small electronic parts on a factory conveyor belt.
A skateboarder performs a kickflip down a flight of concrete stairs.
Steam trains puff through a mountain pass, carriages rattling over an old stone viaduct.
A painter adds thin strokes of blue to a large canvas in a sunlit studio.
Snow falls quietly on a village at dusk; warm light glows in every window.
A horse gallops across an open meadow, mane flowing, grass bending beneath its hooves.
A busy train station at rush hour, commuters hurrying past the departure boards.
A baker pulls golden loaves of bread from a brick oven with a long wooden paddle.
Lightning splits a purple sky above a wheat field, followed by heavy rain.
A kayak paddles through a narrow canyon with towering red rock walls.
A barista pours steamed milk into a cup, drawing a delicate leaf in the foam.
Jellyfish pulse slowly through dark blue water, glowing softly from within.
A marathon runner crosses the finish line, arms raised, the crowd cheering loudly.
An eagle dives from the sky and snatches a fish from the surface of a lake.
Candles flicker on a birthday cake as a family sings together at the table.
A drone flies low over terraced rice fields glistening with water.
A knight in shining armour rides through the gate of a medieval castle.
Traffic flows along a multi-lane highway, headlights streaking in a long exposure.
A scientist pipettes a clear liquid into rows of test tubes in a bright laboratory.
A polar bear and her cubs walk across drifting sea ice under a low sun.
A girl blows dandelion seeds into the breeze on a warm summer afternoon.
Waves of sand ripple across desert dunes as a camel caravan passes in silhouette.
An orchestra tunes its instruments before the conductor raises his baton.
A man in a grey suit checks his watch while waiting for an elevator.
Autumn fog rolls over a quiet lake; a single rowing boat rests near the shore.
A puppy chases a tennis ball across a backyard lawn and tumbles over.
A volcano erupts at night, rivers of glowing lava flowing down its dark slopes.
A woman reads a book in a cosy armchair beside a crackling fireplace.
Cherry blossoms fall like pink snow over a temple courtyard in spring.
A cyclist climbs a steep mountain road, breathing hard, the summit in sight.
The camera pans slowly from left to right across a modern glass skyline.
Zoom in on a vintage clock whose hands spin quickly backwards.
Quick cuts of a dancer spinning, jumping and landing on a wet stage.
Twelve yellow taxis wait in a row at 9:45 pm outside the theatre.
Simple animations: a red circle moves left across a dark blue gradient background.
A yellow square and a white triangle move slowly right across a sand striped background.
A black diamond moves quickly up across a dark green checkered background, then down again.
An orange ring and a cyan cross move down across a purple diagonally striped background.
A magenta circle moves right across a grey dotted background; a red square moves left.
A white ring moves slowly up across an olive checkered background.
A cyan triangle and a black square move quickly left across a navy gradient background.
An orange diamond moves down across a beige striped background past a yellow cross.
A magenta ring moves slowly left across a violet diagonally striped background.
A red cross moves quickly right across a silver dotted background.
A white square moves up across a plum diagonally striped background.
A yellow circle moves down across a crimson plain background, and a black ring moves up.
An orange triangle moves right across a moss green checkered background.
A cyan diamond moves slowly down across a steel blue gradient background.
A magenta square moves quickly up across an ochre striped background.
A white cross and a red diamond move right across a maroon plain background.
A black circle moves left across a dark grey dotted background.
A yellow ring moves slowly right across a dark red plain background.
Numbers and letters: 0 1 2 3 4 5 6 7 8 9, A B C D E F G H I J K L M N O P Q R S T U V W X Y Z.
Punctuation (commas, colons: semicolons; quotes "like these" and 'these') - dashes! [brackets] {braces}
Question? Exclamation! 50% off, $20 & more # tags @ handles * stars + plus = equals / slash \\ | ~ ^ _ `
"""

TINY_T5_SPM_VOCAB = 512  # sentencepiece pieces; T5Tokenizer adds 100 <extra_id_*> like the real one
TINY_T5_MAX_LENGTH = 64
TINY_CLIP_MERGES = 400
TINY_CLIP_IMAGE_SIZE = 32
# CLIP's pre-tokenizer split (lower-cased words, single digits, punctuation runs, English contractions).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _corpus_lines() -> list[str]:
    return [line for line in TINY_CORPUS.splitlines() if line.strip()]


def _train_tiny_spiece(path: Path) -> None:
    """Train a deterministic BPE sentencepiece model with T5's ids (pad 0, eos 1, unk 2, no bos).

    BPE, not the real T5's unigram: on a corpus this small the unigram trainer splits even frequent words
    ("red" -> "re" + "d"), while BPE keeps them whole, as the real 32k vocabulary does for common words;
    the tiny text encoders are random, so a word split into pieces is much harder for a tiny model to read.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=buf, vocab_size=TINY_T5_SPM_VOCAB,
        model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def _learn_clip_bpe(num_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn byte-level BPE merges on the corpus, CLIP-style (``</w>`` marks a word's last symbol).

    Returns the vocabulary in CLIP's order (256 byte symbols, the same with ``</w>``, one entry per
    merge, then ``<|startoftext|>``, ``<|endoftext|>``) and the merges in rank order. Ties between
    equally frequent pairs break on the pair itself, so the result is deterministic.
    """
    import regex
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    byte_symbol = bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in regex.findall(_CLIP_SPLIT, TINY_CORPUS.lower()):
        s = "".join(byte_symbol[b] for b in word.encode("utf-8"))
        words[tuple(s[:-1]) + (s[-1] + "</w>",)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, count in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for w, count in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    base = list(byte_symbol.values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def make_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny CLIP repository into ``folder`` itself (not ``folder/clip``) and return it.

    Same files as openai/clip-vit-large-patch14: ``config.json`` + ``model.safetensors`` of a real
    ``CLIPModel`` (text and vision width 32, 2 layers, 2 heads, 32×32 images, patch 8, projection 32),
    a locally learned byte-level BPE tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer.json`` …)
    and a ``CLIPImageProcessor`` config, so ``CLIPProcessor.from_pretrained(folder)`` works.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _learn_clip_bpe(TINY_CLIP_MERGES)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_MAX_LENGTH
                  ).save_pretrained(str(folder))
    CLIPTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))  # adds tokenizer.json
    CLIPImageProcessor(size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
                       crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE}
                       ).save_pretrained(str(folder))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, projection_dim=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, projection_dim=32),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_tiny_t5(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Paris-layout ``t5/`` folder into ``folder`` itself and return it.

    A real ``T5EncoderModel`` (T5 v1.1 gated-GELU, d_model 32, 2 layers, 2 heads, d_kv 16, d_ff 64)
    saved as ``model.safetensors`` with HF key names (both tied embedding names present), its
    ``config.json``, and a sentencepiece tokenizer trained on the built-in corpus, saved by
    ``T5Tokenizer.save_pretrained`` (``spiece.model``, ``tokenizer_config.json``, ...). The
    tokenizer's ``model_max_length`` is 64 so tiny encodings stay cheap.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spiece = folder / "spiece.model"
    _train_tiny_spiece(spiece)
    tokenizer = T5Tokenizer(str(spiece), model_max_length=TINY_T5_MAX_LENGTH, legacy=True)
    tokenizer.save_pretrained(str(folder))
    config = T5Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # padded like the real 32100 → 32128
        d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    config.save_pretrained(str(folder))
    torch.manual_seed(seed)
    model = T5EncoderModel(config)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(folder / T5_WEIGHTS))
    return folder


def make_tiny_text_encoders(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write tiny ``folder/t5/`` and ``folder/clip/`` in the Paris layout; return ``(t5_dir, clip_dir)``.

    Deterministic for a given seed; nothing is downloaded. Load them with
    ``TextEncoders.from_folder(t5_dir, clip_dir)``, exactly as the real files are loaded.
    """
    folder = Path(folder)
    t5_dir = make_tiny_t5(folder / "t5", seed=seed)
    clip_dir = make_tiny_clip(folder / "clip", seed=seed)
    log.info("wrote tiny text encoders to %s and %s", t5_dir, clip_dir)
    return t5_dir, clip_dir


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ddm.models.text --make-null <folder>`` | ``--make-tiny <folder>``."""
    parser = argparse.ArgumentParser(prog="python -m ddm.models.text", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--make-null", metavar="MODEL_FOLDER", type=Path,
                       help="write null_t5.pt / null_clip.pt from MODEL_FOLDER/t5 and MODEL_FOLDER/clip")
    group.add_argument("--make-tiny", metavar="FOLDER", type=Path,
                       help="write tiny, locally built FOLDER/t5 and FOLDER/clip (for tests and the demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for --make-tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.make_tiny is not None:
        t5_dir, clip_dir = make_tiny_text_encoders(args.make_tiny, seed=args.seed)
        print(f"tiny text encoders written to {t5_dir} and {clip_dir}")
    else:
        folder = args.make_null
        log.info("loading text encoders from %s/t5 and %s/clip on %s", folder, folder, args.device)
        encoders = TextEncoders.from_folder(folder / "t5", folder / "clip", device=args.device)
        make_null_tensors(encoders, folder)
        print(f"null tensors written to {folder / NULL_T5_FILE} and {folder / NULL_CLIP_FILE}")


if __name__ == "__main__":
    main()

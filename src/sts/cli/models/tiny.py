"""The embedded default: a real transformers LLaVA (CLIP tower + Llama), built from configs;
also in LLaVA-NeXT's anyres form (`family="llava-next"`), from its own base weights (the same
sizes, further pre-trained on the anyres views and layout).

Nothing comes from a hub. The tokenizer is a word-level `PreTrainedTokenizerFast` made
from the synthetic data's vocabulary; the processor is a real `LlavaProcessor`. The base
weights of the vision tower and the language model (pre-trained by `sts pretrain-base`)
ship with the package, as a real recipe starts from CLIP and a Llama; the projector always
starts random, so the demo's stages have to teach the model to answer from the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sts.cli.data.synth import vocabulary
from sts.cli.recipes import TinyModelConfig
from sts.compat import in_model_layout, pil_image_processor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Each form's base: the same vision tower; the anyres form's language model further pre-trained on
# its own layout of image tokens (`sts pretrain-base --family llava-next`).
BASE_WEIGHTS = {"llava": ASSETS / "tiny-base.safetensors", "llava-next": ASSETS / "tiny-base-llava-next.safetensors"}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
IMAGE_TOKEN = "<image>"
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":"]
MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava-next": LlavaNextForConditionalGeneration}
FAMILIES = tuple(MODEL_CLASSES)
# The LLaVA-NeXT form reads an image twice the tower's size as a base view (the whole image at the
# tower's size) and 2 x 2 tiles, as LLaVA-NeXT-7B reads a 672 px image with its 336 px CLIP.
ANYRES_TILES = 2

# LLaVA-1.5's conversation format; `sts.cli.data.llava` writes the same text segment by segment.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    " ASSISTANT:"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + TEMPLATE_WORDS + vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def anyres_pinpoints(tile: int, tiles: int = ANYRES_TILES) -> list[list[int]]:
    """LLaVA-NeXT's resolutions up to `tiles` x `tiles` tiles: the square and both oblongs."""
    return [[tile, tiles * tile], [tiles * tile, tile], [tiles * tile, tiles * tile]]


def llava_next_processor(tokenizer, image_size: int, patch_size: int, pinpoints, chat_template: str):
    """LLaVA-NeXT's own processor: CLIP's "default" features (the CLS token dropped) of a base view
    and of the tiles of the best-fitting pinpoint."""
    image_processor = pil_image_processor("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )


def build_processor(cfg: TinyModelConfig | None = None, family: str = "llava") -> LlavaProcessor | LlavaNextProcessor:
    cfg = cfg or TinyModelConfig()
    if family == "llava-next":
        pinpoints = anyres_pinpoints(cfg.image_size)
        return llava_next_processor(build_tokenizer(), cfg.image_size, cfg.patch_size, pinpoints, CHAT_TEMPLATE)
    image_processor = pil_image_processor("CLIPImageProcessor")(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


def build_config(cfg: TinyModelConfig | None = None, family: str = "llava") -> LlavaConfig | LlavaNextConfig:
    """The tiny model's config in the form of `family` (one of FAMILIES): the same tower and
    language model either way, so either form's base weights fit both."""
    if family not in FAMILIES:
        raise ValueError(f"model.family {family!r}: not one of {FAMILIES}")
    cfg = cfg or TinyModelConfig()
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -1,
    }
    if family == "llava-next":
        config = LlavaNextConfig(**common, image_grid_pinpoints=anyres_pinpoints(cfg.image_size))
    else:
        config = LlavaConfig(**common, image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)
    config.pad_token_id = tokenizer.pad_token_id
    return config


def is_base_part(name: str) -> bool:
    """Base weights are the vision tower and the language model; never the projector (nor
    LLaVA-NeXT's image_newline, a visual token made and trained with it)."""
    return "multi_modal_projector" not in name and "image_newline" not in name


def build_model(
    cfg: TinyModelConfig | None = None, seed: int = 0, base: bool = True, family: str = "llava"
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A random-initialised tiny LLaVA (or LLaVA-NeXT); with `base`, the shipped pre-trained tower and LM."""
    cfg = cfg or TinyModelConfig()
    config = build_config(cfg, family)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](config)
    if base:
        load_base_weights(model, cfg, BASE_WEIGHTS[family])
    return model


EXTRA_PREFIX = "pretrain."  # pre-training state kept beside the weights (for resuming), never loaded into a model


def save_base_weights(
    model: LlavaForConditionalGeneration,
    cfg: TinyModelConfig,
    path: Path = BASE_WEIGHTS["llava"],
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if is_base_part(k)}
    tensors.update({k: v.detach().clone().contiguous() for k, v in (extra or {}).items()})
    save_file(tensors, str(path), metadata={"tiny_config": cfg.model_dump_json()})
    return path


def load_extra(path: Path, key: str) -> torch.Tensor:
    return load_file(str(path))[key]


def load_base_weights(model: LlavaForConditionalGeneration, cfg: TinyModelConfig, path: Path) -> None:
    if not path.exists():
        family = "" if path == BASE_WEIGHTS["llava"] else " --family llava-next"
        raise FileNotFoundError(f"no base weights at {path}: run `sts pretrain-base{family}` first")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        trained_for = TinyModelConfig(**json.loads(f.metadata()["tiny_config"]))
    if trained_for != cfg:
        raise ValueError(
            f"the base weights at {path} fit {trained_for.model_dump()}, not {cfg.model_dump()}; "
            "use the default sizes, set model.base=false, or re-run `sts pretrain-base`"
        )
    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith(EXTRA_PREFIX)}
    missing, unexpected = model.load_state_dict(in_model_layout(weights, model), strict=False)
    assert not unexpected and all(not is_base_part(k) for k in missing), (missing, unexpected)
